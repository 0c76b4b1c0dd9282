"""The typed errors wave_rt raises. Every error names the item or file it is about and the reason."""

from __future__ import annotations


class WaveRTError(Exception):
    """Base class of every error raised on purpose by wave_rt."""

    def __reduce__(self) -> tuple:
        # Errors cross process boundaries pickled (Ray actors, worker processes); Exception's default re-calls
        # __init__ with the message alone, which these constructors do not take: rebuild from the attributes.
        return _rebuild_error, (type(self), self.args, dict(self.__dict__))


class MissingDependencyError(WaveRTError, ImportError):
    """An optional dependency is not installed; the message holds the exact pip command."""

    def __init__(self, module: str, pip_install: str, feature: str) -> None:
        self.module = module
        self.pip_install = pip_install
        super().__init__(f"{feature} needs the optional package '{module}', which is not installed: {pip_install}")


class CheckpointError(WaveRTError):
    """A checkpoint directory or file cannot be loaded (missing/unexpected/mis-shaped keys, bad config, unreadable)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load checkpoint {self.path}: {reason}")


class InputError(WaveRTError, ValueError):
    """An item given to encode() is unsupported or malformed."""

    def __init__(self, item: object, reason: str, index: int | None = None) -> None:
        self.item = item
        self.reason = reason
        self.index = index
        super().__init__(f"item {_describe(item)}: {reason}")

    def __str__(self) -> str:
        # rendered when shown: prepare() learns the item's position after the error is raised
        where = f"item {self.index} " if self.index is not None else "item "
        return f"{where}{_describe(self.item)}: {self.reason}"


class UnsupportedItemError(InputError):
    """The item's type is not one encode() understands."""


class BatchTooLargeError(WaveRTError):
    """A batch's shapes lie outside what an engine was built for (a TensorRT engine's optimization profiles):
    the batch runners split it in halves as they split a batch that runs out of memory; a single item that
    still does not fit is reported with this error."""


class DeviceError(WaveRTError, ValueError):
    """A device this process cannot use: CUDA asked for on a machine or torch build without it, a device index
    past the ones present, or a string torch does not parse."""

    def __init__(self, device: object, reason: str) -> None:
        self.device = str(device)
        self.reason = reason
        super().__init__(f"device {self.device!r}: {reason}")


class MediaError(WaveRTError):
    """A media file cannot be decoded; subclasses (in wave_rt.media) name the cause."""

    def __init__(self, source: object, reason: str) -> None:
        self.source = _describe(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    # the item's position in an encode() call, set by the processor (a bytes source has no name to tell it by)
    index: int | None = None

    def __str__(self) -> str:
        where = f"item {self.index} " if self.index is not None else ""
        return f"{where}{self.source}: {self.reason}"


def _rebuild_error(cls: type, args: tuple, state: dict) -> WaveRTError:
    err = cls.__new__(cls, *args)
    BaseException.__init__(err, *args)
    err.__dict__.update(state)
    return err


def _describe(item: object, limit: int = 80) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The typed errors wave_rt raises. Every error names the item or file it is about and the reason."""

from __future__ import annotations


class WaveRTError(Exception):
    """Base class of every error raised on purpose by wave_rt."""


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
        where = f"item {index} " if index is not None else "item "
        super().__init__(f"{where}{_describe(item)}: {reason}")


class UnsupportedItemError(InputError):
    """The item's type is not one encode() understands."""


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


def _describe(item: object, limit: int = 80) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."

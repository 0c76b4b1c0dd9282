"""Every typed error survives a pickle round trip (type, message, attributes): errors cross process
boundaries pickled (Ray actors hand them to the driver, worker processes to the job), and Exception's default
pickling re-calls __init__ with the message alone, which turned a CheckpointError raised in a Ray actor into
Ray's UnserializableException."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

import wave_rt
from wave_rt.errors import WaveRTError


def _all_errors() -> list[type]:
    for mod in pkgutil.walk_packages(wave_rt.__path__, "wave_rt."):
        if mod.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError:  # an optional dependency (DALI, TensorRT) this machine lacks
            continue
    found, todo = set(), [WaveRTError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted(found | {WaveRTError}, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _dummy(param: inspect.Parameter) -> object:
    hint = str(param.annotation)
    if "dict" in hint:
        return {"dtype": ("fp32", "bf16")}
    if "int" in hint and "str" not in hint:
        return 3
    return f"<{param.name}>"


ERRORS = _all_errors()


def test_the_walk_finds_the_errors():
    names = {c.__name__ for c in ERRORS}
    assert {"CheckpointError", "InputError", "CorruptMediaError", "ArchiveMismatchError", "BatchTooLargeError"} <= names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_error_pickles_with_its_message_and_attributes(cls):
    params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty]
    args = [_dummy(p) for p in params if p.kind != p.KEYWORD_ONLY]
    kwargs = {p.name: _dummy(p) for p in params if p.kind == p.KEYWORD_ONLY}
    err = cls(*args, **kwargs) if params else cls("a message")
    if hasattr(err, "index"):
        err.index = 7  # set after raising, as the processor does
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err) and back.args == err.args
    assert back.__dict__ == err.__dict__

"""Reading checkpoint files without running code: ``torch.load`` with ``weights_only=True`` and the few
DeepSpeed record classes its files hold allowed by name; anything else is refused (:class:`UnsafeFileError`)."""
from __future__ import annotations

import contextlib
import pickle

import torch


class UnsafeFileError(ValueError):
    """A file the engine reads holds a pickle with arbitrary objects (code would run): refused, exit code 2."""


# The few DeepSpeed classes its optimizer-state files hold (loss scaler, ZeRO stage, fragment addresses):
# plain records, allowed by name so the rest of a checkpoint still loads with ``weights_only=True``.
def deepspeed_safe_globals() -> list:
    # deepspeed here, not at the top: reading a checkpoint's recipe or paths must not load it.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load`` that only accepts tensors and plain containers; anything else is refused, not run."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(unsafe_message(path, e)) from None


def unsafe_message(path, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"{path} holds objects other than tensors and plain data, so it was not loaded (unpickling it "
            f"could run code). If you made this file and trust it, re-save it as plain tensors; otherwise "
            f"delete it. ({first})")


@contextlib.contextmanager
def weights_only_loads():
    """DeepSpeed reads checkpoint files with a full unpickler (``weights_only=False``); inside this block every
    ``torch.load`` is ours instead, so a checkpoint that carries code is refused rather than run."""
    original = torch.load

    def load(f, map_location=None, *args, weights_only=None, mmap=None, **kwargs):
        try:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return original(f, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise UnsafeFileError(unsafe_message(f, e)) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original

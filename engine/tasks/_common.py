"""Small helpers shared by the evaluation loops: torch.distributed when it is up, a
plain single process when it is not, and moving batches to the model."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if dist_ready() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if dist_ready() else 1


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` without torch.distributed."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def run_on_rank0_and_share(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    If ``fn`` raises on rank 0, every rank raises (instead of the others waiting
    forever in the broadcast).
    """
    payload = None
    if rank() == 0:
        try:
            payload = ("ok", fn())
        except Exception as e:
            if world_size() == 1:
                raise
            broadcast_object(("error", f"{type(e).__name__}: {e}"))
            raise
    status, value = broadcast_object(payload)
    if status == "error":
        raise RuntimeError(f"evaluation failed on rank 0: {value}")
    return value


def resolve_dtype(model: Any, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype images are cast to: ``dtype`` if given, else the model's, else None (no cast)."""
    if dtype is not None:
        return dtype
    d = getattr(model, "dtype", None)
    if isinstance(d, torch.dtype):
        return d
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return None


def to_device(x: Any, device, dtype: Optional[torch.dtype] = None) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``; cast floating ones to ``dtype``."""
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype, non_blocking=True)
        return x.to(device=device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, dtype) for v in x)
    return x


def tree_map(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(tree_map(fn, v) for v in x)
    return x


def tree_cat(items: Sequence[Any]) -> Any:
    """Concatenate along dim 0 structures of the same shape (tensors, tuples, lists, dicts)."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(items), dim=0)
    if isinstance(first, dict):
        return {k: tree_cat([it[k] for it in items]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(tree_cat([it[n] for it in items]) for n in range(len(first)))
    return first


@contextlib.contextmanager
def eval_mode(model: Any):
    """``model.eval()`` and no autograd for the block; the training flag is restored after."""
    was_training = bool(getattr(model, "training", False))
    if callable(getattr(model, "eval", None)):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training and callable(getattr(model, "train", None)):
            model.train()


def check_batch(batch: Any, keys: Iterable[str], where: str) -> None:
    if not isinstance(batch, dict):
        raise TypeError(f"{where}: the loader must yield dict batches; got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{where}: batch lacks key(s) {', '.join(missing)} (has {', '.join(sorted(batch))})")

"""Checkpoints: DeepSpeed's own format plus the engine's state, made visible atomically.

Layout under ``output_dir/checkpoints/``::

    <tag>/                 DeepSpeed files (model + optimizer shards) written by every rank
    <tag>/rng_rank<R>.pt   each rank's RNG states (python, numpy, torch)
    <tag>/engine_state.json  step, epoch, position in the epoch, metrics, the base (rank 0)
    <tag>/COMPLETE         written last, after every rank finished
    latest                 the tag of the newest complete checkpoint (moved with os.replace)

A checkpoint counts only once ``COMPLETE`` exists: ``latest`` moves after all
ranks passed a barrier, so a crash mid-save leaves the previous one in charge.

Only what trains is written: the trained parameters (and persistent buffers), their optimizer
state and the engine's state. Frozen weights (a frozen ViT and LLM, the base under LoRA) are the
base's: ``engine_state.json`` records where they come from (``base``: the ``model.pretrained``
folder, or the seeded weights of a tiny / random model) with a fingerprint, and every reader
rebuilds them from that base, refusing another one (:func:`check_base`). ``run.save_frozen: true``
writes them too (``frozen_saved`` in the state), for users who will not keep the base; so do bases
that cannot be rebuilt (random weights initialised partitioned under ZeRO-3). Checkpoints written
before this rule hold every weight and load as they are.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import random
import shutil
import struct
from typing import Any, Dict, List, Optional

from engine.checkpoints.paths import COMPLETE, ENGINE_STATE, is_complete  # noqa: F401  (the file names, one home)
from engine.checkpoints.safe_loading import UnsafeFileError, safe_torch_load, weights_only_loads  # noqa: F401
from engine.faults import fault

import numpy as np
import torch
import torch.distributed as dist


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointSaveError(RuntimeError):
    """A save failed; the previous checkpoint is untouched and still ``latest``."""


# ----------------------------------------------------------------------------- the base of the frozen weights

class BaseMismatchError(ValueError):
    """A checkpoint without frozen weights is read against another base than the one it was trained on."""


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")


_SAMPLE = 4096  # bytes read from the start of every tensor (safetensors) or of every block (other formats)


def _sample_safetensors(path: str, h) -> None:
    """Hash a safetensors file's header (every tensor's name, dtype, shape and byte range: its index) and the
    first bytes of every tensor: two finetunes of one architecture have the same index, not the same bytes."""
    with open(path, "rb") as f:
        size = f.read(8)
        if len(size) < 8:
            return
        (n,) = struct.unpack("<Q", size)
        header = f.read(min(n, 100 * 2**20))
        h.update(header)
        try:
            index = json.loads(header)
        except ValueError:
            return
        for name in sorted(k for k in index if k != "__metadata__"):
            start, end = index[name].get("data_offsets", (0, 0))
            f.seek(8 + n + start)
            h.update(f.read(min(end - start, _SAMPLE)))


def _sample_blocks(path: str, size: int, h, blocks: int = 64) -> None:
    """Other weight formats (pickles): hash evenly spaced blocks of the file."""
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(size * i // blocks)
            h.update(f.read(_SAMPLE))


def folder_fingerprint(folder: str) -> Dict[str, Any]:
    """Sizes of a weights folder's files and a hash of their index (the ``*.index.json`` files and every
    safetensors header) and of a sample of their bytes: cheap at any model size (a few MB read), and it
    changes when any tensor's name, shape, dtype or place changes, a file is replaced by one of another
    size, or another finetune of the same architecture is put there."""
    folder = os.path.abspath(folder)
    names = sorted({os.path.relpath(p, folder) for pat in _WEIGHT_PATTERNS
                    for p in glob.glob(os.path.join(folder, "**", pat), recursive=True)})
    h = hashlib.sha256()
    files = {}
    for name in names:
        path = os.path.join(folder, name)
        files[name] = os.path.getsize(path)
        h.update(f"{name}\0{files[name]}\0".encode())
        if name.endswith(".index.json"):
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith(".safetensors"):
            _sample_safetensors(path, h)
        else:
            _sample_blocks(path, files[name], h)
    return {"path": folder, "files": files, "bytes": sum(files.values()), "fingerprint": h.hexdigest()}


def _frozen_named(module) -> List[tuple]:
    return [(n, p) for n, p in module.named_parameters() if not p.requires_grad]


def _sampled(t, n: int = 2048):
    """The first and last `n` values of `t` and `n` more at an even stride (all of a small tensor)."""
    flat = t.reshape(-1)
    if flat.numel() <= 3 * n:
        return flat
    stride = torch.arange(n, device=flat.device) * (flat.numel() - 1) // (n - 1)  # int64: exact at any size
    return torch.cat([flat[:n], flat[stride], flat[-n:]])


def describe_base(model_cfg: Dict[str, Any], seed: int, precision: str, model) -> Dict[str, Any]:
    """Where a run's frozen weights come from, with a fingerprint to recognise it later.

    ``model_cfg``: the recipe's model section (a dict); ``model``: the model as built for training,
    before DeepSpeed wraps it (its frozen weights are still whole, except under ZeRO-3 partitioned
    loading). A folder is fingerprinted by :func:`folder_fingerprint`; seeded random weights (a tiny
    model without a folder, ``pretrained: random``) by a hash of their values in the run's precision,
    unless they were initialised partitioned (ZeRO-3), which no seed reproduces: ``reproducible``
    is then false and the frozen weights must be saved. A random real-size model is drawn in the run's
    precision on the rank's device (engine/models/blip2.py ``random_model``), so its base also records the
    device type (``device``): only the same seed, precision and device type draw the same weights again. Its
    hash reads samples of each tensor (``hashed``), not all of its values: seconds less at every start.
    """
    pretrained = model_cfg.get("finetuned") if model_cfg.get("load_finetuned") else model_cfg.get("pretrained")
    frozen = _frozen_named(model)
    numel = sum(getattr(p, "ds_numel", None) or p.numel() for _, p in frozen)
    base: Dict[str, Any]
    if pretrained is not None and pretrained != "random":
        base = {"kind": "folder", **folder_fingerprint(pretrained), "reproducible": True}
    else:
        what = f"{model_cfg.get('arch')}/{model_cfg.get('model_type')} random weights from seed {seed}"
        base = {"kind": "seeded", "path": what, "seed": seed}
        real_size = model_cfg.get("model_type") != "tiny"
        if real_size:
            device = next((p.device.type for _, p in frozen), "cpu")
            base.update(path=f"{what} ({precision}, drawn on {device})", device=device, hashed="sampled values")
        if any(hasattr(p, "ds_id") for _, p in frozen):
            base.update(reproducible=False, fingerprint=None)
        else:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
            h = hashlib.sha256()
            for name, p in frozen:
                # A random real-size base is hashed on samples of each tensor (its ends and an even stride):
                # weights drawn from a seed differ everywhere when the seed, dtype, device type or init code
                # differ, and hashing all of a 7B model would add seconds to every start (and a copy off a GPU).
                t = (_sampled(p.detach()) if real_size else p.detach()).to(dtype).cpu().contiguous()
                h.update(f"{name}\0{tuple(p.shape)}\0{t.dtype}\0".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # no copy
            base.update(reproducible=True, fingerprint=h.hexdigest())
    if model_cfg.get("adapter"):  # an adapter merged into the base before training is part of it
        base["adapter"] = folder_fingerprint(model_cfg["adapter"])
    base["frozen_params"] = int(numel)
    return base


def _base_line(base: Dict[str, Any]) -> str:
    fp = base.get("fingerprint") or "none"
    line = f"{base.get('path')} (fingerprint {fp[:16]}"
    if base.get("kind") == "folder":
        line += f", {len(base.get('files', {}))} weight file(s), {base.get('bytes', 0):,} bytes"
    if base.get("adapter"):
        line += f", adapter {base['adapter']['path']} {base['adapter']['fingerprint'][:16]}"
    return line + ")"


def same_base(saved: Dict[str, Any], current: Dict[str, Any]) -> bool:
    def key(b):
        return b.get("kind"), b.get("fingerprint"), (b.get("adapter") or {}).get("fingerprint")

    return bool(saved.get("fingerprint")) and key(saved) == key(current)


def check_base(ckpt_dir: str, state: Dict[str, Any], current: Dict[str, Any], universal: bool = False) -> Optional[str]:
    """Refuse to read a checkpoint whose frozen weights are not in it against another base than its own.

    Returns a note when the base moved (same fingerprint, another path), else None. Checkpoints that hold
    their frozen weights (``run.save_frozen``, or written before this rule) pass whatever the base, except
    through the universal format (``universal``), which carries only what the optimizer holds: the frozen
    weights are then the base's, and a recorded base must match."""
    if state.get("frozen_saved", True) and not (universal and state.get("base")):
        return None
    saved = state.get("base") or {}
    if not same_base(saved, current):
        what = ("holds only the trained weights" if not state.get("frozen_saved", True) else
                "is read through DeepSpeed's universal format, which holds only the trained weights")
        raise BaseMismatchError(
            f"{ckpt_dir} {what}; its frozen weights come from the base it was trained "
            f"on, {_base_line(saved)}, but this run's base is {_base_line(current)}. Point model.pretrained "
            f"(and model.adapter, run.seed for seeded bases) at the checkpoint's base; a checkpoint saved with "
            f"run.save_frozen=true carries its base with it")
    if saved.get("path") != current.get("path"):
        return f"base weights of {ckpt_dir}: same files as {saved.get('path')}, now read from {current.get('path')}"
    return None


@contextlib.contextmanager
def _frozen_out_of_module(engine):
    """The frozen weights never go into the module's state dict: by default they are not saved at all
    (``exclude_frozen_parameters``), and with ``run.save_frozen`` DeepSpeed saves them once, as its
    ``frozen_param_fragments`` (which its loader and zero_to_fp32 read), instead of twice. DeepSpeed's own
    exclusion drops a frozen parameter by its first name only; a tied weight (OPT's lm_head is its embedding,
    T5's encoder/decoder embeddings are ``shared``) would still be written under its other names: every
    name of every frozen tensor is left out here."""
    module = engine.module
    frozen_ids = {id(p) for p in module.parameters() if not p.requires_grad}
    names = {n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in frozen_ids}
    original = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        sd = original(*args, **kwargs)
        for n in names:
            sd.pop(n, None)
        return sd

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict


def save(engine, root: str, tag: str, state: Dict[str, Any], extra_writer=None, save_frozen: bool = True) -> str:
    """Save a checkpoint on every rank; returns its folder. ``latest`` moves only when all ranks are done.

    ``extra_writer(folder)`` (optional) runs on every rank after DeepSpeed's files are written, e.g. to
    store a LoRA adapter beside them. ``save_frozen=False`` leaves the frozen weights out (they are the
    base's, which ``state["base"]`` names).
    """
    state = dict(state, frozen_saved=bool(save_frozen))
    final = os.path.join(root, tag)
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(final):  # a leftover of an interrupted save of the same tag
            shutil.rmtree(final)
    _barrier()
    try:
        if fault("enospc_in_save") == tag:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        with _frozen_out_of_module(engine):
            engine.save_checkpoint(root, tag=tag, client_state={"engine_state": state}, save_latest=False,
                                   exclude_frozen_parameters=not save_frozen)
        torch.save(rng_state(), os.path.join(final, f"rng_rank{rank}.pt"))
        if extra_writer is not None:
            extra_writer(final)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
        prev = latest_tag(root)
        hint = "free disk space (or point run.output_dir at a larger disk) and resume" \
            if e.errno == errno.ENOSPC else "check the folder's permissions and resume"
        raise CheckpointSaveError(
            f"saving checkpoint {final} failed: {e}. The partial save was removed; the previous checkpoint "
            f"({prev or 'none'}) is intact and still 'latest'; {hint}."
        ) from e
    _barrier()  # every rank's shards and RNG file are on disk
    if rank == 0:
        if fault("crash_in_save") == tag:
            os._exit(86)  # die after the shards are written but before the checkpoint is marked complete
        _atomic_write(os.path.join(final, ENGINE_STATE), json.dumps(state, indent=2))
        _atomic_write(os.path.join(final, COMPLETE), "")
        _atomic_write(os.path.join(root, "latest"), tag)
    _barrier()
    return final


def promote_best(root: str, src_tag: str) -> None:
    """Point ``best`` at a complete checkpoint: a symlink swapped in one os.replace (no copy of the weights)."""
    if _rank() == 0:
        best = os.path.join(root, "best")
        tmp = best + ".incoming"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(src_tag, tmp)
        os.replace(tmp, best)
    _barrier()


def latest_tag(root: str) -> Optional[str]:
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        tag = f.read().strip()
    return tag if tag and is_complete(os.path.join(root, tag)) else None


def _checked_module_load(ckpt_dir: str):
    """DeepSpeed's module load, strict in what it may be: every key the model has is in the checkpoint,
    except frozen parameters (they come from DeepSpeed's ``frozen_param_fragments`` when the checkpoint holds
    them, which its loader copies in next, else stay as built from the base); no key the model lacks; the
    same shapes (torch checks those)."""
    def load_module(src, dst):
        result = dst.load_state_dict(src, strict=False)
        ids = {id(p) for p in dst.parameters() if not p.requires_grad}
        frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if id(p) in ids}
        missing = [k for k in result.missing_keys if k not in frozen]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"the weights in {ckpt_dir} do not match the model built from the recipe: "
                f"{len(missing)} key(s) missing ({', '.join(missing[:10])}), {len(result.unexpected_keys)} "
                f"unexpected ({', '.join(result.unexpected_keys[:10])}); a checkpoint of another model/LoRA setting")

    return load_module


def _load_zero3_module(engine, ckpt_dir: str) -> None:
    """Weights only under ZeRO-3, from any number of ranks: consolidated by DeepSpeed's zero_to_fp32 for
    this tag (DeepSpeed's own module-only load consolidates the one ``latest`` names, whatever tag was
    asked for), then loaded into the gathered parameters on rank 0 and scattered."""
    # deepspeed here, not at the top: tools that only read a checkpoint's state import this module.
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(ckpt_dir)
    with weights_only_loads(), contextlib.redirect_stdout(None):
        sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if _rank() == 0:
            _checked_module_load(ckpt_dir)(sd, engine.module)
    if engine.optimizer is not None and hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()


def load(engine, ckpt_dir: str, module_only: bool = False, universal: Optional[str] = None,
         restore_rng: bool = True) -> Dict[str, Any]:
    """Restore model, optimizer, LR schedule and this rank's RNG (or only the model); return the engine state.

    ``universal``: the checkpoint's universal form (reshape.py) to load the DeepSpeed state from instead,
    for a run on another number of ranks or ZeRO stage (DeepSpeed's ``checkpoint.load_universal`` must be
    on). ``restore_rng=False`` keeps this rank's RNG as seeded (another layout: no such rank was saved).
    Frozen weights the checkpoint left out stay as the model was built (from its base: :func:`check_base`
    must have passed).
    """
    ckpt_dir = os.path.abspath(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(
            f"{ckpt_dir} is not a complete checkpoint of this engine (no {COMPLETE} marker: the save was "
            f"interrupted or the folder is something else); resume from checkpoints/latest instead"
        )
    state = read_state(ckpt_dir)
    if module_only and engine.zero_optimization_stage() == 3:
        _load_zero3_module(engine, ckpt_dir)
        return state
    root, tag = os.path.split(os.path.abspath(universal) if universal else ckpt_dir)
    groups = getattr(engine.optimizer, "param_groups", None) or []
    decays = [g.get("weight_decay") for g in groups]
    with weights_only_loads():
        path, _ = engine.load_checkpoint(root, tag=tag, load_module_only=module_only,
                                         load_optimizer_states=not module_only,
                                         load_lr_scheduler_states=not module_only,
                                         custom_load_fn=_checked_module_load(ckpt_dir))
    if universal and not module_only:
        _repair_universal_load(engine.optimizer, decays)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
    rng_file = os.path.join(ckpt_dir, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_file) and not module_only and restore_rng:
        set_rng_state(safe_torch_load(rng_file))
    return state


def _repair_universal_load(optimizer, decays: List[Optional[float]]) -> None:
    """Two things DeepSpeed's ZeRO-3 universal loader gets wrong, put right after it ran.

    It gives every param group the settings of the first (the no-decay group of biases and norms would get
    weight decay): the groups' own weight decay is restored. It stores one ``step`` tensor in the Adam
    state of every sub-group, and torch's Adam increments it in place once per sub-group and step, so the
    bias correction would run ahead: each state gets its own copy. Both are no-ops after ZeRO-1/2 loads.
    """
    for g, wd in zip(optimizer.param_groups, decays):
        if wd is not None:
            g["weight_decay"] = wd
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.clone()


def read_state(ckpt_dir: str) -> Dict[str, Any]:
    """The engine state a checkpoint was saved with (step, epoch, position, layout, recipe)."""
    with open(os.path.join(ckpt_dir, ENGINE_STATE), "r", encoding="utf-8") as f:
        return json.load(f)


def prune(root: str, keep_last: int, protect: List[str]) -> None:
    """Delete all but the newest ``keep_last`` step/epoch checkpoints; never ``best`` or protected tags."""
    if keep_last <= 0 or _rank() != 0 or not os.path.isdir(root):
        return
    tags = []
    for name in os.listdir(root):
        d = os.path.join(root, name)
        if name == "best" or os.path.islink(d) or name in protect or not is_complete(d):
            continue
        tags.append((read_state(d)["global_step"], name))
    for _, name in sorted(tags)[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)

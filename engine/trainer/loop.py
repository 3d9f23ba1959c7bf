"""The training loop around a DeepSpeed engine.

One class, one step function: forward -> backward -> step, with logging,
evaluation and checkpointing at the boundaries. The same code runs ZeRO-2,
ZeRO-3 and their offload variants, on one process or many, CPU or GPU.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import time
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from engine.config import Recipe
from engine.data.collate import WithTextInputs, collate
from engine.data.normalize import on_device
from engine.data.sampler import ExactDistributedSampler, training_sampler
from engine.build import build_task
from engine.checkpoints.lora import save_lora_adapter
from engine.tasks import write_predictions
from engine.trainer import checkpoint, step_check
from engine.faults import RunStopped, fault
from engine.trainer.logs import RunLog
from engine.trainer.seeding import SeededDataset, SeededSampler, micro_batch_seed, seed_model_rng

logger = logging.getLogger("engine")


_SAME_SIGNAL_S = 1.0  # a second SIGINT/SIGTERM sooner than this after the first is the same request


def _ignore_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the training process, which saves before it exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def training_dataloader(ds, run, build_inputs, *, world: int, rank: int, epoch: int, start_micro: int = 0,
                        pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A rank's training DataLoader over ``ds`` for ``epoch``, from micro-batch ``start_micro`` on: the trainer's
    (``Trainer.train_loader`` wraps it so images arrive normalised on the device) and bench/loader_speed.py's.

    ``run``: the recipe's run section (micro batch, workers, seed); ``build_inputs(prompts, targets, lean=...)``:
    the model's text side (``VisionLanguageModel.text.build_inputs``), run in the workers' collate.
    Every rank gets the same number of samples (DeepSpeed steps in lockstep); several datasets are drawn in
    the shares of run.train_dataset_ratios. Augmentation depends only on (seed, epoch, sample): see seeding.py.
    The loader has its own generator: a DataLoader draws its workers' base seed when an iterator starts, and
    drawn from the global generator that would move the stream dropout uses between a checkpoint's restore and
    the next step."""
    sampler = training_sampler(ds, world, rank, seed=run.seed, batch_size=run.batch_size_train)
    sampler.set_epoch(epoch)
    sampler.set_start(start_micro * run.batch_size_train)
    return torch.utils.data.DataLoader(
        SeededDataset(ds, replace_unreadable=True), batch_size=run.batch_size_train,
        sampler=SeededSampler(sampler, run.seed, epoch),
        # Token ids, padding and masked labels are made here, in the workers (engine/models/wrapper.py TextInputs).
        collate_fn=WithTextInputs(partial(build_inputs, lean=True)),
        num_workers=run.num_workers, pin_memory=pin_memory, drop_last=False,
        worker_init_fn=_ignore_signals, generator=torch.Generator().manual_seed(run.seed + epoch),
    )


class _NanGradient(torch.autograd.Function):
    """Test-only fault (ENGINE_FAULT=nan_grad_at_step:N): the identity forward, a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Trainer:
    def __init__(self, engine, recipe: Recipe, datasets: Dict[str, Any], *, rank: int, world_size: int,
                 micro_batches_per_epoch: int, output_dir: str, base: Optional[Dict[str, Any]] = None):
        self.engine = engine
        self.model = engine.module
        self.recipe = recipe
        self.run = recipe.run
        self.datasets = datasets
        self.rank, self.world = rank, world_size
        self.output_dir = output_dir
        self.ckpt_root = os.path.join(output_dir, "checkpoints")
        self.device = engine.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.run.precision, torch.float32)
        self.stage3 = engine.zero_optimization_stage() == 3
        self.micro_per_epoch = micro_batches_per_epoch
        self.log = RunLog(output_dir, enabled=rank == 0)
        self.task = build_task(recipe)
        # Where the frozen weights come from (checkpoint.describe_base); checkpoints leave them out unless asked
        # (run.save_frozen) or the base cannot be rebuilt.
        self.base = base
        self.save_frozen = self.run.save_frozen or base is None or not base.get("reproducible", False)
        # Progress, saved in every checkpoint.
        self.global_step = 0
        self.epoch = 0
        self.micro_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.best_score: Optional[float] = None
        self.best_tag: Optional[str] = None
        self.evals_without_improvement = 0
        # Faults (docs/reliability.md).
        self.bad_steps_in_row = 0
        self.bad_samples = 0  # unreadable images this rank replaced during training
        self._replaced: List[Dict[str, Any]] = []  # their records, until rank 0 wrote them
        self._signals = 0
        self._first_signal = 0.0  # time.monotonic() of the first SIGINT/SIGTERM
        self._stop_reason: Optional[str] = None
        self._nan_injected = False
        self._previous_handlers: Dict[int, Any] = {}
        # The vote (_agree) all-reduces host flags: on GPU runs it goes over a gloo group.
        self._vote_group = None
        if world_size > 1 and dist.get_backend() != "gloo":
            self._vote_group = dist.new_group(backend="gloo")
        # ZeRO-1/2: the vote runs once per optimizer step, inside DeepSpeed's step, on the gradient norm
        # (step_check.py): one host read per step. Elsewhere it runs on each micro-batch's loss.
        self._step_vote = step_check.install(engine, self._vote_on_norm)
        self._loss_bad: Optional[torch.Tensor] = None  # this step's micro-batch had a non-finite loss (device)
        self._step_skipped = False  # the last optimizer step was skipped by the vote on its gradient norm
        self._loss: Optional[torch.Tensor] = None  # this step's loss, for the vote to read with the norm
        self._step_loss: Optional[float] = None  # ... and its value, read there
        self._step_norm: Optional[float] = None  # the gradient norm, read there too

    # ------------------------------------------------------------------ data
    def train_loader(self, epoch: int, start_micro: int):
        split = self.run.train_splits[0]
        ds = self.datasets[split]
        loader = training_dataloader(ds, self.run, self.model.text.build_inputs, world=self.world, rank=self.rank,
                                     epoch=epoch, start_micro=start_micro, pin_memory=self.device.type == "cuda")
        # Images leave the workers as uint8 and are normalised on the device, here.
        return on_device(loader, ds, self.device)

    def eval_loader(self, split: str):
        ds = self.datasets[split]
        n = len(ds) if self.run.max_eval_samples is None else min(len(ds), self.run.max_eval_samples)
        sampler = ExactDistributedSampler(n, self.world, self.rank, shuffle=False)
        return torch.utils.data.DataLoader(ds, batch_size=self.run.batch_size_eval, sampler=sampler,
                                           collate_fn=collate, num_workers=self.run.num_workers,
                                           worker_init_fn=_ignore_signals,
                                           generator=torch.Generator().manual_seed(self.run.seed))

    # ------------------------------------------------------------------ state
    def state(self) -> Dict[str, Any]:
        return {"global_step": self.global_step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                "best_score": self.best_score, "best_tag": self.best_tag,
                "evals_without_improvement": self.evals_without_improvement, "world_size": self.world,
                "zero_stage": self.engine.zero_optimization_stage(),
                # Samples of the current epoch already trained on, over all ranks: the data position in a form
                # that does not depend on the layout (a resume on another number of ranks converts it).
                "samples_in_epoch": self.micro_in_epoch * self.run.batch_size_train * self.world,
                "bad_samples": self.bad_samples,
                "base": self.base,
                "recipe": self.recipe.to_dict()}

    def resume(self, ckpt_dir: str, universal: Optional[str] = None) -> None:
        """Continue from ``ckpt_dir``; ``universal``: its universal form, for another number of ranks or
        ZeRO stage (engine/trainer/reshape.py)."""
        saved_world = checkpoint.read_state(ckpt_dir).get("world_size")
        same_ranks = saved_world in (None, self.world)
        st = checkpoint.load(self.engine, ckpt_dir, universal=universal, restore_rng=same_ranks)
        self.global_step, self.epoch, self.micro_in_epoch = st["global_step"], st["epoch"], st["micro_in_epoch"]
        old_run = st["recipe"]["run"]
        per_micro = self.run.batch_size_train * self.world
        if (old_run["batch_size_train"], saved_world) != (self.run.batch_size_train, self.world):
            # Another layout: the position is the samples already taken this epoch, in micro-batches of this
            # run, at an optimizer-step boundary.
            taken = st.get("samples_in_epoch", self.micro_in_epoch * old_run["batch_size_train"] * saved_world)
            micro = taken // per_micro
            micro -= micro % self.run.accum_grad_iters
            if micro * per_micro != taken:
                logger.warning("the checkpoint stopped %d samples into epoch %d; with %d samples per micro-batch "
                               "over all ranks this run goes on from sample %d", taken, self.epoch, per_micro,
                               micro * per_micro)
            logger.info("data position: %d samples into epoch %d = micro-batch %d of each of %d rank(s)", taken,
                        self.epoch, micro, self.world)
            self.micro_in_epoch = micro
        if not same_ranks:
            logger.info("RNG states: the checkpoint has %d rank(s), this run %d; each rank keeps its seeded RNG "
                        "(augmentation is seeded per sample and does not depend on it)", saved_world, self.world)
        self.best_score, self.best_tag = st.get("best_score"), st.get("best_tag")
        self.evals_without_improvement = st.get("evals_without_improvement", 0)
        self.bad_samples = st.get("bad_samples", 0)
        if self.micro_in_epoch >= self.micro_per_epoch:
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0
        logger.info("resumed from %s: step %d, epoch %d, micro-batch %d", ckpt_dir, self.global_step,
                    self.epoch, self.micro_in_epoch)

    def load_weights(self, ckpt_dir: str) -> None:
        """Model weights only (evaluation of a finished run)."""
        checkpoint.load(self.engine, ckpt_dir, module_only=True)
        logger.info("loaded weights from %s", ckpt_dir)

    def _write_adapter(self, folder: str) -> None:
        # Collective under ZeRO (fp32 master weights, ZeRO-3 gathers): runs on every rank, rank 0 writes.
        save_lora_adapter(self.engine, os.path.join(folder, "adapter"), recipe=self.recipe.to_dict())

    def save(self, tag: str) -> str:
        writer = self._write_adapter if self.recipe.model.lora is not None and not self.recipe.model.adapter else None
        path = checkpoint.save(self.engine, self.ckpt_root, tag, self.state(), extra_writer=writer,
                               save_frozen=self.save_frozen)
        checkpoint.prune(self.ckpt_root, self.run.keep_last, protect=[tag, self.best_tag or ""])
        logger.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ train
    def train_step(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, bool]:
        """One micro-batch: forward, backward, and DeepSpeed's step (which updates the weights only at the
        accumulation boundary), with the ranks' vote on non-finite values. Returns the loss, still on the
        device (its value is read in ``_flush``), and whether the micro-batch was skipped because a rank's
        loss (or the step's gradient norm) was not finite.

        Without accumulation under ZeRO-1/2 the vote runs inside the optimizer step, on the gradient norm and
        this micro-batch's loss (``_vote_on_norm``): the step's one host read. Otherwise each micro-batch's
        loss is voted on before its backward (``_vote``), so a bad micro-batch of an accumulation window
        can be left out of it."""
        self._inject_raise()
        # Dropout draws from a stream seeded by the micro-batch's place in the run (seeding.py): the same masks
        # after a resume, on any number of ranks, whatever ran in between (evaluation, a save).
        chunk = self.micro_in_epoch * self.world + self.rank
        seed_model_rng(micro_batch_seed(self.run.seed, self.epoch, chunk), self.device)
        loss = self._inject_nan(self.engine(**self._model_inputs(batch)))
        self._step_skipped, self._step_loss = False, None
        if self._step_vote and self.run.accum_grad_iters == 1:
            self._loss = loss.detach()
            self._loss_bad = ~torch.isfinite(self._loss)
            self.engine.backward(loss)
            self.engine.step()  # runs _vote_on_norm; skips the update when it says so
            self._loss_bad = self._loss = None
            return loss.detach(), self._step_skipped
        if self._vote(loss):
            if self.run.accum_grad_iters > 1:
                # Skipping backward and step here would shift DeepSpeed's accumulation boundary by one
                # micro-batch; a backward of zero through every trained weight keeps it, and ZeRO's gradient
                # hooks fire as usual (this micro-batch adds a zero gradient).
                zero = sum((p * 0.0).sum() for p in self.model.parameters() if p.requires_grad)
                self.engine.backward(zero)
                self.engine.step()
            return loss.detach(), True
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        if boundary and self.dtype != torch.float16 and not self.engine.was_step_applied():
            # Finite losses, but DeepSpeed dropped the update: its optimizer found the gradient norm non-finite
            # (ZeRO-3 checks it in every step; fp16's loss-scale overflows are left to DeepSpeed). A host flag,
            # no read. The step is a bad one, as when the vote on the norm skips it.
            self._step_skipped = True
            return loss.detach(), self.run.accum_grad_iters == 1
        return loss.detach(), False

    def _model_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The model's arguments on the device. The loader pins its batches on a GPU, so these copies are
        asynchronous; the images arrived there already (normalize.on_device)."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch["inputs"].items()}
        return {"image": batch["image"].to(self.device, non_blocking=True), "inputs": inputs}

    # ------------------------------------------------------------------ faults
    def _vote(self, loss: torch.Tensor) -> bool:
        """Every rank learns whether any rank saw a non-finite loss (then all skip it), received
        SIGINT/SIGTERM or replaced more unreadable images than allowed (then all stop at the same optimizer
        step). One host read of the loss's finiteness and one tiny all-reduce on the CPU."""
        return self._agree(not bool(torch.isfinite(loss)))

    def _vote_on_norm(self, norm: torch.Tensor) -> Tuple[float, bool]:
        """The vote inside an optimizer step (step_check.py): the global gradient norm (DeepSpeed marks an
        inf/NaN one -1) and this rank's loss flag reach the host in one read. Returns the norm and whether
        every rank skips the step."""
        parts = [norm.detach().float().reshape(1)]
        if self._loss_bad is not None:  # one micro-batch per step: its loss comes along, for the log (_flush)
            parts += [self._loss_bad.float().reshape(1), self._loss.float().reshape(1)]
        values = torch.cat(parts).tolist()  # the step's one wait for the device
        value = values[0]
        bad = not math.isfinite(value) or value < 0 or (len(values) > 1 and values[1] > 0)
        if len(values) > 1:
            self._step_loss, self._step_norm = values[2], value
        skip = self._agree(bad)
        self._step_skipped = skip
        return (value if math.isfinite(value) and value >= 0 else float("inf")), skip

    def _agree(self, nonfinite: bool) -> bool:
        """All ranks agree on this rank's verdict and on the run's host-side news (signals, unreadable
        images): a MAX all-reduce of four flags on a CPU group. Returns whether any rank saw a non-finite
        value."""
        mine = [nonfinite, self._signals > 0, self.bad_samples > self.run.max_bad_samples, bool(self._replaced)]
        if self.world > 1:  # host values over a CPU (gloo) group: no wait for the device
            flags = torch.tensor([float(x) for x in mine])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._vote_group)
            mine = [bool(x) for x in flags.tolist()]
        nonfinite, interrupted, too_many, replaced = mine
        if replaced:  # some rank replaced unreadable images: rank 0 records them for all
            self._append_jsonl("bad_samples.jsonl", self._gather(self._replaced))
            self._replaced = []
        if self._stop_reason is None and interrupted:
            self._stop_reason = "interrupted"
        elif self._stop_reason is None and too_many:
            self._stop_reason = "bad_samples"
        return nonfinite

    def _inject_raise(self) -> None:
        if fault("raise_at_step") == f"{self.rank}:{self.global_step + 1}":
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.global_step + 1}")

    def _inject_nan(self, loss: torch.Tensor) -> torch.Tensor:
        step = self.global_step + 1
        grad_at = fault("nan_grad_at_step")
        if grad_at is not None and int(grad_at) == step and not self._nan_injected:
            self._nan_injected = True
            return _NanGradient.apply(loss)  # a finite loss whose gradients are NaN
        once, since = fault("nan_loss_at_step"), fault("nan_loss_from_step")
        if (once is not None and int(once) == step and not self._nan_injected) or \
                (since is not None and step >= int(since)):
            self._nan_injected = True
            return loss * float("nan")
        return loss

    def _gather(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Every rank's ``items``, in rank order (a collective: all ranks call it at the same point)."""
        if self.world == 1:
            return list(items)
        parts: List[Any] = [None] * self.world
        dist.all_gather_object(parts, list(items), group=self._vote_group)
        return [x for part in parts for x in part]

    def _append_jsonl(self, name: str, rows: List[Dict[str, Any]]) -> None:
        """Only global rank 0 writes the run's files (on a shared disk, ranks of several nodes appending to
        one file could interleave their lines)."""
        if self.rank != 0 or not rows:
            return
        with open(os.path.join(self.output_dir, name), "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def _note_bad_step(self, batch: Dict[str, Any], loss: torch.Tensor) -> None:
        """Every rank skipped this micro-batch (the vote is unanimous): record each rank's samples."""
        entry = {"step": self.global_step + 1, "epoch": self.epoch, "rank": self.rank, "loss": str(float(loss)),
                 "sample_ids": [str(i) for i in batch.get("sample_id", [])]}
        self._append_jsonl("bad_steps.jsonl", self._gather([entry]))
        if self.rank == 0:
            logger.warning("step %d skipped: non-finite loss on some rank (%d in a row; run.max_bad_steps=%d); "
                           "batch listed in bad_steps.jsonl", self.global_step + 1, self.bad_steps_in_row + 1,
                           self.run.max_bad_steps)

    def _note_replaced(self, batch: Dict[str, Any]) -> None:
        """Images that became unreadable after the dataset check were replaced (seeding.py): record them."""
        replaced = [r for rs in batch.pop("replaced", None) or [] for r in rs]
        if not replaced:
            return
        self.bad_samples += len(replaced)
        # Written by rank 0 after the next vote (_agree), which tells every rank that there is news.
        self._replaced += [{**r, "epoch": self.epoch, "step": self.global_step + 1, "rank": self.rank}
                           for r in replaced]
        for r in replaced:
            logger.warning("rank %d: %s; replaced by sample %s (%d replaced, run.max_bad_samples=%d)", self.rank,
                           r["error"], r["replaced_by"], self.bad_samples, self.run.max_bad_samples)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._signals and now - self._first_signal < _SAME_SIGNAL_S:
            # On a cluster one request often arrives twice: SLURM signals every process of the job step and
            # the deepspeed launcher passes its own copy on to the ranks. Taken as the same request.
            return
        self._signals += 1
        self._first_signal = self._first_signal or now
        if self._signals > 1:
            sys.stderr.write(f"\n{name} again: exiting now, without saving\n")
            sys.stderr.flush()
            os._exit(130)
        sys.stderr.write(f"\n{name}: saving a checkpoint after this optimizer step, then exiting "
                         f"(send it again, a second or more later, to exit at once)\n")
        sys.stderr.flush()

    def _stop(self, saved: Optional[str]) -> None:
        """Save (unless this step was just saved) and leave the run with the reason's exit code."""
        path = saved or self.save(f"step{self.global_step}")
        out = self.output_dir
        if self._stop_reason == "interrupted":
            raise RunStopped(f"interrupted by a signal; saved {path} (step {self.global_step}); "
                             f"continue with --resume", RunStopped.INTERRUPTED)
        if self._stop_reason == "bad_steps":
            raise RunStopped(
                f"{self.bad_steps_in_row} optimizer steps in a row had a non-finite loss (run.max_bad_steps="
                f"{self.run.max_bad_steps}); the last good state is saved in {path}; the batches are listed in "
                f"{os.path.join(out, 'bad_steps.jsonl')}. Lower run.init_lr (or use fp32/bf16) or fix the data, "
                f"then --resume", RunStopped.FAULT_LIMIT)
        raise RunStopped(
            f"more than run.max_bad_samples={self.run.max_bad_samples} images could not be read during training "
            f"(listed in {os.path.join(out, 'bad_samples.jsonl')}); saved {path}. Restore the images "
            f"(tools/check_dataset.py) or raise run.max_bad_samples, then --resume", RunStopped.FAULT_LIMIT)

    def _flush(self, pending: List[Dict[str, Any]], since: float, bar) -> float:
        """Write the optimizer steps in ``pending`` (one steps.jsonl line and TensorBoard point each).

        Their losses are averaged over ranks with one all-reduce and read with one device->host copy
        for the whole window, instead of a collective and a host sync after every step: the host keeps
        queueing work while the device computes. samples/s is the window's rate (every step of the
        window gets it), measured up to this point. Returns the start of the next window.
        """
        if not pending:
            return since
        if all(isinstance(p["loss"], float) for p in pending):
            # Read already, with the step's vote (_vote_on_norm): averaged over ranks on the CPU group.
            losses = [p["loss"] for p in pending]
            if self.world > 1:
                mean = torch.tensor(losses, dtype=torch.float64)
                dist.all_reduce(mean, group=self._vote_group)
                losses = (mean / self.world).tolist()
        else:
            stacked = torch.stack([torch.as_tensor(p["loss"], dtype=torch.float64, device=self.device)
                                   for p in pending])
            if self.world > 1:
                dist.all_reduce(stacked)
                stacked /= self.world
            losses = stacked.tolist()  # the one wait for the device
        now = time.perf_counter()
        rate = sum(p["samples"] for p in pending) * self.world / max(now - since, 1e-9)
        peak = _peak_mem_gb(self.device)
        rows = []
        for p, loss in zip(pending, losses):
            norm = p["grad_norm"]
            values = {
                "loss": loss,
                "lr": p["lr"],
                "grad_norm": float(norm) if norm is not None else 0.0,  # None: DeepSpeed did not compute it
                "samples_per_s": rate,
                "peak_mem_gb": peak,
                "epoch": p["epoch"],
            }
            rows.append((p["step"], values))
        self.log.steps(rows)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        logger.info("step %d epoch %.2f loss %.4f lr %.3e grad_norm %.3f %.1f samples/s", pending[-1]["step"],
                    values["epoch"], values["loss"], values["lr"], values["grad_norm"], rate)
        pending.clear()
        return now

    def fit(self) -> None:
        r = self.run
        total_steps = self.total_steps()
        # The bar is for people watching a terminal; logs and CI get the periodic log lines instead.
        bar = tqdm(total=total_steps, initial=self.global_step, desc="train", dynamic_ncols=True,
                   disable=self.rank != 0 or not sys.stderr.isatty())
        # Optimizer steps not yet written. They are written every log_freq steps (and at step 1, before
        # every checkpoint and at the end of an epoch), still one entry per step: see _flush.
        pending: List[Dict[str, Any]] = []
        window_loss, window_n, samples = None, 0, 0
        since = time.perf_counter()
        stop = False
        good_n = 0  # micro-batches of the window with a finite loss
        window_bad = False
        for sig in (signal.SIGINT, signal.SIGTERM):  # restored in close()
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        while self.epoch < r.max_epoch and not stop:
            self.model.train()
            loader = self.train_loader(self.epoch, self.micro_in_epoch)
            for batch in loader:
                if self.micro_in_epoch >= self.micro_per_epoch:
                    break  # every rank stops after the same number of micro-batches
                self._note_replaced(batch)
                loss, skipped = self.train_step(batch)
                if self._step_skipped and r.accum_grad_iters > 1:
                    # Finite losses but a non-finite gradient norm: DeepSpeed dropped the window's update.
                    window_bad = True
                if skipped:
                    self._note_bad_step(batch, loss)
                    window_bad = True
                else:
                    loss = loss.double()
                    window_loss = loss if window_loss is None else window_loss + loss
                    good_n += 1
                window_n += 1
                samples += len(batch["prompt"])
                self.micro_in_epoch += 1
                if window_n < r.accum_grad_iters:
                    continue  # DeepSpeed only stepped the optimizer at the accumulation boundary
                if good_n == 0 and r.accum_grad_iters == 1:
                    # Skipped: no optimizer step happened, so the next batch becomes this step.
                    self.bad_steps_in_row += 1
                    window_loss, window_n, good_n, window_bad, samples = None, 0, 0, False, 0
                    if self.bad_steps_in_row >= r.max_bad_steps and self._stop_reason is None:
                        self._stop_reason = "bad_steps"
                    if self._stop_reason is not None:
                        since = self._flush(pending, since, bar)
                        self._stop(None)
                    continue
                self.bad_steps_in_row = self.bad_steps_in_row + 1 if window_bad else 0
                self.global_step += 1
                if good_n == 0:  # every micro-batch of the window was skipped: the step logs NaN
                    window_loss, good_n = torch.full((), float("nan"), dtype=torch.float64, device=self.device), 1
                pending.append({
                    "step": self.global_step,
                    # A float when the step's vote read it (_vote_on_norm), else still on the device.
                    "loss": self._step_loss if self._step_loss is not None else window_loss / good_n,
                    "lr": self.engine.get_lr()[0],
                    # Read with the vote (a float), else a fresh tensor (or float) per step from DeepSpeed.
                    "grad_norm": (self._step_norm if self._step_loss is not None
                                  else self.engine.get_global_grad_norm()),
                    "samples": samples,
                    "epoch": self.epoch + self.micro_in_epoch / self.micro_per_epoch,
                })
                window_loss, window_n, good_n, window_bad, samples = None, 0, 0, False, 0
                bar.update(1)
                save = bool(r.save_every_steps) and self.global_step % r.save_every_steps == 0
                stop = r.max_steps is not None and self.global_step >= r.max_steps
                if save or stop or self.global_step % r.log_freq == 0 or self.global_step == 1:
                    since = self._flush(pending, since, bar)
                saved = None
                if save:
                    saved = self.save(f"step{self.global_step}")
                    since = time.perf_counter()  # the save's time is not training throughput
                if self.bad_steps_in_row >= r.max_bad_steps and self._stop_reason is None:
                    self._stop_reason = "bad_steps"
                if self._stop_reason is not None:
                    since = self._flush(pending, since, bar)
                    self._stop(saved)
                if stop:
                    break
            since = self._flush(pending, since, bar)  # the epoch's last steps, before its checkpoint
            finished_epoch = self.micro_in_epoch >= self.micro_per_epoch
            tag = f"epoch{self.epoch}" if finished_epoch else f"step{self.global_step}"
            if finished_epoch:
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
            self.save(tag)
            if r.val_freq and r.valid_splits and (self.epoch % r.val_freq == 0 or stop or self.epoch >= r.max_epoch):
                if self.validate(tag):
                    stop = True
            since = time.perf_counter()
        bar.close()
        if r.test_splits:
            self.test()

    def total_steps(self) -> int:
        return total_optimizer_steps(self.micro_per_epoch, self.run)

    # ------------------------------------------------------------------ eval
    def evaluate_split(self, split: str, tag: str) -> Optional[Dict[str, float]]:
        r = self.run
        self.model.eval()
        predictions, metrics = self.task.evaluate(self.model, self.eval_loader(split), device=self.device,
                                                  dtype=self.dtype, synced_gpus=self.stage3)
        self.model.train()
        if self.rank == 0 and predictions is not None:
            write_predictions(predictions, os.path.join(self.output_dir, "predictions", f"{split}_{tag}.json"))
        if metrics:
            logger.info("eval %s @ %s: %s", split, tag, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            self.log.eval(self.global_step, self.epoch, split, metrics, samples=(predictions or [])[:5])
        return metrics

    def validate(self, tag: str) -> bool:
        """Evaluate the valid splits; promote ``best``; return True when early stopping says stop."""
        r = self.run
        first = None
        for split in r.valid_splits:
            m = self.evaluate_split(split, tag)
            first = m if first is None else first
        if not first:
            return False
        score = self.task.best_score(first)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_tag = score, tag
            self.evals_without_improvement = 0
            checkpoint.promote_best(self.ckpt_root, tag)
            logger.info("new best %s = %.4f at %s", self.task.best_metric, score, tag)
        else:
            self.evals_without_improvement += 1
        return bool(r.patience) and self.evals_without_improvement >= r.patience

    def test(self) -> None:
        best = os.path.join(self.ckpt_root, "best")
        if checkpoint.is_complete(best):
            checkpoint.load(self.engine, best)
        for split in self.run.test_splits:
            self.evaluate_split(split, "best" if checkpoint.is_complete(best) else "last")

    def close(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        self.log.close()


def total_optimizer_steps(micro_per_epoch: int, run) -> int:
    """Optimizer steps of the whole run: every epoch, or fewer when run.max_steps stops it earlier."""
    total = micro_per_epoch // run.accum_grad_iters * run.max_epoch
    return min(total, run.max_steps) if run.max_steps is not None else total


def micro_batches_per_epoch(num_samples: int, world: int, batch_size: int, accum: int) -> int:
    """Micro-batches every rank runs per epoch: whole global batches only, a multiple of ``accum``."""
    per_rank = num_samples // world  # every rank has at least this many samples
    micro = per_rank // batch_size
    micro -= micro % accum
    if micro < accum:
        raise ValueError(
            f"the training split has {num_samples} samples: too few for {world} rank(s) x batch "
            f"{batch_size} x accumulation {accum}; lower run.batch_size_train or run.accum_grad_iters"
        )
    return micro


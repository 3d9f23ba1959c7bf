"""Training throughput: the engine's loop next to a bare DeepSpeed loop and transformers' Trainer.

    python bench/train_throughput.py                             # tiny + small model, this machine
    python bench/train_throughput.py --write docs/benchmarks.md  # also rewrite "Training throughput" there
    python bench/train_throughput.py --smoke                     # tiny model, a few steps: checks that it runs

Three loops train the same model on the same data with the same micro batch, precision, ZeRO stage and
DeepSpeed config (the recipe's ds_config filled by engine/deepspeed_config.py, as engine/train.py does):

  engine   engine/train.py's path: deepspeed.initialize with the engine's parameter groups and LR schedule,
           then ``engine.trainer.loop.Trainer.fit`` (its DataLoader, train_step and per-step logging to
           steps.jsonl, TensorBoard and train.log) -- only the loader is wrapped, to read the clock.
  bare     deepspeed.initialize the same way, then nothing but: batch to the device, forward, backward, step,
           over batches collated before the clock starts.
  Trainer  transformers' Trainer with TrainingArguments(deepspeed=<the same dict>), its own DataLoader over the
           same dataset and collate function; compute_loss returns the model's loss.

Each loop runs in its own process (so peak memory is its own) and waits on a pipe between chunks of steps;
the parent runs the three in turn, round after round, so they see the same machine load. Step time is the
time between the starts of consecutive steps (everything the loop does per step); the reported step time
is the median over all measured steps, and a ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the engine
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench/flops.py, bench/report.py (when imported)
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Training throughput"
METHODS = ("engine", "bare", "trainer")
LABELS = {"engine": "engine (engine/train.py loop)", "bare": "bare DeepSpeed loop",
          "trainer": "transformers Trainer + DeepSpeed"}


@dataclasses.dataclass
class Bench:
    """One model to compare: overrides of a recipe (default: the tiny default's), the micro batch, image size."""

    name: str
    description: str
    options: List[str]
    batch: int
    image_size: int
    zoo: Optional[Dict[str, Any]] = None  # extra blip2_opt zoo entry: {"name", "defaults", "config"}
    threads: Optional[int] = None  # torch CPU threads per loop (None: torch's default)
    precision: str = "bf16"
    deepspeed: str = "ds_configs/zero2.json"
    recipe: str = os.path.join(ROOT, "recipes", "tiny_sherlock.yaml")


def _small_zoo() -> Dict[str, Any]:
    """A BLIP-2 OPT of ~65M parameters: the real classes at reduced width and depth, random init.

    Frozen ViT and OPT, trained Q-Former, as the real recipes; OPT's real vocabulary (50272), so the
    LM head costs what it costs at full size relative to the layers.
    """
    from engine.models.zoo import opt_text_config

    return {
        "name": "bench_small",
        "defaults": {"max_txt_len": 32, "prompt": "", "image_size": 160},
        "config": dict(
            vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                               image_size=160, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True,
                               initializer_range=0.02),
            qformer_config=dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
                                cross_attention_frequency=2, encoder_hidden_size=384),
            text_config=opt_text_config(512, 6, 8, 2048),
            num_query_tokens=32,
        ),
    }


def benches(smoke: bool = False) -> Dict[str, Bench]:
    return {
        "tiny": Bench("tiny", "tiny BLIP-2 OPT (0.18M parameters, all trained), 64 px",
                      ["model.model_type=tiny"], batch=4 if smoke else 16, image_size=64),
        "small": Bench("small", "small BLIP-2 OPT (65M parameters: ViT 11M and OPT 46M frozen, Q-Former 8.5M "
                                "trained), 160 px",
                       ["model.model_type=bench_small", "model.pretrained=random", "model.freeze_vit=true",
                        "model.freeze_llm=true"], batch=2 if smoke else 8, image_size=160, zoo=_small_zoo()),
    }


# --------------------------------------------------------------------------- data


class SyntheticCaptions:
    """``n`` samples shaped like the engine's training batches: a normalised float image, the recipe's
    prompt and a Sherlock-style inference. Images come from a small seeded pool (no decoding: this
    benchmark is about the training loop, bench/data_pipeline.py measures the loaders). With
    ``length_of`` (text -> the model's input length), only the inferences of the largest length are used, so
    every batch has the same shape whichever samples a loop's sampler draws: the three loops do the same
    work per step."""

    def __init__(self, n: int, image_size: int, prompt: str, seed: int = 0, pool: int = 32,
                 length_of: Optional[Callable[[str], int]] = None):
        import torch

        from engine.data.synthetic import COLOURS, SHAPES, inference_for

        g = torch.Generator().manual_seed(seed)
        self.images = [torch.randn(3, image_size, image_size, generator=g) for _ in range(pool)]
        texts = [inference_for(c, s) for c in COLOURS for s in SHAPES]
        if length_of is not None:
            lengths = [length_of(t) for t in texts]
            texts = [t for t, n in zip(texts, lengths) if n == max(lengths)]
        self.texts = texts
        self.prompt = prompt
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"image": self.images[i % len(self.images)], "prompt": self.prompt,
                "text_output": self.texts[i % len(self.texts)]}

    def batch(self, start: int, size: int) -> Dict[str, Any]:
        from engine.data.collate import collate

        return collate([self[i] for i in range(start, start + size)])


# --------------------------------------------------------------------------- the worker side


class Stop(Exception):
    """The parent has no more chunks for this loop."""


class Clock:
    """Times the loop it is called from and hands control back to the parent between chunks of steps.

    ``tick()`` is called at the start of every step. The first tick reports ready; afterwards, once the
    requested number of steps have run, it sends their durations (start of step k to start of step
    k + 1) and waits for the next request. Waiting happens outside every measured interval.
    """

    def __init__(self, conn, info: Dict[str, Any]):
        self.conn, self.info = conn, info
        self.times: List[float] = []
        self.want = 0
        self.last: Optional[float] = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        if self.last is None or len(self.times) >= self.want:
            self.conn.send(("ready", self.info) if self.last is None else ("times", self.times))
            cmd = self.conn.recv()
            if cmd[0] == "stop":
                raise Stop
            self.want, self.times = int(cmd[1]), []
            now = time.perf_counter()
        self.last = now

    def wrap(self, batches):
        for batch in batches:
            self.tick()
            yield batch


def peak_memory_gb(device) -> float:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _recipe(bench: Bench, out_dir: str):
    from engine.config import load_recipe

    options = [
        *bench.options,
        f"run.batch_size_train={bench.batch}", f"run.precision={bench.precision}", f"run.deepspeed={bench.deepspeed}",
        "run.accum_grad_iters=1", "run.max_epoch=1", "run.val_freq=0", "run.num_workers=0",
        f"run.output_dir={out_dir}",
    ]
    return load_recipe(bench.recipe, options)


def _initialize(recipe, model, steps_per_epoch: int):
    """deepspeed.initialize exactly as engine/train.py calls it."""
    import deepspeed

    from engine.deepspeed_config import fill_ds_config, normalize_cuda_arch_list
    from engine.trainer.optim import lr_scheduler_factory, param_groups

    r = recipe.run
    normalize_cuda_arch_list()
    ds_config = fill_ds_config(recipe, 1, on_cpu=not _cuda())
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, r.weight_decay), config=ds_config,
        lr_scheduler=lr_scheduler_factory(recipe, steps_per_epoch, steps_per_epoch),
    )
    return engine


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_engine(recipe, model, data, clock: Clock, out_dir: str) -> None:
    from engine.trainer.logs import setup_logging
    from engine.trainer.loop import Trainer, micro_batches_per_epoch

    os.makedirs(out_dir, exist_ok=True)
    setup_logging(out_dir, 0)  # train.log as in a real run; the console stays quiet
    for h in logging.getLogger().handlers:
        if type(h) is logging.StreamHandler:
            h.setLevel(logging.WARNING)
    micro = micro_batches_per_epoch(len(data), 1, recipe.run.batch_size_train, 1)
    engine = _initialize(recipe, model, micro)

    class TimedTrainer(Trainer):
        def train_loader(self, epoch: int, start_micro: int):
            return clock.wrap(super().train_loader(epoch, start_micro))

    trainer = TimedTrainer(engine, recipe, {"train": data}, rank=0, world_size=1, micro_batches_per_epoch=micro,
                           output_dir=out_dir)
    try:
        trainer.fit()
    finally:
        trainer.close()


def run_bare(recipe, model, data, clock: Clock, out_dir: str) -> None:
    import itertools

    B = recipe.run.batch_size_train
    engine = _initialize(recipe, model, len(data) // B)
    device = engine.device
    batches = [data.batch(k * B, B) for k in range(min(len(data) // B, 16))]
    if device.type == "cuda":  # pinned, as the other loops' DataLoaders hand them over: the copy is asynchronous
        for b in batches:
            b["image"] = b["image"].pin_memory()
    engine.train()
    for batch in clock.wrap(itertools.cycle(batches)):
        image = batch["image"].to(device, non_blocking=True)
        loss = engine(image=image, prompt=batch["prompt"], text_output=batch["text_output"])
        engine.backward(loss)
        engine.step()


def run_trainer(recipe, model, data, clock: Clock, out_dir: str) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from engine.data.collate import collate
    from engine.deepspeed_config import fill_ds_config

    r = recipe.run
    cuda = _cuda()
    ds_config = fill_ds_config(recipe, 1, on_cpu=not cuda)
    opt = ds_config["optimizer"]["params"]
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "hf"), deepspeed=ds_config,
        per_device_train_batch_size=r.batch_size_train, gradient_accumulation_steps=r.accum_grad_iters,
        max_grad_norm=r.grad_clip, learning_rate=r.init_lr, weight_decay=r.weight_decay,
        adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"],
        lr_scheduler_type="cosine", warmup_steps=r.warmup_steps, max_steps=len(data) // r.batch_size_train,
        bf16=r.precision == "bf16", fp16=r.precision == "fp16", use_cpu=not cuda,
        logging_steps=r.log_freq, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=r.num_workers, dataloader_pin_memory=cuda, remove_unused_columns=False,
        disable_tqdm=True, seed=r.seed,
    )

    class LossTrainer(Trainer):
        # The model returns its loss (a tensor), not a ModelOutput.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = model(**inputs)
            return (loss, None) if return_outputs else loss

    class Tick(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.tick()

    trainer = LossTrainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Tick()])
    trainer.train()


def step_info(model, data: SyntheticCaptions, batch: int) -> Dict[str, Any]:
    """Parameter counts, the LLM sequence length and the model FLOPs of one step (bench/flops.py)."""
    from flops import blip2_opt_step_flops, trained_parts

    summary = model.parameter_summary()["all"]
    b = data.batch(0, batch)
    seq_len = model.build_inputs(b["prompt"], b["text_output"])["input_ids"].shape[1]
    vit, qformer, llm = trained_parts(model.hf)
    flops = blip2_opt_step_flops(model.hf.config, batch, seq_len, train_vit=vit, train_qformer=qformer,
                                 train_llm=llm)
    return {"params": summary["total"], "trainable": summary["trainable"], "seq_len": seq_len,
            "flops_per_step": flops["total"]}


RUNNERS: Dict[str, Callable] = {"engine": run_engine, "bare": run_bare, "trainer": run_trainer}


def worker(method: str, bench: Bench, n_samples: int, out_dir: str, port: int, conn) -> None:
    """Entry of a loop's process: build, then train under the parent's Clock until told to stop."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    if bench.threads:
        # Through the environment too: accelerate (under the Trainer) resets torch's thread count from it.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(bench.threads)
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "worker.log"), "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        import deepspeed
        import torch

        from engine.build import DTYPES, build_model

        if bench.threads:
            torch.set_num_threads(bench.threads)
        if bench.zoo:
            from engine.models.zoo import ZOO_OPT, ZooEntry

            ZOO_OPT[bench.zoo["name"]] = ZooEntry(None, dict(bench.zoo["defaults"]), dict(bench.zoo["config"]))
        recipe = _recipe(bench, out_dir)
        from engine.trainer.topology import init_distributed

        init_distributed()
        deepspeed.runtime.utils.set_random_seed(recipe.run.seed)
        # As engine/train.py builds it: in the run's dtype, on the rank's GPU (ZeRO-1/2), if there is one.
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else None
        model = build_model(recipe, dtype=DTYPES[recipe.run.precision], device=device)
        prompt = recipe.model.prompt
        data = SyntheticCaptions(n_samples, bench.image_size, prompt, seed=recipe.run.seed,
                                 length_of=lambda t: model.build_inputs([prompt], [t])["input_ids"].shape[1])
        info = step_info(model, data, recipe.run.batch_size_train)
        info["threads"] = torch.get_num_threads()
        clock = Clock(conn, info)
        RUNNERS[method](recipe, model, data, clock, out_dir)
        conn.send(("error", f"{method}: the loop ended before the benchmark did (too few samples)"))
    except Stop:
        import torch

        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        conn.send(("done", {"peak_mem_gb": peak_memory_gb(dev)}))
    except BaseException:  # noqa: BLE001 -- reported to the parent, which fails loudly
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
        log.flush()
        from multiprocessing import util

        util._run_finalizers()  # unlink named semaphores (tqdm's lock) that os._exit would leave behind
        os._exit(0)  # skip interpreter teardown (DeepSpeed/TensorBoard threads): the parent has the results


# --------------------------------------------------------------------------- the parent side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loop:
    """The parent's handle on one worker process."""

    def __init__(self, ctx, method: str, bench: Bench, n_samples: int, workdir: str, timeout: float):
        self.method, self.timeout = method, timeout
        self.out_dir = os.path.join(workdir, f"{bench.name}-{method}")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(method, bench, n_samples, self.out_dir, free_port(), child),
                                daemon=True)
        self.proc.start()
        child.close()

    def expect(self, kind: str) -> Any:
        deadline = time.time() + self.timeout
        while not self.conn.poll(1.0):
            if not self.proc.is_alive() or time.time() > deadline:
                raise RuntimeError(f"{self.method}: the worker {'died' if not self.proc.is_alive() else 'timed out'}"
                                   f"; see {self.out_dir}/worker.log\n{self.log_tail()}")
        got, payload = self.conn.recv()
        if got == "error":
            raise RuntimeError(f"{self.method} failed:\n{payload}")
        if got != kind:
            raise RuntimeError(f"{self.method}: expected {kind}, got {got}")
        return payload

    def run(self, steps: int) -> List[float]:
        self.conn.send(("run", steps))
        return self.expect("times")

    def stop(self) -> Dict[str, Any]:
        self.conn.send(("stop",))
        out = self.expect("done")
        self.proc.join(timeout=60)
        return out

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return open(os.path.join(self.out_dir, "worker.log"), encoding="utf-8", errors="replace").read()[-n:]
        except OSError:
            return ""


def compare(bench: Bench, rounds: int, steps: int, warmup: int, workdir: str, log=print,
            timeout: float = 3600) -> Dict[str, Any]:
    """Run the three loops on ``bench`` interleaved; return per-method medians and the ratios."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter per loop: no shared torch/DeepSpeed state
    n_samples = bench.batch * (warmup + rounds * steps + 8)  # one epoch longer than the benchmark
    loops = {m: Loop(ctx, m, bench, n_samples, workdir, timeout) for m in METHODS}
    try:
        info = {m: loop.expect("ready") for m, loop in loops.items()}
        log(f"[{bench.name}] {info['engine']['params']:,} parameters, {info['engine']['trainable']:,} trained, "
            f"batch {bench.batch}, {bench.precision}, {os.path.basename(bench.deepspeed)}, "
            f"{info['engine']['threads']} torch threads")
        for m, loop in loops.items():
            loop.run(warmup)  # first steps: allocations, DeepSpeed's lazy set-up, caches
        per_round: List[Dict[str, List[float]]] = []
        for r in range(rounds):
            order = METHODS[r % 3:] + METHODS[:r % 3]  # rotate who goes first
            times = {m: loops[m].run(steps) for m in order}
            per_round.append(times)
            log(f"[{bench.name}] round {r + 1}/{rounds}: " + ", ".join(
                f"{m} {1e3 * statistics.median(times[m]):.1f} ms" for m in METHODS))
        peaks = {m: loop.stop()["peak_mem_gb"] for m, loop in loops.items()}
    finally:
        for loop in loops.values():
            loop.kill()
    rows = {}
    for m in METHODS:
        all_times = [t for rd in per_round for t in rd[m]]
        step = statistics.median(all_times)
        rows[m] = {"step_ms": 1e3 * step, "samples_per_s": bench.batch / step, "peak_mem_gb": peaks[m],
                   "tflops": info[m]["flops_per_step"] / step / 1e12}
    med = [{m: statistics.median(rd[m]) for m in METHODS} for rd in per_round]
    return {
        "model": bench.name, "description": bench.description, "batch": bench.batch, "precision": bench.precision,
        "deepspeed": bench.deepspeed, "params": info["engine"]["params"], "trainable": info["engine"]["trainable"],
        "seq_len": info["engine"]["seq_len"], "flops_per_step": info["engine"]["flops_per_step"],
        "rounds": rounds, "steps": steps, "warmup": warmup, "rows": rows,
        # engine / bare step time (goal <= 1.03) and engine / Trainer throughput (goal >= 1.0)
        "engine_vs_bare_step_time": statistics.median(x["engine"] / x["bare"] for x in med),
        "engine_vs_trainer_throughput": statistics.median(x["trainer"] / x["engine"] for x in med),
    }


# --------------------------------------------------------------------------- report

INTRO = (
    "The engine's training loop next to a bare DeepSpeed loop and transformers' Trainer on the same model, data, "
    "micro batch, precision and DeepSpeed config (`ds_configs/zero2.json` filled from the recipe), one process "
    "each, interleaved round by round on one machine (the docstring of `bench/train_throughput.py` says what "
    "each loop does).\n"
    "Step time is the median time from the start of one step to the start of the next (everything the loop does "
    "per step); samples/s = micro batch / step time; model TFLOP/s = the step's FLOPs counted as in "
    "`bench/flops.py` / step time. The ratio on the bare-loop row is engine step time / bare step time (goal: at "
    "most 1.03x); on the Trainer row, engine samples/s / Trainer samples/s (goal: at least 1.0x). Both are "
    "medians of per-round ratios.\n"
    "Beyond the bare loop, the engine's step takes its batch from its DataLoader (per-sample seeded "
    "augmentation, collate; one save/restore of the caller's RNG per batch) and records the step; every "
    "`run.log_freq` steps it writes them all (loss averaged over ranks with one all-reduce and read with one "
    "device-to-host copy for the window, one TensorBoard event and one steps.jsonl line per step), so no step "
    "waits for the device or for the other ranks. The Trainer reads the loss (its NaN filter) and the "
    "gradient norm on the host every step."
)


def table(results: List[Dict[str, Any]], command: str, machine: str, device: str, *, title: str = SECTION,
          intro: str = INTRO, peak_tflops: Optional[float] = None) -> str:
    """The markdown section: one row per loop and model, the ratios on the rows they belong to."""
    memory = "peak GPU memory allocated (GiB)" if device == "cuda" else "peak RSS of the process (GiB)"
    mfu_head, mfu_rule = (" MFU |", "---:|") if peak_tflops else ("", "")
    lines = [title, "", intro, "", f"Machine: {machine}.", "",
             f"| model | loop | step time (ms) | samples/s | model TFLOP/s |{mfu_head} {memory} | ratio |",
             f"|---|---|---:|---:|---:|{mfu_rule}---:|---|"]
    for res in results:
        rows = res["rows"]
        model = (f"{res['description']}, batch {res['batch']}, {res['precision']}, "
                 f"{os.path.basename(res['deepspeed'])}; {res['flops_per_step'] / 1e9:,.1f} GFLOP/step")
        for m in METHODS:
            ratio = ""
            if m == "bare":
                ratio = f"engine/bare step time {res['engine_vs_bare_step_time']:.2f}x"
            elif m == "trainer":
                ratio = f"engine/Trainer throughput {res['engine_vs_trainer_throughput']:.2f}x"
            row = rows[m]
            mfu = f" {100 * row['tflops'] / peak_tflops:.1f}% |" if peak_tflops else ""
            lines.append(f"| {model if m == 'engine' else ''} | {LABELS[m]} | {row['step_ms']:.1f} | "
                         f"{row['samples_per_s']:.2f} | {row['tflops']:.3g} |{mfu} {row['peak_mem_gb']:.2f} | {ratio} |")
    runs = "; ".join(f"{r['model']}: {r['rounds']} rounds x {r['steps']} steps per loop after {r['warmup']} "
                     f"warm-up steps" for r in results)
    lines += ["", f"{runs}. Reproduce:", "", "```", command, "```", ""]
    return "\n".join(lines)


def print_result(res: Dict[str, Any], peak_tflops: Optional[float] = None) -> None:
    rows = res["rows"]
    for m in METHODS:
        mfu = f"  MFU {100 * rows[m]['tflops'] / peak_tflops:.1f}%" if peak_tflops else ""
        print(f"{res['model']:6s} {LABELS[m]:34s} {rows[m]['step_ms']:9.1f} ms/step {rows[m]['samples_per_s']:8.2f} "
              f"samples/s {rows[m]['tflops']:8.3g} TFLOP/s{mfu}  peak {rows[m]['peak_mem_gb']:.2f} GiB")
    print(f"{res['model']:6s} engine/bare step time {res['engine_vs_bare_step_time']:.2f}x, "
          f"engine/Trainer throughput {res['engine_vs_trainer_throughput']:.2f}x")


def machine_line(load_before: Optional[str]) -> Tuple[str, str]:
    """(description, "cuda" | "cpu")."""
    import torch

    from report import load_average, machine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    desc = machine(torch.cuda.get_device_name(0) if device == "cuda" else None)
    load_after = load_average()
    if load_before and load_after:
        desc += f"; load average (1/5/15 min) {load_before} before, {load_after} after"
    return desc, device


def command_line(script: str, argv) -> str:
    return f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=None, help="steps per loop per round (default: tiny 20, small 5)")
    p.add_argument("--warmup", type=int, default=3, help="steps per loop before measuring (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per loop (default: torch's choice). On a shared CPU machine, 1 avoids "
                        "the thread-barrier stalls that other processes' load causes")
    p.add_argument("--smoke", action="store_true", help="tiny model, batch 4, 1 round of 2 steps: checks that it runs")
    p.add_argument("--write", metavar="DOC", help="rewrite the 'Training throughput' section of this markdown file")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--workdir", default=None, help="scratch folder for the loops' logs (default: a temporary one)")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.rounds, args.steps, args.warmup = ["tiny"], 1, 2, 1
    from report import load_average

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
    all_benches = benches(args.smoke)
    load_before = load_average()
    results = []
    for name in args.models:
        bench = all_benches[name]
        bench.threads = args.threads
        res = compare(bench, args.rounds, args.steps or {"tiny": 20, "small": 5}[name], args.warmup, workdir)
        print_result(res)
        results.append(res)
    desc, device = machine_line(load_before)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": desc, "device": device, "results": results}, f, indent=1)
    if args.write:
        from report import write_section

        write_section(args.write, SECTION, table(results, command_line("bench/train_throughput.py", argv), desc,
                                                 device))
        print(f"wrote the '{SECTION[3:]}' section of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

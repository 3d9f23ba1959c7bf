"""Bytes and save time of one checkpoint: frozen weights written twice (DeepSpeed's default, what the
engine did before), left out (the default now), and once (``run.save_frozen: true``).

    python bench/checkpoint_size.py                  # prints a markdown table
    python bench/checkpoint_size.py --write          # and puts it in docs/benchmarks.md

Models: the tiny default (recipes/tiny_sherlock.yaml: every part trains) and a BLIP-2 OPT with
OPT-2.7b's real depths (39 ViT layers, 12 Q-Former layers, 32 OPT layers) at the tiny widths, trained
as recipes/sherlock_opt2.7b.yaml does (ViT and LLM frozen, the Q-Former trains), each under ZeRO-2 and
ZeRO-3, one process on the CPU. The full-size figures come from the planner (tools/plan_memory.py),
whose disk formula these measurements check.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Checkpoint size"

MODELS = {
    "tiny default": ("recipes/tiny_sherlock.yaml", [], None),
    "OPT-2.7b depths, tiny widths": ("recipes/tiny_sherlock.yaml", ["model.freeze_vit=true", "model.freeze_llm=true"],
                                     {"vision": 39, "qformer": 12, "text": 32}),
}


def _deep_tiny(depths):
    """Make the tiny configs use ``depths`` layers (the real model's) at their own widths."""
    import engine.models.blip2 as blip2

    original = blip2.tiny_config

    def deep(*args, **kwargs):
        cfg = original(*args, **kwargs)
        cfg.vision_config.num_hidden_layers = depths["vision"]
        cfg.qformer_config.num_hidden_layers = depths["qformer"]
        cfg.text_config.num_hidden_layers = depths["text"]
        return cfg

    blip2.tiny_config = deep
    return original


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def measure(name: str, stage: int, repeats: int, work: str):
    import deepspeed
    import torch

    import engine.models.blip2 as blip2
    from engine.build import build_model
    from engine.config import load_recipe
    from engine.deepspeed_config import fill_ds_config
    from engine.trainer import checkpoint
    from engine.trainer.optim import param_groups

    path, options, depths = MODELS[name]
    original = _deep_tiny(depths) if depths else None
    try:
        recipe = load_recipe(os.path.join(ROOT, path), [f"run.deepspeed=ds_configs/zero{stage}.json", *options],
                             check_files=False)
        model = build_model(recipe, dtype=torch.bfloat16)
    finally:
        if original is not None:
            blip2.tiny_config = original
    from engine.memory import checkpoint_bytes, model_facts

    facts = model_facts(model, recipe.model.prompt)
    planned = {"frozen written twice (before)": dict(frozen_twice=True), "trained only (default)": {},
               "frozen once (save_frozen)": dict(save_frozen=True)}
    base = checkpoint.describe_base(recipe.to_dict()["model"], recipe.run.seed, recipe.run.precision, model)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05),
                                      config=fill_ds_config(recipe, 1, on_cpu=True))
    torch.manual_seed(0)
    loss = engine(image=torch.randn(2, 3, 64, 64).bfloat16(), prompt=["inference: "] * 2,
                  text_output=["a red circle", "two blue squares"])
    engine.backward(loss)
    engine.step()
    state = {"global_step": 1, "base": base, "recipe": recipe.to_dict()}
    rows = []
    for variant in ("frozen written twice (before)", "trained only (default)", "frozen once (save_frozen)"):
        sizes, times = [], []
        for i in range(repeats):
            root = os.path.join(work, f"{stage}-{len(rows)}-{i}")
            start = time.perf_counter()
            if variant.startswith("frozen written twice"):  # the engine's save before: DeepSpeed's defaults
                engine.save_checkpoint(root, tag="t", client_state={"engine_state": state}, save_latest=False)
                torch.save(checkpoint.rng_state(), os.path.join(root, "t", "rng_rank0.pt"))
                folder = os.path.join(root, "t")
            else:
                folder = checkpoint.save(engine, root, "t", state, save_frozen=variant.startswith("frozen once"))
            times.append(time.perf_counter() - start)
            sizes.append(_folder_bytes(folder))
            shutil.rmtree(root)
        plan = checkpoint_bytes(facts, stage=stage, precision=recipe.run.precision, lora=False, **planned[variant])
        rows.append({"model": name, "stage": stage, "params": total, "trained": trained, "variant": variant,
                     "bytes": sizes[0], "planned": plan["total"], "save_s": statistics.median(times)})
    return rows


def full_size() -> list:
    """The planner's bytes per checkpoint for every recipe at full size (meta build, no weights)."""
    import glob

    from engine.config import load_recipe
    from engine.memory import plan

    rows = []
    for path in sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))):
        p = plan(load_recipe(path, check_files=False), suggest=False)
        rows.append((os.path.relpath(path, ROOT), p.stage, p.checkpoint_gb))
    return rows


def table(rows, command: str) -> str:
    out = [SECTION, "",
           "One checkpoint on disk (every file of the checkpoint folder) and the median time of `checkpoint.save`, "
           "bf16, one process on the CPU, after one training step; beside it the planner's figure "
           "(engine/memory.py `checkpoint_bytes`, tensors only: the files add pickling, the recipe and DeepSpeed's "
           "records, a few hundred KB here; under ZeRO-3 these tiny widths keep every parameter below "
           "`stage3_param_persistence_threshold`, whole in the module's state, which the planner does not count). "
           "Before this engine left the frozen weights out, DeepSpeed wrote them in the module's state dict and "
           "again as `frozen_param_fragments` (ZeRO-2; under ZeRO-3 the module holds empty placeholders, so once). "
           "On the CPU the fragment is `param.cpu()`, the module's own tensor, and torch.save stores a shared "
           "tensor once: the 'before' rows measured here hold the frozen weights once. On a GPU the fragment is a "
           "host copy and they are written twice, which is the planner's 'before' figure.", "",
           f"Command: `{command}`", "",
           "| model | ZeRO | params (trained) | checkpoint | bytes | planner bytes | save s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['stage']} | {r['params']:,} ({r['trained']:,}) | {r['variant']} | "
                   f"{r['bytes']:,} | {r['planned']:,} | {r['save_s']:.3f} |")
    out += ["", "At full size, planned (GiB per checkpoint, all ranks' files; `python tools/plan_memory.py --recipe R` "
            "prints it for one recipe):", "",
            "| recipe | ZeRO | frozen written twice (before) | trained only (default) | frozen once (save_frozen) |",
            "|---|---|---|---|---|"]
    for path, stage, c in full_size():
        out.append(f"| {path} | {stage} | {c['frozen_written_twice']:.2f} | {c['trained_only']:.2f} | "
                   f"{c['with_frozen']:.2f} |")
    return "\n".join(out) + "\n"


def write_section(text: str) -> None:
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    with open(path, "r", encoding="utf-8") as f:
        doc = f.read()
    if SECTION in doc:
        start = doc.index(SECTION)
        nxt = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[nxt:] if nxt >= 0 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from engine.trainer.topology import init_distributed

    init_distributed()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in MODELS:
            for stage in (2, 3):
                rows += measure(name, stage, args.repeats, work)
    text = table(rows, "python bench/checkpoint_size.py" + (" --write" if args.write else ""))
    print(text)
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

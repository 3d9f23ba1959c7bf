"""Finetune a BLIP-2 model with DeepSpeed.

    deepspeed --num_gpus 8 engine/train.py --recipe recipes/sherlock_opt2.7b.yaml \
        --options run.init_lr=2e-5 run.output_dir=runs/opt27b-lr2e5
    python engine/train.py --recipe recipes/tiny_sherlock.yaml      # one process, no launcher

Reads top to bottom: config -> model -> data -> deepspeed.initialize -> loop -> save.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import timedelta

if __package__ in (None, ""):
    # Run as a script (the deepspeed launcher does this): import the package, not sibling files.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, _root)

from engine.config import ConfigError, ModelConfig, RunConfig, field_docs, load_recipe, save_resolved  # noqa: E402
from engine.data.errors import DatasetError  # noqa: E402
from engine.faults import RunStopped  # noqa: E402
from engine.startup import (StartupClock, UsageError, exit_now, prepare_output_dir, set_aside_failed_start,  # noqa: E402
                            single_process_env, trainer_exit_code)
from engine.trainer.resume import check_resume  # noqa: E402
from engine.trainer.reshape import saved_layout  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Recipe keys are listed by --help-recipe and in docs/recipes.md.",
    )
    p.add_argument("--recipe", help="recipe YAML (model / datasets / run sections)")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override recipe keys, e.g. run.init_lr=2e-5 model.freeze_vit=false")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in run.output_dir")
    p.add_argument("--help-recipe", action="store_true", help="list every recipe key with its doc and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    if args.help_recipe:
        for section, cls in (("model", ModelConfig), ("run", RunConfig)):
            print(f"[{section}]")
            for name, tp, default, help_ in field_docs(cls):
                print(f"  {section}.{name} ({tp}, default {default!r}): {help_}")
        sys.exit(0)
    if not args.recipe:
        p.error("--recipe is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.fresh_output_dir = None  # run() sets it once this start has the output folder to itself
    single_process_env()
    try:
        return run(args)
    except (ConfigError, UsageError, FileExistsError, FileNotFoundError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        _set_aside(args, f"error: {e}")
        return exit_now(2)
    except RunStopped as e:  # interrupted, or a fault limit reached: a checkpoint was saved first
        print(f"stopped: {e}", file=sys.stderr)
        return exit_now(e.code)
    except Exception as e:
        code = trainer_exit_code(e)  # an unsafe checkpoint file (2), a save that failed (3)
        if code is not None:
            print(f"error: {e}", file=sys.stderr)
            _set_aside(args, f"error: {e}")
            return exit_now(code)
        # Any other failure: show it, then leave at once. With several ranks the others may be waiting in a
        # collective; a normal exit would run destructors that wait for them too. The launcher stops the
        # other ranks when this one exits non-zero; without it they fail at run.dist_timeout_s.
        rank = os.environ.get("RANK", "0")
        print(f"error on rank {rank}:\n{traceback.format_exc()}", file=sys.stderr)
        _set_aside(args, traceback.format_exc())
        return exit_now(1)


def _set_aside(args, reason: str) -> None:
    """A start that failed before its first step in a folder it began empty: rank 0 moves what it wrote aside,
    so the corrected command can be run as it is (engine.startup.set_aside_failed_start)."""
    if args.fresh_output_dir is None or os.environ.get("RANK", "0") != "0":
        return
    dest = set_aside_failed_start(args.fresh_output_dir, reason)
    if dest:
        print(f"this start's config.yaml and train.log were moved to {dest}; {args.fresh_output_dir} can be used "
              f"again", file=sys.stderr)


def run(args) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    clock = StartupClock()

    # 1. Config: every problem is reported before anything heavy is imported or built.
    with clock.stage("config"):
        recipe = load_recipe(args.recipe, args.options)
        auto_batch = recipe.auto_batch
        if auto_batch:
            # Only for batch_size_train: auto: the planner builds the model on the meta device (transformers).
            from engine.memory import device_memory_gb, resolve_auto_batch

            resolve_auto_batch(recipe, world, device_memory_gb())
        r = recipe.run
        resume_from = prepare_output_dir(recipe, args.resume, rank)
        if not resume_from and not r.evaluate:
            args.fresh_output_dir = r.output_dir
        resume_notes = []
        if resume_from:
            problems, resume_notes = check_resume(resume_from, recipe, world)
            if r.evaluate:  # evaluation only needs the same model
                problems = [p for p in problems if "cannot change" in p.message]
            if problems:
                raise ConfigError(problems, f"{args.recipe} (resuming {resume_from})")

    # The recipe is good: now the heavy imports (deepspeed, torch, transformers through the builders).
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from engine.build import DTYPES, build_datasets, build_model, prepare_datasets
    from engine.deepspeed_config import fill_ds_config, normalize_cuda_arch_list, zero_stage
    from engine.models.blip2 import CheckpointMismatchError
    from engine.models.quant import QuantizationError, check_quantization
    from engine.trainer.checkpoint import BaseMismatchError, check_base, describe_base, read_state
    from engine.trainer.logs import logger, setup_logging
    from engine.trainer.reshape import needs_universal, prepare_universal
    from engine.trainer.topology import SharedStorageError, Topology, check_shared_output_dir, init_distributed
    from engine.trainer.loop import Trainer, micro_batches_per_epoch, total_optimizer_steps
    from engine.trainer.optim import lr_scheduler_factory, param_groups
    from engine.trainer.auto_batch import check_micro_batch
    from engine.memory import device_memory_gb

    try:  # 8/4-bit weights need CUDA and bitsandbytes: say so before anything is written or built
        check_quantization(recipe.model.load_in_8bit, recipe.model.load_in_4bit, get_accelerator().device_name())
    except QuantizationError as e:
        raise UsageError(str(e)) from None
    # gloo on CPU, nccl on GPU; rendezvous from the launcher's env. The timeout bounds every collective, so a
    # rank that dies without the launcher noticing fails the others instead of leaving them waiting forever.
    with clock.stage("distributed init"):
        init_distributed(timeout=timedelta(seconds=r.dist_timeout_s))
    topo = Topology.from_env()
    if rank == 0:
        os.makedirs(r.output_dir, exist_ok=True)
        save_resolved(recipe, os.path.join(r.output_dir, "config.yaml"))
    torch.distributed.barrier()
    setup_logging(r.output_dir, rank, topo.tag())
    try:  # several nodes: every rank must see the files rank 0 writes (checkpoints are read by all ranks)
        check_shared_output_dir(r.output_dir, topo)
    except SharedStorageError as e:
        raise UsageError(str(e)) from None
    for note in resume_notes:
        logger.info("recipe differs from the checkpoint (allowed): %s", note)
    on_cpu = get_accelerator().device_name() == "cpu"
    arch_note = normalize_cuda_arch_list()
    if arch_note and rank == 0:
        logger.info(arch_note)
    try:
        ds_config = fill_ds_config(recipe, world, on_cpu=on_cpu)
    except ValueError as e:
        raise UsageError(str(e)) from None
    logger.info("recipe %s, %s, ZeRO stage %d, %s, device %s", args.recipe, topo.describe(), zero_stage(ds_config),
                r.precision, get_accelerator().device_name())
    universal = None
    if resume_from and not r.evaluate:
        layout = saved_layout(resume_from)
        if needs_universal(layout, world, zero_stage(ds_config), r.deepspeed):
            # Another number of ranks or ZeRO stage: DeepSpeed re-shards the state from its universal form.
            logger.info("resuming %s, saved by %d rank(s) under ZeRO stage %s (%s), on %d rank(s) under ZeRO stage %d "
                        "(%s): through DeepSpeed's universal checkpoint format", resume_from, layout.world_size,
                        layout.zero_stage, layout.deepspeed, world, zero_stage(ds_config), r.deepspeed)
            # The conversion of a large checkpoint can outlast run.dist_timeout_s: the others wait on a group
            # with a long timeout.
            wait = torch.distributed.new_group(backend="gloo", timeout=timedelta(hours=6))
            with clock.stage("universal conversion"):
                universal = prepare_universal(resume_from, rank, wait_group=wait)
            ds_config = fill_ds_config(recipe, world, on_cpu=on_cpu, load_universal=True)
    deepspeed.runtime.utils.set_random_seed(r.seed)

    # 2. Model. Under ZeRO-3 transformers partitions weights while they load (HfDeepSpeedConfig must stay alive).
    # A tiny random-init model is built whole on every rank instead, and partitioned by deepspeed.initialize:
    # the same seeded weights as under ZeRO-2, so a run can move between stages.
    hf_ds = None
    if zero_stage(ds_config) == 3 and not (recipe.model.model_type == "tiny" and recipe.model.pretrained is None):
        from transformers.integrations import HfDeepSpeedConfig  # here: only ZeRO-3 loading needs it

        hf_ds = HfDeepSpeedConfig(ds_config)
    try:  # built in the run's precision: DeepSpeed would cast an fp32 build anyway (half the host memory)
        with clock.stage("model build/load"):
            # ZeRO-1/2 on a GPU: a checkpoint loads, a random real-size model is drawn, straight onto this rank's
            # device (ZeRO-3 partitions either above). Never a whole fp32 copy on the host.
            device = None if on_cpu or zero_stage(ds_config) == 3 else get_accelerator().current_device_name()
            model = build_model(recipe, dtype=DTYPES[r.precision], device=device)
    except CheckpointMismatchError as e:
        raise UsageError(str(e)) from None
    if r.compile:
        from engine.models import compile_layers  # with the builders, imported after the recipe check (above)

        logger.info("run.compile: %d repeated layers compile on their first call", compile_layers(model))
    for part, n in model.parameter_summary().items():
        logger.info("parameters %-7s %14s total %14s trainable", part, f"{n['total']:,}", f"{n['trainable']:,}")
    # The base of the frozen weights: checkpoints name it instead of holding its weights (checkpoint.py).
    with clock.stage("base fingerprint"):  # seeded weights are hashed: seconds at real size
        base = describe_base(recipe.to_dict()["model"], r.seed, r.precision, model)
    if not base["reproducible"] and not r.save_frozen:
        logger.info("the frozen weights (%s) cannot be rebuilt from a seed: every checkpoint holds them", base["path"])
    if resume_from:
        try:
            moved = check_base(resume_from, read_state(resume_from), base, universal=universal is not None)
        except BaseMismatchError as e:
            raise UsageError(str(e)) from None
        if moved:
            logger.info(moved)

    # 3. Data. Augmentation randomness differs per rank; model init above did not.
    torch.manual_seed(r.seed + rank)
    with clock.stage("datasets"):
        if rank == 0:
            prepare_datasets(recipe)
        torch.distributed.barrier()
        datasets = build_datasets(recipe)
    if r.evaluate:
        micro = 1
    else:
        train_len = len(datasets[r.train_splits[0]])
        try:
            micro = micro_batches_per_epoch(train_len, world, r.batch_size_train, r.accum_grad_iters)
        except ValueError as e:
            raise UsageError(str(e)) from None
        logger.info("train split: %d samples, %d optimizer steps per epoch", train_len, micro // r.accum_grad_iters)

    # 4. DeepSpeed.
    steps_per_epoch = micro // r.accum_grad_iters
    total = total_optimizer_steps(micro, r)
    with clock.stage("DeepSpeed init"):
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, r.weight_decay), config=ds_config,
            lr_scheduler=lr_scheduler_factory(recipe, total, steps_per_epoch),
        )
    if auto_batch and not r.evaluate:
        # The planner's micro batch, measured on this GPU with the model states in place; stepped down (the
        # global batch, hence the schedule, kept) when a real step would not fit.
        with clock.stage("micro batch check"):
            if check_micro_batch(engine, recipe, world, device_memory_gb(), zero_stage(ds_config), logger.info):
                micro = micro_batches_per_epoch(train_len, world, r.batch_size_train, r.accum_grad_iters)
                if rank == 0:
                    save_resolved(recipe, os.path.join(r.output_dir, "config.yaml"))
    with clock.stage("DeepSpeed init"):
        trainer = Trainer(engine, recipe, datasets, rank=rank, world_size=world, micro_batches_per_epoch=micro,
                          output_dir=r.output_dir, base=base)

    # 5. Train (or only evaluate), then save.
    try:
        if r.evaluate:
            if resume_from:
                with clock.stage("checkpoint load"):
                    trainer.load_weights(resume_from)
            logger.info("%s", clock.report())
            for split in list(r.valid_splits) + list(r.test_splits):
                trainer.evaluate_split(split, "eval")
        else:
            if resume_from:
                with clock.stage("checkpoint load"):
                    trainer.resume(resume_from, universal=universal)
            logger.info("%s", clock.report())
            trainer.fit()
    finally:
        trainer.close()
    del hf_ds
    logger.info("done: %s", r.output_dir)
    # Leave together: a rank that tears down its connections while another still talks to it can make that
    # one abort at exit ("terminate called without an active exception") after a run that succeeded.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

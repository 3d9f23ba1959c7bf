r"""Convert a checkpoint to DeepSpeed's universal format, ahead of a resume on another cluster size.

    python tools/to_universal.py runs/opt27b/checkpoints/step2000
    python tools/to_universal.py runs/opt27b/checkpoints/latest --workers 8

`engine/train.py --resume` does this by itself when the run has another number of ranks or another ZeRO
stage than the checkpoint (rank 0 converts while the others wait). Converting ahead, on a CPU machine,
keeps a GPU job from waiting for it. The result is CKPT/universal (written to a temporary folder and moved
into place when complete), which every later resume from CKPT reuses. It holds every trained parameter's
fp32 weights and Adam state: count on about 12 bytes per trained parameter, plus 4 per frozen parameter
for checkpoints written under ZeRO-1/2 (DeepSpeed's converter writes those too). See docs/multinode.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a checkpoint folder (run/checkpoints/<tag>), run/checkpoints/latest, run/checkpoints/best, "
                        "or the run folder (its latest complete checkpoint)")
    p.add_argument("--workers", type=int, default=1, help="processes that extract and merge the shards")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.checkpoints.paths import resolve_checkpoint
    from engine.trainer.checkpoint import UnsafeFileError
    from engine.trainer.reshape import convert_to_universal, saved_layout

    try:
        resolved = resolve_checkpoint(args.checkpoint)
        print(resolved.describe(), flush=True)
        ckpt = resolved.folder
        layout = saved_layout(ckpt)
        start = time.perf_counter()
        out = convert_to_universal(ckpt, workers=args.workers)
    except (FileNotFoundError, UnsafeFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: universal form of {ckpt} (saved by {layout.world_size} rank(s), ZeRO stage "
          f"{layout.zero_stage}, global batch {layout.global_batch}) in {time.perf_counter() - start:.1f} s; "
          f"resume it on any number of ranks or ZeRO stage with --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())

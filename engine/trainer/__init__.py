"""The DeepSpeed training loop and what it needs: LR schedules, checkpoints, logging."""

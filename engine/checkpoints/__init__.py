"""Checkpoint formats, one module per job, beneath the builder and the trainer (they import it; it imports
nothing above models/data and the config):

* ``paths``: where a checkpoint is (a folder, ``latest``, ``best``, a run's output_dir) and whether it is complete;
* ``safe_loading``: reading checkpoint files without running code (``weights_only`` loads);
* ``engine_checkpoint``: this engine's checkpoints, read: engine state, saved recipe, ZeRO consolidation
  through DeepSpeed, strict loading, per-part summary;
* ``lora``: LoRA adapters: save, read, apply (merge with peft), strip, merge layers;
* ``hf``: Hugging Face folders with processor, recipe and export_info.json;
* ``lavis``: importing a LAVIS ``.pth`` checkpoint;
* ``common``: the error, file names and safe output folders they share.

Rebuilding a model from a checkpoint and exporting it (which needs the builder) is engine/export.py.
This package imports none of its modules itself, so reading a path does not import torch.
"""

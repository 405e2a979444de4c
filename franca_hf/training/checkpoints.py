"""Resumable checkpoints: Accelerate's `save_state` (models, optimizer, RNG, registered objects) into a staging folder
renamed into place by the main process, so a killed run finds only complete checkpoints."""

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from .pipeline import TrainingBatches


def find_latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint folder (`step_<n>` with its `train_state.json`), or None."""
    complete = sorted(p for p in directory.glob("step_*") if (p / "train_state.json").is_file())
    return complete[-1] if complete else None


def save_checkpoint(accelerator: Accelerator, state, batches: TrainingBatches, directory: Path, keep: int) -> Path:
    """`save_state` into a staging folder, then an atomic rename by the main process; prune old checkpoints."""
    final = directory / f"step_{state.step:08d}"
    staging = directory / f".step_{state.step:08d}.tmp"
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    batches.share_positions()  # every process's own place in the data (save_state keeps the main process's only)
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress = {**state.state_dict(), "data": batches.state_dict()}  # readable: what the checkpoint is at
        (staging / "train_state.json").write_text(json.dumps(progress))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in sorted(p for p in directory.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final

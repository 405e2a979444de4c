"""What a training run reports: the loss parts of every micro-batch, reduced over processes only when needed
(`LossWindow`), and the metrics log (`metrics.jsonl` and the Accelerate trackers)."""

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from ..errors import RunStoppedError
from ..io import write_file_atomically


class NonFiniteLossError(RunStoppedError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class LossWindow:
    """The loss parts and skipped images of every micro-batch, kept where they are (the device) and reduced over
    processes only when `settle` is called (at logging, k-NN, checkpoint and export steps): one collective and one
    device-to-host copy per settle instead of one per step, so the host never waits for the device in between.

    A non-finite loss is therefore found at the next settle, not before its own backward: the run stops there
    (`NonFiniteLossError`, naming the first non-finite step) before anything is evaluated or saved, so the last
    checkpoint is one from before the non-finite loss."""

    def __init__(self, accelerator: Accelerator, checkpoints: Path):
        self.accelerator, self.checkpoints = accelerator, checkpoints
        self.keys: list[str] = []
        self.pending: list[tuple[int, torch.Tensor, int]] = []  # (step, loss parts, skipped images)
        self.settled: list[list[float]] = []  # this logging window's rows, averaged over processes
        self.start, self.images = time.perf_counter(), 0

    def add(self, step: int, parts: dict, skipped_images: int, images: int) -> None:
        self.keys = list(parts)
        self.pending.append((step, torch.stack([v.detach().float() for v in parts.values()]), skipped_images))
        self.images += images

    def settle(self) -> int:
        """Reduce the pending rows over processes; returns the images all processes skipped for them."""
        if not self.pending:
            return 0
        steps, rows, skipped = zip(*self.pending, strict=True)
        self.pending = []
        rows = torch.stack(rows)
        skipped = torch.tensor(skipped, device=rows.device, dtype=rows.dtype)[:, None]
        table = self.accelerator.reduce(torch.cat([rows, skipped], dim=1), "mean").tolist()  # the one sync
        skipped_images = 0
        for step, row in zip(steps, table, strict=True):
            row, skipped_here = row[:-1], row[-1]
            if not math.isfinite(row[0]):
                values = dict(zip(self.keys, row, strict=True))
                raise NonFiniteLossError(
                    f"Non-finite loss at step {step}: {json.dumps({k: values[k] for k in ('loss', 'dino', 'ibot', 'koleo')})}. "
                    f"Stopping; the last good checkpoint is kept in {self.checkpoints}. Lower optim.base_lr, check "
                    "the data, or use run.mixed_precision=bf16 instead of fp16."
                )
            self.settled.append(row)
            skipped_images += round(skipped_here * self.accelerator.num_processes)
        return skipped_images

    def averages(self) -> dict[str, float]:
        """Mean loss parts over the window's micro-batches and its images/s (all processes); starts a new window."""
        averages = {
            key: sum(column) / len(column)
            for key, column in zip(self.keys, zip(*self.settled, strict=True), strict=True)
        }
        averages["images_per_second"] = self.images / (time.perf_counter() - self.start)
        self.settled, self.start, self.images = [], time.perf_counter(), 0
        return averages


class MetricsLog:
    """Appends JSON lines to `<output_dir>/metrics.jsonl` (main process) and forwards to Accelerate trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator, self.path = accelerator, output_dir / "metrics.jsonl"

    def drop_after(self, step: int) -> None:
        """Drop the lines past `step` (main process): a run resumed from its checkpoint at `step` logs them again."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            write_file_atomically(self.path, lambda staging: staging.write_text("".join(kept)))

    def __call__(self, step: int, values: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        flat = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        self.accelerator.log(flat, step=step)

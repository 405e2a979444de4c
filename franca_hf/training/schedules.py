"""Training schedules indexed by optimizer step (the official DINOv2/Franca `CosineScheduler` arithmetic).

A schedule is `warmup_steps` values linearly spaced from `warmup_start` to `peak` (both ends included, like
`numpy.linspace`), then a half cosine from `peak` towards `final` over the remaining `total_steps - warmup_steps`
steps (the last of them is just above `final`), then `final` for every later step.

The recipe (`FrancaSchedules`), official values in brackets:

* lr: base_lr * sqrt(global_batch / 1024), warmup from 0, cosine to min_lr (1e-6);
* weight decay: cosine 0.04 -> 0.2, no warmup;
* teacher momentum: cosine 0.994 -> 1.0;
* teacher temperature: linear 0.04 -> 0.07 over 30 "epochs" of 1250 steps, then 0.07;
* last-layer (prototype) lr: the lr schedule, but 0 for the first 1250 steps.
"""

import math
from dataclasses import dataclass

from .config import OptimSettings

OFFICIAL_EPOCH_LENGTH = 1250


def scaled_learning_rate(base_lr: float, global_batch_size: int, reference_batch_size: int = 1024) -> float:
    """The `sqrt_wrt_1024` rule: base_lr * sqrt(global_batch_size / reference_batch_size)."""
    if global_batch_size < 1 or reference_batch_size < 1:
        raise ValueError(f"Batch sizes must be >= 1, got {global_batch_size} and {reference_batch_size}.")
    return base_lr * math.sqrt(global_batch_size / reference_batch_size)


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """Linear warmup then half cosine, as a function of the step (see the module docstring)."""

    peak: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self):
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"Need 0 <= warmup_steps <= total_steps, got {self.warmup_steps}, {self.total_steps}.")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if step >= self.total_steps:
            return self.final
        if step < self.warmup_steps:
            if self.warmup_steps == 1:
                return self.warmup_start
            return self.warmup_start + (self.peak - self.warmup_start) * step / (self.warmup_steps - 1)
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.final + 0.5 * (self.peak - self.final) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ScheduleValues:
    """Everything the loop needs at one optimizer step."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temperature: float
    last_layer_lr: float


class FrancaSchedules:
    """The five Franca schedules; defaults are the released recipe (paper Table 6: 625K steps, 100K warmup; docs/pretraining.md).

    Args:
        lr: peak learning rate, already scaled (see `scaled_learning_rate`).
        total_steps, warmup_steps, teacher_temperature_warmup_steps, freeze_last_layer_steps: optimizer steps;
            shrink them together for short runs.
        Other arguments (keyword-only): start and end values of each schedule.
    """

    def __init__(
        self,
        lr: float,
        total_steps: int = 625_000,
        warmup_steps: int = 100_000,
        *,
        min_lr: float = 1e-6,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.2,
        teacher_momentum: float = 0.994,
        teacher_momentum_end: float = 1.0,
        teacher_temperature_start: float = 0.04,
        teacher_temperature: float = 0.07,
        teacher_temperature_warmup_steps: int = 30 * OFFICIAL_EPOCH_LENGTH,
        freeze_last_layer_steps: int = OFFICIAL_EPOCH_LENGTH,
    ):
        if freeze_last_layer_steps < 0:
            raise ValueError(f"freeze_last_layer_steps must be >= 0, got {freeze_last_layer_steps}.")
        self.lr = WarmupCosineSchedule(lr, min_lr, total_steps, warmup_steps)
        self.weight_decay = WarmupCosineSchedule(weight_decay, weight_decay_end, total_steps)
        self.teacher_momentum = WarmupCosineSchedule(teacher_momentum, teacher_momentum_end, total_steps)
        # A warmup as long as the whole schedule: linear start -> peak, then constant.
        self.teacher_temperature = WarmupCosineSchedule(
            teacher_temperature,
            teacher_temperature,
            total_steps=teacher_temperature_warmup_steps,
            warmup_steps=teacher_temperature_warmup_steps,
            warmup_start=teacher_temperature_start,
        )
        self.freeze_last_layer_steps = freeze_last_layer_steps

    @classmethod
    def from_settings(cls, optim: OptimSettings, lr: float) -> "FrancaSchedules":
        """The schedules of a recipe's `optim` section, with its peak learning rate `lr` already scaled to the global
        batch (`scaled_learning_rate`)."""
        return cls(
            lr,
            optim.total_steps,
            optim.warmup_steps,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            weight_decay_end=optim.weight_decay_end,
            teacher_momentum=optim.teacher_momentum,
            teacher_momentum_end=optim.teacher_momentum_end,
            teacher_temperature_start=optim.teacher_temperature_start,
            teacher_temperature=optim.teacher_temperature,
            teacher_temperature_warmup_steps=optim.teacher_temperature_warmup_steps,
            freeze_last_layer_steps=optim.freeze_last_layer_steps,
        )

    def __call__(self, step: int) -> ScheduleValues:
        lr = self.lr(step)
        return ScheduleValues(
            lr=lr,
            weight_decay=self.weight_decay(step),
            teacher_momentum=self.teacher_momentum(step),
            teacher_temperature=self.teacher_temperature(step),
            last_layer_lr=0.0 if step < self.freeze_last_layer_steps else lr,
        )

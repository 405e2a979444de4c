"""Schedules indexed by optimizer step, at their key steps."""

import math

import pytest

from franca_hf.training import FrancaSchedules, WarmupCosineSchedule, scaled_learning_rate
from franca_hf.training.config import OptimSettings, load_config


def test_sqrt_batch_scaling():
    assert scaled_learning_rate(1e-3, 2048) == pytest.approx(1e-3 * math.sqrt(2))
    assert scaled_learning_rate(4e-3, 256) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="Batch sizes"):
        scaled_learning_rate(1e-3, 0)


def test_warmup_cosine_key_steps():
    schedule = WarmupCosineSchedule(peak=1.0, final=0.1, total_steps=110, warmup_steps=11, warmup_start=0.0)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)  # end of warmup (inclusive, like numpy.linspace)
    assert schedule(11) == pytest.approx(1.0)  # cosine starts at the peak
    assert schedule(11 + 99 // 2) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 49 / 99)))
    assert 0.1 < schedule(109) < 0.1 + 1e-3
    assert schedule(110) == schedule(10**9) == 0.1
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineSchedule(1.0, 0.0, total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="step"):
        schedule(-1)


def test_franca_schedules():
    schedules = FrancaSchedules(
        lr=2e-3, total_steps=1000, warmup_steps=100, teacher_temperature_warmup_steps=300, freeze_last_layer_steps=50
    )
    start, end_warmup, last, after = schedules(0), schedules(99), schedules(999), schedules(1000)
    assert start.lr == 0.0 and end_warmup.lr == pytest.approx(2e-3) and after.lr == pytest.approx(1e-6)
    assert start.weight_decay == pytest.approx(0.04) and after.weight_decay == pytest.approx(0.2)
    assert start.weight_decay < schedules(500).weight_decay < last.weight_decay < 0.2
    assert start.teacher_momentum == pytest.approx(0.994) and after.teacher_momentum == 1.0
    assert start.teacher_temperature == pytest.approx(0.04)
    assert schedules(149).teacher_temperature == pytest.approx(0.04 + 0.03 * 149 / 299)
    assert schedules(299).teacher_temperature == pytest.approx(0.07) == schedules(5000).teacher_temperature
    assert schedules(49).last_layer_lr == 0.0 and schedules(49).lr > 0
    assert schedules(50).last_layer_lr == schedules(50).lr
    with pytest.raises(ValueError, match="freeze_last_layer_steps"):
        FrancaSchedules(lr=1e-3, freeze_last_layer_steps=-1)


# valeoai/Franca configs/finetune/vit{b,l}14_finetune.yaml over ssl_default_config.yaml, in optimizer steps
# (OFFICIAL_EPOCH_LENGTH 200): the teacher temperature warms up over 30 epochs, the prototypes stay frozen 1 epoch.
OFFICIAL_FINETUNE_STEPS = {"total": 100 * 200, "warmup": 50 * 200, "temperature_warmup": 30 * 200, "frozen": 1 * 200}


def test_high_resolution_recipes_follow_the_official_fine_tune_schedules():
    """highres_518_official is the official fine-tune; the paper's two stages (highres_364, highres_518) freeze the
    prototypes as long as it does (their temperature warmups are the paper's, see the recipes' comments)."""
    official = load_config("highres_518_official")
    assert (official.crops.global_size, official.crops.local_size, official.optim.base_lr) == (518, 98, 7.05e-5)
    steps = official.optim
    assert (steps.total_steps, steps.warmup_steps, steps.teacher_temperature_warmup_steps) == (
        OFFICIAL_FINETUNE_STEPS["total"],
        OFFICIAL_FINETUNE_STEPS["warmup"],
        OFFICIAL_FINETUNE_STEPS["temperature_warmup"],
    )
    frozen = OFFICIAL_FINETUNE_STEPS["frozen"]
    for name in ("highres_518_official", "highres_364", "highres_518"):
        optim = load_config(name).optim
        schedules = FrancaSchedules.from_settings(optim, 1e-5)
        assert schedules(frozen - 1).last_layer_lr == 0 < schedules(frozen).last_layer_lr, name
        assert schedules(0).teacher_temperature == 0.04, name
        assert schedules(optim.teacher_temperature_warmup_steps).teacher_temperature == 0.07, name


def test_schedules_from_the_optim_settings():
    """`from_settings` hands every schedule field of an `optim` section to its schedule (each field distinct here, so
    a crossed pair shows), and the section's defaults are the released recipe, as `FrancaSchedules`' are."""
    optim = OptimSettings(
        total_steps=1000,
        warmup_steps=100,
        min_lr=1e-5,
        weight_decay=0.03,
        weight_decay_end=0.3,
        teacher_momentum=0.99,
        teacher_momentum_end=0.999,
        teacher_temperature_start=0.02,
        teacher_temperature=0.06,
        teacher_temperature_warmup_steps=200,
        freeze_last_layer_steps=50,
    )
    schedules = FrancaSchedules.from_settings(optim, lr=2e-3)
    start, after = schedules(0), schedules(1000)
    assert schedules(99).lr == pytest.approx(2e-3) and schedules(98).lr < 2e-3 and after.lr == pytest.approx(1e-5)
    assert (start.weight_decay, after.weight_decay) == pytest.approx((0.03, 0.3))
    assert (start.teacher_momentum, after.teacher_momentum) == pytest.approx((0.99, 0.999))
    temperatures = [schedules(step).teacher_temperature for step in (0, 198, 199)]
    assert temperatures[0] == pytest.approx(0.02) and temperatures[1] < 0.06 and temperatures[2] == pytest.approx(0.06)
    assert schedules(49).last_layer_lr == 0 < schedules(50).last_layer_lr == schedules(50).lr

    released, default = FrancaSchedules.from_settings(OptimSettings(), lr=1e-3), FrancaSchedules(1e-3)
    for step in (0, 1249, 1250, 37_499, 99_999, 300_000, 625_000):
        assert released(step) == default(step), step

"""Each section of `PretrainConfig` checks its own keys (`problems()`); `PretrainConfig.validate` collects them with
the model's, and the crop sizes are checked against the model's patch size."""

import pytest

from franca_hf.training.config import (
    CropSettings,
    DataSettings,
    EvalSettings,
    HeadSettings,
    ObjectiveSettings,
    OptimSettings,
    RunSettings,
    load_config,
)


@pytest.mark.parametrize(
    "section, problem",
    [
        (HeadSettings(mode="nested"), "heads.mode must be project, slice or shared, got 'nested'"),
        (DataSettings(prefetch_factor=0), "data.prefetch_factor must be >= 1, got 0"),
        (ObjectiveSettings(mask_ratio=[0.7, 0.1]), "objective.mask_ratio must be [low, high]"),
        (OptimSettings(total_steps=10), "optim.warmup_steps (100000) must be between 0 and optim.total_steps (10)"),
        (EvalSettings(knn_train="demo"), "set both eval.knn_train and eval.knn_test, or neither"),
        (RunSettings(mixed_precision="fp8"), "run.mixed_precision must be no, bf16 or fp16, got 'fp8'"),
    ],
)
def test_a_section_names_its_own_key(section, problem):
    assert type(section)().problems() == []
    (message,) = section.problems()
    assert message.startswith(problem)


def test_crop_sizes_are_checked_against_the_patch_size():
    crops = CropSettings(global_size=100, local_size=49, local_number=2)
    assert crops.problems(patch=None) == []  # (a model that gives no patch size has its own problem)
    assert crops.problems(patch=7) == ["crops.global_size (100) must be a multiple of the patch size (7)"]
    assert CropSettings(local_number=0, local_size=50).problems(patch=14) == []  # no local crops to fit


def test_validate_reports_every_section_at_once():
    with pytest.raises(ValueError) as raised:
        load_config("demo", ["crops.global_size=33", "eval.knn_every=0", "model.ffn_type=moe"])
    message = str(raised.value)
    assert message.startswith("Invalid pretraining config: model: ffn_type must be one of")
    assert "eval.knn_every must be > 0 or null, got 0" in message
    assert "crops.global_size" not in message  # without a valid model there is no patch size to check against
    with pytest.raises(ValueError, match=r"crops.global_size \(33\) must be a multiple of the patch size \(8\)"):
        load_config("demo", ["crops.global_size=33"])

"""The trainer's wiring against the official arithmetic: `Teacher` and `Student` (heads, Sinkhorn targets, crop swap,
local crops, iBOT masks, KoLeo, loss weights) reproduce the totals the official `SSLMetaArch.forward_backward`
computed on the tiny reference (tests/reference/tiny/objective.json; how: tests/reference/tiny/README.md)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from franca_hf import FrancaModel
from franca_hf.training.config import ObjectiveSettings
from franca_hf.training.heads import MatryoshkaHead, official_head_state_dict
from franca_hf.training.losses import dino_loss, swap_global_crops
from franca_hf.training.masking import mask_token_weights
from franca_hf.training.pretrain import Student, Teacher

from ..conftest import REFERENCE_DIR, TEACHER_CHECKPOINT

REFERENCE = json.loads((REFERENCE_DIR / "objective.json").read_text())


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE_DIR / "objective.safetensors")


@pytest.fixture(scope="module")
def networks(tiny_folder) -> tuple[Student, Teacher]:
    """The reference checkpoint's backbone for both; the teacher with its dino/ibot heads, the student with the same
    heads crossed (as the generating script set up the official model)."""
    heads = {name: official_head_state_dict(TEACHER_CHECKPOINT, name) for name in ("dino_head", "ibot_head")}
    backbone = FrancaModel.from_pretrained(tiny_folder)
    teacher = Teacher(
        copy.deepcopy(backbone),
        MatryoshkaHead.from_official_state_dict(heads["dino_head"]),
        MatryoshkaHead.from_official_state_dict(heads["ibot_head"]),
    ).eval()
    objective = ObjectiveSettings(**REFERENCE["objective"], sinkhorn_iterations=REFERENCE["sinkhorn_iterations"])
    student = Student(
        backbone.train(),
        MatryoshkaHead.from_official_state_dict(heads["ibot_head"]),
        MatryoshkaHead.from_official_state_dict(heads["dino_head"]),
        objective,
    )
    return student, teacher


def _batch(inputs: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    """A collated batch as `collate_masked_crops` returns it, from the stored crops and masks."""
    masks = inputs[f"{case}.masks"]
    return {
        "global_crops": inputs[f"{case}.global_crops"],
        "local_crops": inputs[f"{case}.local_crops"],
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "mask_weights": mask_token_weights(masks),
    }


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_student_and_teacher_reproduce_the_official_totals(case, inputs, networks):
    student, teacher = networks
    settings, official = REFERENCE["cases"][case]["settings"], REFERENCE["cases"][case]["official"]
    batch = _batch(inputs, case)
    assert batch["local_crops"].shape[0] == settings["local_crops"] * settings["images_per_crop"]
    assert batch["mask_indices"].numel() == settings["masked_tokens"]

    dino_logits = []
    hook = student.dino_head.register_forward_hook(lambda module, args, output: dino_logits.append(output))
    try:
        dino_targets, ibot_targets = teacher(batch, settings["teacher_temperature"], REFERENCE["sinkhorn_iterations"])
        with torch.no_grad():
            parts = student(batch, dino_targets, ibot_targets)
    finally:
        hook.remove()

    assert parts["loss"].item() == pytest.approx(official["total"], rel=1e-5)
    assert parts["dino"].item() == pytest.approx(official["dino_local"] + official["dino_global"], rel=1e-5)
    assert parts["ibot"].item() == pytest.approx(official["ibot"], rel=1e-5)
    # KoLeo is a small term (|koleo| << total): compared at the total's precision
    koleo = student.koleo_weight * parts["koleo"].item()
    assert koleo == pytest.approx(official["koleo"], abs=1e-5 * abs(official["total"]))

    # the local / global split of the DINO term, as the official trainer logs it
    (logits,) = dino_logits
    num_global = 2 * settings["images_per_crop"]
    split = dino_loss([x[:num_global] for x in logits], [x[num_global:] for x in logits], dino_targets)
    num_terms = max(2 * settings["local_crops"], 1) + 2
    assert split.local_crops.total.item() / num_terms == pytest.approx(official["dino_local"], rel=1e-5, abs=1e-9)
    assert 2 * split.global_crops.total.item() / num_terms == pytest.approx(official["dino_global"], rel=1e-5)


def test_the_reference_tells_wiring_errors_apart(inputs, networks):
    """The stored totals are sensitive enough for the comparison above to fail on a wiring error: teacher targets
    of the wrong global crop, or a student that does not see its iBOT masks, move the total by far more than 1e-5."""
    student, teacher = networks
    case = "b4_local2"
    settings, official = REFERENCE["cases"][case]["settings"], REFERENCE["cases"][case]["official"]
    batch = _batch(inputs, case)
    dino_targets, ibot_targets = teacher(batch, settings["teacher_temperature"], REFERENCE["sinkhorn_iterations"])
    unmasked = {**batch, "masks": torch.zeros_like(batch["masks"])}
    with torch.no_grad():
        crops_not_swapped = student(batch, [swap_global_crops(t) for t in dino_targets], ibot_targets)["loss"]
        masks_not_applied = student(unmasked, dino_targets, ibot_targets)["loss"]
    for total in (crops_not_swapped, masks_not_applied):
        assert abs(total.item() / official["total"] - 1) > 1e-3

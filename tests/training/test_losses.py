"""DINO, iBOT and KoLeo losses against the official values, plus their conventions and robustness."""

import pytest
import torch

from franca_hf.training import (
    dino_global_loss,
    dino_local_loss,
    dino_loss,
    ibot_loss,
    koleo_loss,
    mask_token_weights,
    sinkhorn_knopp,
    swap_global_crops,
)

LEVELS = range(5)
TEMPERATURE = 0.07


def _levels(reference, prefix):
    return [reference[f"{prefix}_{level}"] for level in LEVELS]


@pytest.fixture(scope="module")
def dino_targets(reference):
    return sinkhorn_knopp(_levels(reference, "dino.teacher_logits"), TEMPERATURE)


def test_dino_raw_terms_match_official(reference, dino_targets):
    local = dino_local_loss(_levels(reference, "dino.student_local"), dino_targets)
    # The reference's teacher rows are already aligned with the student rows (swapped before the head).
    global_ = dino_global_loss(_levels(reference, "dino.student_global"), dino_targets)
    torch.testing.assert_close(local.total, reference["dino.local_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(global_.total, reference["dino.global_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.stack(local.per_level).sum(), local.total)


def test_dino_loss_normalises_and_swaps(reference, dino_targets):
    # dino_loss takes the teacher in its own crop order and swaps it itself.
    teacher_order = [swap_global_crops(t) for t in dino_targets]
    loss = dino_loss(_levels(reference, "dino.student_global"), _levels(reference, "dino.student_local"), teacher_order)
    num_terms = 2 * 3 + 2  # 3 local crops x 2 teacher crops + 2 global pairs
    expected = (reference["dino.local_loss"] + 2 * reference["dino.global_loss"]) / num_terms
    torch.testing.assert_close(loss.total, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.global_crops.total, reference["dino.global_loss"], rtol=1e-5, atol=0)
    assert len(loss.per_level) == 5
    unswapped = dino_loss(
        _levels(reference, "dino.student_global"), _levels(reference, "dino.student_local"), dino_targets
    )
    assert not torch.allclose(unswapped.global_crops.total, loss.global_crops.total)


def test_dino_loss_without_local_crops(reference, dino_targets):
    student_global = _levels(reference, "dino.student_global")
    loss = dino_loss(student_global, [x[:0] for x in student_global], [swap_global_crops(t) for t in dino_targets])
    torch.testing.assert_close(loss.total, 2 * reference["dino.global_loss"] / 3, rtol=1e-5, atol=0)  # official 1 + 2


def test_swap_global_crops():
    rows = torch.arange(6)
    assert swap_global_crops(rows).tolist() == [3, 4, 5, 0, 1, 2]
    with pytest.raises(ValueError, match="2 \\* B"):
        swap_global_crops(torch.arange(5))


def test_ibot_loss_matches_official(reference):
    masks = reference["ibot.masks"]
    targets = sinkhorn_knopp(_levels(reference, "ibot.teacher_logits"), TEMPERATURE)
    loss = ibot_loss(_levels(reference, "ibot.student"), targets, mask_token_weights(masks), num_images=masks.shape[0])
    torch.testing.assert_close(loss.total, reference["ibot.loss"], rtol=1e-5, atol=0)
    assert len(loss.per_level) == 5


def test_ibot_weights_each_image_equally():
    # Two images, 1 and 3 masked tokens: each image contributes the mean over its own tokens.
    student = [torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]])]
    targets = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])]
    masks = torch.tensor([[True, False, False, False], [False, True, True, True]])
    per_token = -(targets[0] * torch.log_softmax(student[0] / 0.1, dim=-1)).sum(-1)
    expected = (per_token[0] + per_token[1:].mean()) / 2
    loss = ibot_loss(student, targets, mask_token_weights(masks), num_images=2)
    torch.testing.assert_close(loss.total, expected)
    with pytest.raises(ValueError, match="mask_weights"):
        ibot_loss(student, targets, torch.ones(3), num_images=2)


def test_koleo_matches_official(reference):
    torch.testing.assert_close(koleo_loss(reference["koleo.input"]), reference["koleo.loss"], rtol=1e-5, atol=0)


def _official_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The official KoLeoLoss arithmetic (franca/loss/koleo_loss.py), fp32: nn.PairwiseDistance(2, eps) is
    ||x - y + eps||, then -log(d + eps)."""
    x = torch.nn.functional.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.T
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    distances = torch.nn.PairwiseDistance(2, eps=eps)(x, x[dots.max(dim=1).indices])
    return -torch.log(distances + eps).mean()


def test_koleo_matches_the_official_values_and_gradients_with_and_without_coinciding_embeddings():
    torch.manual_seed(0)
    duplicated = torch.randn(8, 128)
    duplicated[1] = duplicated[0]  # a repeated image, or early collapse: distance 0 before the eps
    distinct = torch.randn(8, 128)
    # the official KoLeoLoss values of these inputs (franca/loss/koleo_loss.py at 24f8c60, fp32 CPU)
    for x, official in ((duplicated, 3.75643), (distinct, -0.27401)):
        assert koleo_loss(x).item() == pytest.approx(official, abs=1e-5)
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        koleo_loss(ours).backward()
        _official_koleo(theirs).backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)
        assert ours.grad[:2].abs().max() > 0  # the coinciding pair has gradients too


def test_koleo_per_crop(reference):
    x = reference["koleo.input"]
    torch.testing.assert_close(koleo_loss(x, num_crops=2), koleo_loss(x[:8]) + koleo_loss(x[8:]))


def test_koleo_is_fp32_and_finite_for_identical_embeddings(reference):
    x = reference["koleo.input"][:6].clone()
    x[1] = x[0]  # two identical embeddings: distance 0
    expected = koleo_loss(x.bfloat16().float())
    assert torch.isfinite(expected)
    embeddings = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = koleo_loss(embeddings)
        assert torch.mm(x, x.T).dtype == torch.bfloat16  # autocast is active around the call
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()
    torch.testing.assert_close(loss, expected)
    # In fp16 the 1e-8 guard underflows: computed in the input dtype, the duplicate pair's term is infinite.
    half = torch.nn.functional.normalize(x.half(), dim=-1)
    assert torch.isinf(-torch.log(torch.linalg.vector_norm(half[0] - half[1]) + 1e-8))
    assert torch.isfinite(koleo_loss(x.half()))


def test_loss_input_errors():
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(2, 8), num_crops=2)
    with pytest.raises(ValueError, match="num_crops"):
        koleo_loss(torch.randn(5, 8), num_crops=2)
    with pytest.raises(ValueError, match="number of levels"):
        dino_global_loss([torch.zeros(4, 8)], [])
    with pytest.raises(ValueError, match="prototype counts"):
        dino_global_loss([torch.zeros(4, 8)], [torch.zeros(4, 16)])
    with pytest.raises(ValueError, match="non-empty batch"):
        dino_loss([torch.zeros(0, 8)], [torch.zeros(0, 8)], [torch.zeros(0, 8)])
    with pytest.raises(ValueError, match="L \\* B"):
        dino_local_loss([torch.zeros(5, 8)], [torch.zeros(4, 8)])

"""Sinkhorn-Knopp: parity with the official targets, the DINO/iBOT variants, and robustness."""

import pytest
import torch

from franca_hf.training import plain_sinkhorn_knopp, sinkhorn_knopp

LEVELS = range(5)
TEMPERATURE = 0.07


def log_domain_sinkhorn(logits: torch.Tensor, temperature: float, num_iterations: int = 3) -> torch.Tensor:
    """Textbook float64 log-domain Sinkhorn (rows = samples): the ground truth where exp overflows."""
    log_q = logits.double() / temperature
    for _ in range(num_iterations):
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True)  # every prototype gets the same mass
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True)  # every sample's assignment sums to 1
    return log_q.exp()


@pytest.mark.parametrize("name", ["dino", "ibot"])
def test_matches_official_targets(reference, name):
    logits = [reference[f"{name}.teacher_logits_{level}"] for level in LEVELS]
    targets = sinkhorn_knopp(logits, TEMPERATURE, num_iterations=3)
    for level in LEVELS:
        torch.testing.assert_close(targets[level], reference[f"{name}.sinkhorn_{level}"], rtol=1e-5, atol=1e-8)


def test_ibot_whole_matrix_normalisation_is_the_dino_map(reference):
    # The iBOT variant divides Q by its total first, the DINO variant does not: the same targets.
    logits = [reference[f"ibot.teacher_logits_{level}"] for level in LEVELS]
    for dino_variant, ibot_variant, official in zip(
        plain_sinkhorn_knopp(logits, TEMPERATURE),
        plain_sinkhorn_knopp(logits, TEMPERATURE, normalize_total=True),
        (reference[f"ibot.sinkhorn_{level}"] for level in LEVELS),
        strict=True,
    ):
        torch.testing.assert_close(ibot_variant, official, rtol=0, atol=0)
        torch.testing.assert_close(dino_variant, ibot_variant, rtol=1e-5, atol=1e-8)


def test_unequal_levels_and_balanced_prototypes():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(64, size, generator=generator) for size in (8, 32)]
    for targets, level_logits in zip(sinkhorn_knopp(logits, 0.5, num_iterations=100), logits, strict=True):
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(64))
        # Converged: every prototype receives B / K of the mass.
        torch.testing.assert_close(targets.sum(dim=0), torch.full((level_logits.shape[1],), 64 / level_logits.shape[1]))
        torch.testing.assert_close(targets, log_domain_sinkhorn(level_logits, 0.5, 100).float(), rtol=1e-4, atol=1e-7)


def _scaled_reference_logits(reference):
    return [reference[f"dino.teacher_logits_{level}"] * 100 for level in LEVELS]


def _one_dominated_sample(reference):
    logits = [reference[f"ibot.teacher_logits_{level}"].clone() for level in LEVELS]
    for level_logits in logits:
        level_logits[3] -= 60.0  # 60 / 0.07 below every prototype's best sample: its exp underflows to 0
    return logits


@pytest.mark.parametrize("make_logits", [_scaled_reference_logits, _one_dominated_sample])
def test_robust_where_the_plain_formula_breaks(reference, make_logits):
    logits = make_logits(reference)
    assert not all(torch.isfinite(q).all() for q in plain_sinkhorn_knopp(logits, TEMPERATURE))
    for targets, level_logits in zip(sinkhorn_knopp(logits, TEMPERATURE), logits, strict=True):
        assert torch.isfinite(targets).all()
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(targets.shape[0]), rtol=0, atol=1e-5)
        expected = log_domain_sinkhorn(level_logits, TEMPERATURE).float()
        torch.testing.assert_close(targets, expected, rtol=1e-3, atol=1e-6)


def test_low_precision_input_and_empty_batch(reference):
    logits = [reference[f"dino.teacher_logits_{level}"] for level in LEVELS]
    from_bf16 = sinkhorn_knopp([x.bfloat16() for x in logits], TEMPERATURE)
    expected = sinkhorn_knopp([x.bfloat16().float() for x in logits], TEMPERATURE)
    for a, b in zip(from_bf16, expected, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    empty = sinkhorn_knopp([torch.zeros(0, 4), torch.zeros(0, 8)], TEMPERATURE)
    assert [tuple(x.shape) for x in empty] == [(0, 4), (0, 8)]


@pytest.mark.parametrize(
    ("logits", "temperature", "iterations", "message"),
    [
        (torch.zeros(4, 8), 0.1, 3, "sequence"),
        ([torch.zeros(8)], 0.1, 3, "2-D"),
        ([torch.zeros(4, 8), torch.zeros(5, 16)], 0.1, 3, "same samples"),
        ([torch.zeros(4, 8)], 0.0, 3, "temperature"),
        ([torch.zeros(4, 8)], 0.1, 0, "num_iterations"),
    ],
)
def test_bad_input(logits, temperature, iterations, message):
    with pytest.raises(ValueError, match=message):
        sinkhorn_knopp(logits, temperature, iterations)

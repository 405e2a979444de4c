"""Fitting a Matryoshka PCA basis: streamed float64 statistics, the decomposition, and models that hold the fit."""

import pytest
import torch
import torch.nn.functional as F

from franca_hf import FrancaModel
from franca_hf.data import ImageSource, SkipCounter, files_source, open_source
from franca_hf.matryoshka import (
    CovarianceAccumulator,
    MatryoshkaFit,
    PrincipalBasis,
    accumulate_token_statistics,
    fit_matryoshka_basis,
    with_matryoshka_basis,
    without_matryoshka_basis,
)
from franca_hf.modeling.image_processing_franca import make_image_processor

from .conftest import tiny_config
from .features.conftest import make_images


def correlated_rows(count: int, width: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    """Rows with a known anisotropic spread (std 1 / (j + 1) along random directions) around a large mean."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))[0]
    scales = 1.0 / torch.arange(1, width + 1, dtype=torch.float64)
    return offset + (torch.randn(count, width, generator=generator, dtype=torch.float64) * scales) @ directions.T


def test_streamed_statistics_equal_a_one_shot_float64_fit():
    rows = correlated_rows(1000, 16, seed=0, offset=1e4)  # a large mean: a naive sum of x x^T would lose digits
    first, second = CovarianceAccumulator(16), CovarianceAccumulator(16)
    for batch in rows[:700].split([1, 64, 300, 335]):
        first.update(batch)
    for batch in rows[700:].split(128):
        second.update(batch)
    first.update(rows[:0])  # an empty batch changes nothing
    first.merge(second)  # e.g. another process's share
    assert first.count == 1000
    torch.testing.assert_close(first.mean, rows.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(first.covariance(), torch.cov(rows.T), rtol=1e-10, atol=1e-12)

    streamed = PrincipalBasis.from_statistics(first)
    one_shot = CovarianceAccumulator(16)
    one_shot.update(rows)
    expected = PrincipalBasis.from_statistics(one_shot)
    torch.testing.assert_close(streamed.rotation, expected.rotation, rtol=0, atol=1e-8)
    torch.testing.assert_close(streamed.variances, expected.variances, rtol=1e-10, atol=1e-14)


def test_principal_basis_is_orthogonal_ordered_signed_and_diagonalises_the_covariance():
    rows = correlated_rows(5000, 12, seed=1)
    statistics = CovarianceAccumulator(12)
    statistics.update(rows)
    basis = PrincipalBasis.from_statistics(statistics)
    rotation, variances = basis.rotation, basis.variances
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (variances[:-1] >= variances[1:]).all() and (variances > 0).all()
    covariance = torch.cov(rows.T)
    torch.testing.assert_close(rotation.T @ covariance @ rotation, torch.diag(variances), rtol=0, atol=1e-10)
    largest = rotation.abs().argmax(dim=0)
    assert (rotation[largest, torch.arange(12)] > 0).all()  # the sign convention
    flipped = CovarianceAccumulator(12)
    flipped.update(-rows)  # the same directions with opposite signs: the convention gives the same columns
    torch.testing.assert_close(PrincipalBasis.from_statistics(flipped).rotation, rotation, rtol=0, atol=1e-10)
    # the spread was 1 / (j + 1) per direction: shares of the variance are known up to sampling noise
    truth = (1.0 / torch.arange(1, 13, dtype=torch.float64) ** 2).cumsum(0)
    shares = basis.explained_variance([1, 3, 12])
    assert shares[12] == pytest.approx(1.0)
    assert shares[1] == pytest.approx((truth[0] / truth[-1]).item(), abs=0.02)
    assert shares[3] == pytest.approx((truth[2] / truth[-1]).item(), abs=0.02)


def one_shot_pca(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and principal directions (by decreasing variance, largest entry positive) of all rows at once."""
    _, eigenvectors = torch.linalg.eigh(torch.cov(rows.T))
    eigenvectors = eigenvectors.flip(1)
    signs = eigenvectors.gather(0, eigenvectors.abs().argmax(dim=0)[None]).sign()
    return rows.mean(0), eigenvectors * signs


def demo_model() -> tuple[FrancaModel, ImageSource, object]:
    torch.manual_seed(0)
    config = tiny_config(hidden_size=32, num_attention_heads=2, patch_size=8, position_grid_size=4, image_size=32)
    model = FrancaModel(config).eval()
    return model, open_source("demo", "train", demo_num_images=80), make_image_processor(32, 32)


@torch.no_grad()
def test_a_fitted_model_cuts_every_output_in_the_one_shot_pca_basis():
    model, source, processor = demo_model()
    fit = fit_matryoshka_basis(model, source, processor, batch_size=24, num_workers=0, progress=False)
    fitted = with_matryoshka_basis(model, fit)
    assert fit.images == 80 and fit.data == "demo" and fitted.config.matryoshka_basis == "pca"

    pixels = processor([source.load(i) for i in range(80)], return_tensors="pt")["pixel_values"]
    raw = model(pixels)
    basis = fitted.matryoshka_basis
    for tokens, mean, rotation in (
        (raw.pooler_output, basis.cls_mean, basis.cls_rotation),
        (raw.patch_tokens.flatten(0, 1), basis.patch_mean, basis.patch_rotation),
    ):
        expected_mean, expected_rotation = one_shot_pca(tokens.double())
        torch.testing.assert_close(mean.double(), expected_mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(rotation.double(), expected_rotation, rtol=0, atol=1e-4)
        torch.testing.assert_close(rotation.T @ rotation, torch.eye(32), rtol=0, atol=1e-6)

    basis = fitted.matryoshka_basis
    for dim in fitted.config.matryoshka_dims:
        expected = F.normalize((raw.pooler_output - basis.cls_mean) @ basis.cls_rotation[:, :dim], dim=-1)
        torch.testing.assert_close(fitted.get_image_embeddings(pixels, dim=dim), expected)
        out = fitted.get_image_features(pixels, dim=dim)
        torch.testing.assert_close(out.pooler_output, expected)
        torch.testing.assert_close(
            fitted.get_dense_features(pixels, dim=dim, as_grid=False),
            (raw.patch_tokens - basis.patch_mean) @ basis.patch_rotation[:, :dim],
        )
        torch.testing.assert_close(out.last_hidden_state, raw.last_hidden_state)  # full width: never rotated
    shares = fit.explained_variance(fitted.config.matryoshka_dims)
    assert list(shares) == ["cls", "patches"] and shares["cls"][32] == pytest.approx(1.0)
    assert fitted.config.source_checkpoint["matryoshka_pca"]["images"] == 80


@torch.no_grad()
def test_shares_of_the_images_merge_to_the_fit_of_all_of_them():
    """What the trainer does with several processes: each accumulates every n-th image, then the shares merge."""
    model, source, processor = demo_model()
    whole = accumulate_token_statistics(model, source, processor, num_workers=0, progress=False)
    shares = [
        accumulate_token_statistics(model, source, processor, positions=list(range(r, 80, 3)), num_workers=0)
        for r in range(3)
    ]
    merged = shares[0]
    for share in shares[1:]:
        merged.merge(share.cpu())
    assert merged.images == whole.images == 80 and merged.patches.count == whole.patches.count == 80 * 16
    for name in ("cls", "patches"):
        torch.testing.assert_close(getattr(merged, name).mean, getattr(whole, name).mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(getattr(merged, name).covariance(), getattr(whole, name).covariance())


def test_with_basis_shares_weights_keeps_dtypes_and_replaces_an_old_basis():
    model, source, processor = demo_model()
    fit = fit_matryoshka_basis(model, source, processor, num_workers=0, progress=False)
    half = model.to(torch.bfloat16)
    fitted = with_matryoshka_basis(half, fit)
    assert fitted.embeddings.cls_token.dtype == torch.bfloat16
    assert fitted.embeddings.cls_token.data_ptr() == half.embeddings.cls_token.data_ptr()  # not copied
    assert {p.dtype for n, p in fitted.named_parameters() if n.startswith("matryoshka_basis.")} == {torch.float32}
    assert not any(p.requires_grad for p in fitted.matryoshka_basis.parameters())
    cls_only = MatryoshkaFit(fit.cls, None, fit.images, "cls only")
    again = with_matryoshka_basis(fitted, cls_only)  # a model that has a basis gets the new one
    torch.testing.assert_close(again.matryoshka_basis.cls_rotation, fit.cls.rotation.float())
    assert torch.equal(again.matryoshka_basis.patch_rotation, torch.eye(32))  # no patch fit: patch prefixes
    assert again.config.source_checkpoint["matryoshka_pca"]["data"] == "cls only"


def test_with_and_without_basis_keep_the_attention_implementation_and_gradient_checkpointing():
    model, source, processor = demo_model()
    fit = fit_matryoshka_basis(model, source, processor, num_workers=0, progress=False)
    eager = FrancaModel._from_config(model.config, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    eager.activation_checkpointing_enable({"use_reentrant": False})
    fitted = with_matryoshka_basis(eager.train(), fit)
    prefixes = without_matryoshka_basis(fitted)
    for rebuilt in (fitted, prefixes):
        assert rebuilt.config._attn_implementation == "eager" and rebuilt.training
        assert rebuilt.is_gradient_checkpointing
        assert all(layer.gradient_checkpointing for layer in rebuilt.encoder.layer)
        assert rebuilt.encoder.layer[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert not without_matryoshka_basis(model).is_gradient_checkpointing


def test_too_few_or_no_readable_images_are_explained(tmp_path):
    model, _, processor = demo_model()
    few = files_source(make_images(tmp_path / "few", 20))
    with pytest.raises(ValueError, match="needs at least 33 readable images .* gave 20"):
        fit_matryoshka_basis(model, few, processor, num_workers=0, progress=False)
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"not a png")
    broken = files_source(sorted((tmp_path / "bad").iterdir()))
    with pytest.raises(ValueError, match="None of the 3 images") as error:
        fit_matryoshka_basis(model, broken, processor, num_workers=0, progress=False)
    unreadable = [f"{tmp_path / 'bad' / f'{i}.png'} (UnidentifiedImageError: " for i in range(3)]
    assert str(error.value).count("UnidentifiedImageError") == 3 and all(u in str(error.value) for u in unreadable)
    twice = files_source([*sorted((tmp_path / "bad").iterdir()), tmp_path / "bad" / "0.png"])  # 4 ids, 3 reported
    skips = SkipCounter()
    for position in range(len(twice)):
        skips.record(twice.describe(position), "unreadable")
    assert (
        skips.describe(2)
        == f"{tmp_path / 'bad' / '0.png'} (unreadable); {tmp_path / 'bad' / '1.png'} (unreadable); and 1 more"
    )
    with pytest.raises(ValueError, match="fitted for a FrancaModel; got a Linear"):
        accumulate_token_statistics(torch.nn.Linear(2, 2), few, processor)

"""The Matryoshka width has one public name (`dim`), one check and one cut-then-normalise; `forward`'s
`pooler_output` is always the (B, D) CLS token, and `forward(matryoshka_dim=)` is deprecated."""

import numpy
import pytest
import torch

from franca_hf import FrancaModel
from franca_hf.modeling import matryoshka_dim_problem, matryoshka_dims_of, normalized_prefix

from .conftest import tiny_config
from .modeling.test_matryoshka_basis import pca_model

PIXELS = torch.randn(2, 3, 56, 42, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models() -> dict[str, FrancaModel]:
    torch.manual_seed(0)
    return {"prefix": FrancaModel(tiny_config(rasa_steps=1)).eval(), "pca": pca_model(rasa_steps=1)}


@torch.no_grad()
def test_forward_never_cuts(models):
    for model in models.values():
        out = model(PIXELS)
        assert out.pooler_output.shape == (2, 64) and out.patch_tokens.shape == (2, 12, 64)
        torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0], rtol=0, atol=0)


@torch.no_grad()
def test_the_deprecated_keyword_warns_and_gives_what_the_dim_methods_give(models):
    for model in models.values():
        with pytest.warns(FutureWarning, match=r"forward\(matryoshka_dim=\) is deprecated"):
            out = model(PIXELS, matryoshka_dim=16)
        torch.testing.assert_close(out.pooler_output, model.get_image_embeddings(PIXELS, dim=16), rtol=0, atol=0)
        torch.testing.assert_close(
            out.patch_tokens, model.get_dense_features(PIXELS, dim=16, as_grid=False), rtol=0, atol=0
        )
        torch.testing.assert_close(
            out.debiased_patch_tokens,
            model.get_dense_features(PIXELS, debiased=True, dim=16, as_grid=False),
            rtol=0,
            atol=0,
        )


@torch.no_grad()
def test_a_stored_full_width_row_cut_later_is_the_embedding_of_that_width(models):
    for model in models.values():
        full = model.get_image_embeddings(PIXELS, normalize=False)  # (B, D) in the model's basis
        for dim in model.config.matryoshka_dims:
            torch.testing.assert_close(normalized_prefix(full, dim), model.get_image_embeddings(PIXELS, dim=dim))


def test_one_check_and_one_sentence_for_an_unserved_width(models):
    model = models["prefix"]
    assert matryoshka_dims_of(model.config) == [4, 8, 16, 32, 64]
    assert matryoshka_dim_problem(16, [4, 8, 16, 32, 64]) is None
    sentence = "dim=10 is not allowed; choose one of [4, 8, 16, 32, 64]."
    assert matryoshka_dim_problem(10, [4, 8, 16, 32, 64]) == sentence
    assert matryoshka_dim_problem(65, range(1, 65)) == "dim=65 is not allowed; choose one between 1 and 64."
    for method in (model.get_image_embeddings, model.get_dense_features):
        with pytest.raises(ValueError) as raised:
            method(PIXELS, dim=10)
        assert str(raised.value) == sentence


@torch.no_grad()
def test_a_width_is_an_integer_of_any_integer_type(models):
    """16.0 is refused in words (it equals 16, and slicing would fail later); numpy's and torch's integers are
    widths like 16."""
    model = models["pca"]
    for method in (model.get_image_embeddings, model.get_dense_features):
        with pytest.raises(ValueError) as raised:
            method(PIXELS, dim=16.0)
        assert str(raised.value) == "dim=16.0 is not an integer; choose one of [4, 8, 16, 32, 64]."
        expected = method(PIXELS, dim=16)
        for width in (numpy.int64(16), torch.tensor(16)):
            torch.testing.assert_close(method(PIXELS, dim=width), expected, rtol=0, atol=0)
    assert matryoshka_dim_problem(7.5, range(1, 65)) == "dim=7.5 is not an integer; choose one between 1 and 64."

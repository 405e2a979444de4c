"""RASA in the model: stored directions are model weights, applied as the official chain formula does."""

import torch

from franca_hf import FrancaModel
from franca_hf.modeling import orthonormalize_rasa_weights, remove_position_directions
from franca_hf.rasa import official_rasa_chain

from ..conftest import tiny_config


def test_basis_is_orthonormal_per_step():
    basis = orthonormalize_rasa_weights(torch.randn(5, 2, 32))
    gram = basis @ basis.transpose(1, 2)
    assert torch.allclose(gram, torch.eye(2).expand(5, 2, 2), atol=1e-6)


def test_model_debiasing_equals_the_official_chain_and_removes_the_directions():
    torch.manual_seed(0)
    model = FrancaModel(tiny_config(rasa_steps=3)).eval()
    weights = torch.randn(3, 2, 64)
    model.rasa.position_weights.copy_(weights)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixels)
    expected = official_rasa_chain(out.patch_tokens, weights)
    assert torch.allclose(out.debiased_patch_tokens, expected, atol=1e-5)
    # the last step's directions are gone; CLS and last_hidden_state are untouched
    last = orthonormalize_rasa_weights(weights)[-1]
    assert (out.debiased_patch_tokens @ last.T).abs().max() < 1e-4
    assert (out.patch_tokens @ last.T).abs().max() > 0.1
    assert torch.equal(out.last_hidden_state[:, 1:], out.patch_tokens)


def test_basis_follows_the_stored_weights():
    """No cache: the basis is recomputed from the weights on every call (cheap, and traceable by torch.export)."""
    model = FrancaModel(tiny_config(rasa_steps=2))
    model.rasa.position_weights.copy_(torch.randn(2, 2, 64))
    first = model.rasa.basis()
    torch.testing.assert_close(first, orthonormalize_rasa_weights(model.rasa.position_weights))
    model.rasa.position_weights.copy_(torch.randn(2, 2, 64))
    second = model.rasa.basis()
    torch.testing.assert_close(second, orthonormalize_rasa_weights(model.rasa.position_weights))
    assert not torch.allclose(first, second)


def test_low_precision_tokens_keep_their_dtype():
    basis = orthonormalize_rasa_weights(torch.randn(2, 2, 16))
    tokens = torch.randn(3, 5, 16)
    half = remove_position_directions(tokens.bfloat16(), basis)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), remove_position_directions(tokens, basis), atol=0.05)

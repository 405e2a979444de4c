"""model_fingerprint: equal for the same model however it is held or stored, different for any change of weights,
RASA directions, Matryoshka basis or output-changing architecture."""

import re

import pytest
import torch
from transformers import AutoModel, Dinov2Config, Dinov2Model

from franca_hf import FrancaModel
from franca_hf.features import quantize_int8
from franca_hf.fingerprint import model_fingerprint

from .conftest import tiny_config


def tiny_model(**overrides) -> FrancaModel:
    torch.manual_seed(0)
    values = dict(rasa_steps=1, matryoshka_basis="pca")
    values.update(overrides)
    return FrancaModel(tiny_config(**values)).eval()


@pytest.fixture(scope="module")
def model() -> FrancaModel:
    model = tiny_model()
    with torch.no_grad():  # a fitted-looking basis and RASA directions, so that changing them is a real change
        model.rasa.position_weights.normal_()
        rotation, _ = torch.linalg.qr(torch.randn(64, 64))
        model.matryoshka_basis.cls_rotation.copy_(rotation)
    return model


def test_the_fingerprint_is_a_short_versioned_hash(model):
    assert re.fullmatch(r"v1:[0-9a-f]{32}", model_fingerprint(model))


def test_the_same_model_saved_and_loaded_in_another_dtype_keeps_its_fingerprint(model, tmp_path):
    model.config.source_checkpoint = {"release": "somewhere"}  # provenance is not part of it
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModel.from_pretrained(tmp_path / "saved")
    in_bf16 = AutoModel.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert in_bf16.rasa.position_weights.dtype == torch.float32  # kept fp32; hashed at bf16 precision all the same
    assert model_fingerprint(loaded) == model_fingerprint(model) == model_fingerprint(in_bf16)
    loaded.config.drop_path_rate = 0.3  # training-only
    assert model_fingerprint(loaded) == model_fingerprint(model)


def test_float16_and_int8_copies_have_their_own_fingerprints(model):
    float16 = tiny_model()
    float16.load_state_dict(model.state_dict())
    float16 = float16.half()
    fingerprints = {
        model_fingerprint(model),
        model_fingerprint(float16),
        model_fingerprint(quantize_int8(tiny_model())),
    }
    assert len(fingerprints) == 3


@pytest.mark.parametrize(
    "change",
    ["weight", "rasa", "basis_rotation", "basis_mean", "heads", "layer_norm_eps"],
)
def test_any_output_changing_difference_changes_the_fingerprint(model, change):
    other = tiny_model(**({"num_attention_heads": 4} if change == "heads" else {}))
    other.load_state_dict(model.state_dict())
    assert change == "heads" or model_fingerprint(other) == model_fingerprint(model)
    with torch.no_grad():
        if change == "weight":
            other.encoder.layer[1].mlp.w3.weight[0, 0] += 0.01
        elif change == "rasa":
            other.rasa.position_weights[0, 1, 3] += 0.01
        elif change == "basis_rotation":
            other.matryoshka_basis.cls_rotation[:, [0, 1]] = other.matryoshka_basis.cls_rotation[:, [1, 0]]
        elif change == "basis_mean":
            other.matryoshka_basis.patch_mean[5] = 0.25
        elif change == "layer_norm_eps":
            other.config.layer_norm_eps = 1e-5
    assert model_fingerprint(other) != model_fingerprint(model)


def test_other_transformers_models_have_fingerprints_too():
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8
    )
    torch.manual_seed(0)
    first = Dinov2Model(config)
    torch.manual_seed(0)
    same = Dinov2Model(config)
    assert model_fingerprint(first) == model_fingerprint(same) != model_fingerprint(tiny_model())

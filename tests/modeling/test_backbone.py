"""FrancaBackbone: stage selection, feature-map shapes, debiasing, loading through transformers.

`AutoBackbone.from_pretrained(local_dir)` is broken in transformers 5.24 (it treats the path as a Hub repo id),
so folders are loaded through the concrete class; `AutoBackbone.from_config` is tested as the Auto entry point.
"""

import pytest
import torch
from transformers import AutoBackbone

from franca_hf import FrancaBackbone, FrancaModel

from ..conftest import tiny_config


def test_auto_backbone_from_config_and_stages():
    config = tiny_config(num_hidden_layers=3, out_indices=[1, 3])
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, FrancaBackbone)
    assert backbone.out_features == ["stage1", "stage3"] and backbone.channels == [64, 64]
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 42, 70)).feature_maps
    assert [m.shape for m in maps] == [(2, 64, 3, 5), (2, 64, 3, 5)]


def test_backbone_maps_equal_model_outputs(tiny_folder, reference):
    backbone = FrancaBackbone.from_pretrained(tiny_folder, out_features=["stage2", "stage4"]).eval()
    model = FrancaModel.from_pretrained(tiny_folder).eval()
    pixels = reference["70x126.pixel_values"]
    with torch.no_grad():
        stage2, stage4 = backbone(pixels).feature_maps
        out = model(pixels)
        (intermediate,) = model.get_intermediate_layers(pixels, n=[1], reshape=True)
        debiased = backbone(pixels, debiased=True).feature_maps[1]
    assert torch.allclose(stage4, model.get_dense_features(pixels), atol=1e-6)
    assert torch.allclose(stage2, intermediate, atol=1e-6)
    expected = out.debiased_patch_tokens.reshape(2, 5, 9, 128).permute(0, 3, 1, 2)
    assert torch.allclose(debiased, expected, atol=1e-6)


def test_backbone_options_and_errors():
    backbone = FrancaBackbone(tiny_config(reshape_hidden_states=False, apply_layernorm=False)).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 56, 56), output_hidden_states=True)
    # as Dinov2Backbone: unreshaped maps keep the CLS token
    assert out.feature_maps[0].shape == (1, 17, 64) and len(out.hidden_states) == 3
    assert torch.equal(out.feature_maps[0], out.hidden_states[-1])
    with pytest.raises(ValueError, match="need RASA weights"):
        backbone(torch.randn(1, 3, 56, 56), debiased=True)
    with pytest.raises(ValueError, match="out_features must be a subset"):
        tiny_config(out_features=["stage9"])

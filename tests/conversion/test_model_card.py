"""Model cards describe the model of their config: architecture name, patch size, token counts and crop rule."""

import pytest

from franca_hf.conversion.model_card import render_model_card
from franca_hf.modeling import FRANCA_PRESETS, FrancaConfig
from franca_hf.training.config import load_config


@pytest.mark.parametrize(
    ("preset", "name"),
    [("vit_small", "ViT-S/14"), ("vit_base", "ViT-B/14"), ("vit_large", "ViT-L/14"), ("vit_giant2", "ViT-g/14")],
)
def test_preset_cards_name_the_preset_and_count_224_px_tokens(preset, name):
    hidden, depth, heads = FRANCA_PRESETS[preset]
    config = FrancaConfig(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, image_size=224, rasa_steps=1
    )
    card = render_model_card(config)
    assert f"# Franca {name}\n" in card and f"| architecture | {name}: {hidden} wide, {depth} blocks" in card
    assert f"# (1, 256, {hidden}) final-normed patch tokens" in card
    assert f"# (1, {hidden}, 16, 16) RASA-debiased" in card
    assert "224x224 px (16x16 patches of 14 px)" in card and "not multiples of 14 are cropped" in card


def test_the_demo_layout_is_described_as_it_is():
    config = FrancaConfig(**load_config("demo").backbone_settings())
    card = render_model_card(config)
    assert "# Franca ViT of a custom size (128 wide, 4 blocks, patch 8)\n" in card
    assert "# (1, 16, 128) final-normed patch tokens" in card and "# (1, 128) final-normed CLS" in card
    assert "32x32 px (4x4 patches of 8 px)" in card and "not multiples of 8 are cropped" in card
    assert "| architecture | ViT of a custom size: 128 wide, 4 blocks, 4 heads, patch 8," in card
    assert "ViT-" not in card and "/14" not in card and " 14 " not in card and "(1, 256" not in card


def test_a_preset_size_with_another_patch_size_says_that_patch_size():
    hidden, depth, heads = FRANCA_PRESETS["vit_base"]
    config = FrancaConfig(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, patch_size=16)
    assert "# Franca ViT-B/16\n" in render_model_card(config)

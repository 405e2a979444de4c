"""FrancaModel against the official outputs, and its transformers behaviour."""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from franca_hf import FrancaBackbone, FrancaConfig, FrancaModel
from franca_hf.modeling import interpolate_position_table
from franca_hf.modeling.modeling_franca import FrancaDropPath

from ..conftest import REFERENCE_SIZES, tiny_config

TOLERANCE = 1e-5


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def converted(request, tiny_folder):
    model = AutoModel.from_pretrained(tiny_folder, attn_implementation=request.param).eval()
    assert isinstance(model, FrancaModel)
    assert model.config._attn_implementation == request.param
    return model


@pytest.mark.parametrize("size", REFERENCE_SIZES)
@torch.no_grad()
def test_outputs_match_official(converted, reference, size):
    pixels = reference[f"{size}.pixel_values"]
    out = converted(pixels, output_hidden_states=True)
    assert _max_error(out.pooler_output, reference[f"{size}.cls"]) <= TOLERANCE
    assert _max_error(out.patch_tokens, reference[f"{size}.patch"]) <= TOLERANCE
    assert _max_error(out.hidden_states[-1], reference[f"{size}.prenorm"]) <= TOLERANCE
    assert _max_error(out.debiased_patch_tokens, reference[f"{size}.patch_rasa"]) <= TOLERANCE
    assert _max_error(out.last_hidden_state[:, 0], reference[f"{size}.cls"]) <= TOLERANCE


@pytest.mark.parametrize("size", REFERENCE_SIZES)
@torch.no_grad()
def test_intermediate_layers_match_official(converted, reference, size):
    pixels = reference[f"{size}.pixel_values"]
    layer0, layer2 = converted.get_intermediate_layers(pixels, n=[0, 2], norm=True)
    assert _max_error(layer0, reference[f"{size}.intermediate_normed_0"]) <= TOLERANCE
    assert _max_error(layer2, reference[f"{size}.intermediate_normed_2"]) <= TOLERANCE
    # the last two blocks as (patches, cls) grids, like the official reshape/return_class_token options
    (grid, cls), _ = converted.get_intermediate_layers(pixels, n=2, reshape=True, return_class_token=True)
    height, width = (int(s) // 14 for s in size.split("x"))
    assert grid.shape == (2, 128, height, width)
    assert (
        _max_error(grid, reference[f"{size}.intermediate_normed_2"].reshape(2, height, width, 128).permute(0, 3, 1, 2))
        <= TOLERANCE
    )
    assert cls.shape == (2, 128)


@torch.no_grad()
def test_masked_forward_matches_official(converted, reference):
    out = converted(reference["masked.pixel_values"], bool_masked_pos=reference["masked.masks"])
    assert _max_error(out.pooler_output, reference["masked.cls"]) <= TOLERANCE
    assert _max_error(out.patch_tokens, reference["masked.patch"]) <= TOLERANCE
    unmasked = converted(reference["masked.pixel_values"])
    assert _max_error(unmasked.pooler_output, reference["masked.cls"]) > 1e-3  # the mask really changes the output


@torch.no_grad()
def test_matryoshka_truncation_is_a_prefix(converted, reference):
    pixels = reference["98x98.pixel_values"]
    full = converted(pixels)
    for dim in converted.config.matryoshka_dims:
        out = converted(pixels, matryoshka_dim=dim)
        expected = torch.nn.functional.normalize(full.pooler_output[:, :dim], dim=-1)  # truncate, then normalise
        assert out.pooler_output.shape == (2, dim)
        torch.testing.assert_close(out.pooler_output, expected, rtol=0, atol=1e-6)
        assert torch.equal(out.patch_tokens, full.patch_tokens[..., :dim])
        assert torch.equal(out.debiased_patch_tokens, full.debiased_patch_tokens[..., :dim])
        assert torch.equal(out.last_hidden_state, full.last_hidden_state)  # never truncated
        assert torch.equal(converted.get_image_embeddings(pixels, dim=dim), out.pooler_output)
        features = converted.get_image_features(pixels, dim=dim)
        assert torch.equal(features.pooler_output, out.pooler_output)
        assert torch.equal(features.last_hidden_state, full.last_hidden_state)
        raw = converted.get_image_embeddings(pixels, dim=dim, normalize=False)
        assert torch.equal(raw, full.pooler_output[:, :dim])


def test_image_features_follow_transformers_5():
    """`get_image_features` returns a model output (hidden states and attentions on request, a tuple with
    return_dict=False), and nothing crashes when the config asks for tuples."""
    model = FrancaModel(tiny_config(rasa_steps=1)).eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model.get_image_features(pixels, dim=16, output_hidden_states=True, output_attentions=True)
        assert out.pooler_output.shape == (2, 16) and len(out.hidden_states) == 3 and len(out.attentions) == 2
        as_tuple = model.get_image_features(pixels, dim=16, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.pooler_output)
        model.config.return_dict = False
        assert isinstance(model(pixels), tuple) and isinstance(model.get_image_features(pixels), tuple)
        assert torch.equal(model.get_image_embeddings(pixels, dim=16), out.pooler_output)
        assert model.get_dense_features(pixels, debiased=True).shape == (2, 64, 4, 4)


@torch.no_grad()
def test_dense_features(converted, reference):
    pixels = reference["70x126.pixel_values"]
    out = converted(pixels)
    grid = converted.get_dense_features(pixels, debiased=True, dim=32)
    assert grid.shape == (2, 32, 5, 9)
    expected = out.debiased_patch_tokens[..., :32].reshape(2, 5, 9, 32).permute(0, 3, 1, 2)
    assert torch.equal(grid, expected)
    flat = converted.get_dense_features(pixels, as_grid=False)
    assert torch.equal(flat, out.patch_tokens)


def test_save_load_round_trip_is_exact(converted, tmp_path, reference):
    converted.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path, attn_implementation=converted.config._attn_implementation).eval()
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    pixels = reference["112x112.pixel_values"]
    with torch.no_grad():
        assert torch.equal(converted(pixels).debiased_patch_tokens, reloaded(pixels).debiased_patch_tokens)


def test_folder_has_image_processor_and_config(tiny_folder):
    processor = AutoImageProcessor.from_pretrained(tiny_folder)
    assert processor.crop_size == {"height": 224, "width": 224}
    assert processor.size == {"shortest_edge": 256}
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]
    config = AutoConfig.from_pretrained(tiny_folder)
    assert isinstance(config, FrancaConfig) and config.rasa_steps == 10 and config.position_grid_size == 7


def test_bad_inputs_raise_clear_errors():
    model = FrancaModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="has 1 channels; this model takes 3"):
        model(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(torch.randn(1, 3, 10, 56))
    with pytest.raises(ValueError, match=r"matryoshka_dim=10 is not allowed; choose one of \[4, 8, 16, 32, 64\]"):
        model(torch.randn(1, 3, 56, 56), matryoshka_dim=10)
    with pytest.raises(ValueError, match="needs RASA weights"):
        model.get_dense_features(torch.randn(1, 3, 56, 56), debiased=True)
    with pytest.raises(ValueError, match=r"bool_masked_pos must have shape \(batch, patches\) = \(1, 16\)"):
        model(torch.randn(1, 3, 56, 56), bool_masked_pos=torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(torch.randn(1, 3, 56, 56), n=[5])


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        FrancaConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="ffn_type must be one of"):
        FrancaConfig(ffn_type="moe")
    with pytest.raises(ValueError, match=r"matryoshka_dims must be strictly increasing positive integers ending at 64"):
        FrancaConfig(hidden_size=64, num_attention_heads=2, matryoshka_dims=[8, 32])
    with pytest.raises(ValueError, match="Unknown preset"):
        FrancaConfig.from_preset("vit_huge")
    for field, value in [("rasa_steps", 1.5), ("rasa_steps", "2"), ("num_register_tokens", -1)]:
        with pytest.raises(ValueError, match=rf"FrancaConfig.{field} must be an integer >= 0, got {value!r}"):
            tiny_config(**{field: value})
    for offset in (1.0, -0.5):  # the resized table would not have the input's grid (a reshape error at other sizes)
        with pytest.raises(ValueError, match=rf"interpolate_offset must be a number in \[0, 1\), got {offset}"):
            tiny_config(interpolate_offset=offset)
    for dims in ([4.7, 8, 16, 32, 64], ["4", 8, 16, 32, 64]):  # not rounded or parsed into other widths
        with pytest.raises(ValueError, match="matryoshka_dims must be a list of integers"):
            tiny_config(matryoshka_dims=dims)
    assert tiny_config(matryoshka_dims=[torch.tensor(4), 8, 16, 32, 64]).matryoshka_dims == [4, 8, 16, 32, 64]


def test_values_set_on_a_config_after_it_was_made_are_checked_when_a_model_is_built():
    config = tiny_config()
    config.matryoshka_basis = "PCA"
    with pytest.raises(ValueError, match="matryoshka_basis must be one of"):
        FrancaModel(config)
    config.matryoshka_basis, config.rasa_steps = "prefix", -3
    with pytest.raises(ValueError, match="rasa_steps must be an integer >= 0, got -3"):
        FrancaBackbone(config)


def test_presets_match_the_paper():
    expected = {
        "vit_small": (384, 12, 6, 1024),
        "vit_base": (768, 12, 12, 2048),
        "vit_large": (1024, 24, 16, 2736),
        "vit_giant2": (1536, 40, 24, 4096),
    }
    for name, (hidden, depth, heads, ffn) in expected.items():
        config = FrancaConfig.from_preset(name)
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, depth, heads)
        assert config.ffn_hidden_size == ffn
        assert config.matryoshka_dims == [hidden // 16, hidden // 8, hidden // 4, hidden // 2, hidden]
    with torch.device("meta"):
        base = FrancaModel(FrancaConfig.from_preset("vit_base"))
    assert 85e6 < sum(p.numel() for p in base.parameters()) < 88e6


def test_sizes_not_multiple_of_patch_are_cropped_with_one_warning(caplog):
    model = FrancaModel(tiny_config()).eval()
    pixels = torch.randn(2, 3, 60, 71)
    with torch.no_grad(), caplog.at_level("WARNING"):
        cropped = model(pixels)
        model(pixels)
        expected = model(pixels[:, :, :56, :70])
    warnings = [r.getMessage() for r in caplog.records if "not a multiple of the patch size" in r.getMessage()]
    assert warnings == [
        "Image size 60x71 is not a multiple of the patch size 14: cropping to 56x70 (top-left), "
        "as the official Franca model does."
    ]
    assert torch.equal(cropped.last_hidden_state, expected.last_hidden_state)
    assert cropped.patch_tokens.shape == (2, 4 * 5, 64)


def test_position_interpolation_uses_the_offset_kludge():
    table = torch.randn(1, 1 + 7 * 7, 8)
    with_offset = interpolate_position_table(table, 5, 9, offset=0.1)
    exact_size = interpolate_position_table(table, 5, 9, offset=0.0)
    manual = (
        torch.nn.functional.interpolate(
            table[:, 1:].reshape(1, 7, 7, 8).permute(0, 3, 1, 2), scale_factor=(5.1 / 7, 9.1 / 7), mode="bicubic"
        )
        .permute(0, 2, 3, 1)
        .reshape(1, 45, 8)
    )
    assert torch.equal(with_offset[:, 1:], manual)
    assert torch.equal(with_offset[:, :1], table[:, :1])
    assert (with_offset - exact_size).abs().max() > 1e-3
    assert interpolate_position_table(table, 7, 7) is table
    half = interpolate_position_table(table.half(), 5, 9)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), with_offset, atol=1e-2)


def test_hidden_states_attentions_and_tuple_output():
    model = FrancaModel(tiny_config()).eval()
    model.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, output_attentions=True)
        as_tuple = model(pixels, return_dict=False)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 17, 64)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 17, 17)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(2, 2, 17))
    assert torch.equal(as_tuple[0], out.last_hidden_state) and torch.equal(as_tuple[1], out.pooler_output)


def test_attentions_under_sdpa_fall_back_to_eager_with_a_warning(caplog):
    model = FrancaModel(tiny_config()).eval()
    assert model.config._attn_implementation == "sdpa"
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad(), caplog.at_level("WARNING"):
        sdpa = model(pixels, output_attentions=True)
        model.set_attn_implementation("eager")
        eager = model(pixels, output_attentions=True)
    assert any("falling back to 'eager'" in record.getMessage() for record in caplog.records)
    assert len(sdpa.attentions) == 2
    for a, b in zip(sdpa.attentions, eager.attentions, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state)


def test_sdpa_and_eager_agree_and_registers_are_supported():
    config = tiny_config(num_register_tokens=4, rasa_steps=2)
    model = FrancaModel(config).eval()
    pixels = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        sdpa = model(pixels)
        model.set_attn_implementation("eager")
        eager = model(pixels)
    assert sdpa.last_hidden_state.shape == (2, 1 + 4 + 15, 64)
    assert sdpa.patch_tokens.shape == (2, 15, 64)
    assert torch.allclose(sdpa.last_hidden_state, eager.last_hidden_state, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = FrancaModel(tiny_config(drop_path_rate=0.0)).train()
    pixels = torch.randn(2, 3, 56, 56)

    def gradients():
        model.zero_grad()
        model(pixels).pooler_output.square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.encoder.layer)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_init_matches_the_official_scheme():
    torch.manual_seed(0)
    model = FrancaModel(tiny_config(hidden_size=192, num_attention_heads=3, num_register_tokens=2))
    qkv = model.encoder.layer[0].attention.qkv
    # torch's trunc_normal_(std=0.02) truncates at +-2 absolute (as the official init does), i.e. not at all here
    assert abs(qkv.weight.std().item() - 0.02) < 0.002 and abs(qkv.weight.mean().item()) < 0.002
    assert torch.count_nonzero(qkv.bias) == 0
    assert torch.all(model.encoder.layer[0].layer_scale1.lambda1 == 1e-5)
    assert model.embeddings.cls_token.abs().max() < 1e-5
    assert model.embeddings.register_tokens.abs().max() < 1e-5
    assert torch.count_nonzero(model.embeddings.mask_token) == 0
    assert abs(model.embeddings.position_embeddings.std().item() - 0.02) < 0.002


def test_drop_path_only_in_training():
    model = FrancaModel(tiny_config(drop_path_rate=0.5))
    pixels = torch.randn(4, 3, 56, 56)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixels).last_hidden_state, model(pixels).last_hidden_state)
        model.train()
        torch.manual_seed(1)
        first = model(pixels).last_hidden_state
        torch.manual_seed(2)
        second = model(pixels).last_hidden_state
    assert not torch.equal(first, second)


def test_subset_drop_path_runs_the_branch_on_exactly_the_kept_samples():
    """The official form: floor(B(1 - p)) samples through the branch, added back scaled by B / kept."""
    drop = FrancaDropPath(0.3, "subset").train()
    seen = []

    def branch(x):
        seen.append(x.shape[0])
        return torch.ones_like(x)

    torch.manual_seed(0)
    out = drop(torch.zeros(10, 5, 3), branch)
    assert seen == [7]
    per_sample = out[:, 0, 0]
    assert torch.count_nonzero(per_sample) == 7
    torch.testing.assert_close(per_sample[per_sample != 0], torch.full((7,), 10 / 7))
    assert torch.all(out == out[:, :1, :1])  # whole samples, never single tokens
    assert torch.equal(drop.eval()(torch.zeros(10, 5, 3), branch), torch.ones(10, 5, 3))


def test_sample_drop_path_keeps_each_sample_independently():
    drop = FrancaDropPath(0.5, "sample").train()
    torch.manual_seed(0)
    per_sample = drop(torch.zeros(4000, 1, 1), torch.ones_like).flatten()
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert 0.47 < (per_sample > 0).float().mean() < 0.53  # Bernoulli(0.5): 4000 draws, 4 sigma
    with pytest.raises(ValueError, match="drop_path_mode must be one of"):
        tiny_config(drop_path_mode="batch")


def test_one_default_nesting_for_model_heads_and_indexes():
    """The model's Matryoshka dims, the heads' nesting and an index's dims are one list: the official integer
    division [D // 16, D // 8, D // 4, D // 2, D], without zeros or repeats."""
    from franca_hf.modeling import default_matryoshka_dims
    from franca_hf.retrieval import EmbeddingIndex
    from franca_hf.training.heads import MatryoshkaHead

    assert default_matryoshka_dims(100) == [6, 12, 25, 50, 100]
    assert default_matryoshka_dims(8) == [1, 2, 4, 8]
    config = FrancaConfig(hidden_size=100, num_attention_heads=4)
    head = MatryoshkaHead(100, num_prototypes=400, hidden_dim=16, bottleneck_dim=8)
    index = EmbeddingIndex(torch.randn(3, 100))
    assert config.matryoshka_dims == head.nesting_dims == index.dims == [6, 12, 25, 50, 100]

"""The official-checkpoint converter: layouts, inferred architecture, and every error it promises."""

import pytest
import torch

from franca_hf import FrancaModel
from franca_hf.cli import main
from franca_hf.conversion.checkpoint import CheckpointError, load_rasa_weights
from franca_hf.conversion.convert import convert_checkpoint

from ..conftest import RASA_CHECKPOINT, TEACHER_CHECKPOINT, tiny_config

_BACK = {
    "attention.qkv": "attn.qkv",
    "attention.proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


def to_official(model: FrancaModel, chunks: int = 0, prefix: str = "backbone.") -> dict:
    """Write a FrancaModel state dict in the official layout (flat or chunked blocks), as the official trainer does."""
    depth = model.config.num_hidden_layers
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.layer."):
            _, _, index, rest = key.split(".", 3)
            for ours, theirs in _BACK.items():
                rest = rest.replace(ours, theirs)
            block = f"{int(index) // (depth // chunks)}.{index}" if chunks else index
            key = f"blocks.{block}.{rest}"
        else:
            key = {
                "embeddings.cls_token": "cls_token",
                "embeddings.mask_token": "mask_token",
                "embeddings.position_embeddings": "pos_embed",
                "embeddings.register_tokens": "register_tokens",
                "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                "layernorm.weight": "norm.weight",
                "layernorm.bias": "norm.bias",
            }[key]
        out[prefix + key] = value.clone()
    return out


@pytest.mark.parametrize(
    ("overrides", "chunks", "prefix"),
    [({}, 2, "module.backbone."), ({"ffn_type": "mlp"}, 0, "backbone."), ({"num_register_tokens": 4}, 0, "")],
    ids=["chunked-swiglu", "flat-mlp", "registers"],
)
def test_layouts_convert_exactly(tmp_path, overrides, chunks, prefix):
    torch.manual_seed(0)
    model = FrancaModel(tiny_config(hidden_size=128, num_attention_heads=2, **overrides)).eval()
    torch.save({"teacher": to_official(model, chunks, prefix)}, tmp_path / "ckpt.pth")
    result = convert_checkpoint(tmp_path / "ckpt.pth", tmp_path / "hf")
    assert result.config.ffn_type == model.config.ffn_type
    assert result.config.num_register_tokens == model.config.num_register_tokens
    assert result.config.num_attention_heads == 2  # hidden / 64
    assert max(result.parity.values()) <= 1e-5
    converted = FrancaModel.from_pretrained(tmp_path / "hf")
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key


def test_reference_conversion_reports_heads_and_provenance(tmp_path):
    result = convert_checkpoint(TEACHER_CHECKPOINT, tmp_path / "hf", rasa=RASA_CHECKPOINT, dtype="bfloat16")
    assert result.report.converted == 4 * 14 + 7  # 14 tensors per block, 7 outside the blocks
    assert len(result.report.skipped_heads) == 100 and all(
        k.startswith(("dino_head.", "ibot_head.")) for k in result.report.skipped_heads
    )
    assert result.config.rasa_steps == 10 and result.config.position_grid_size == 7
    source = result.config.source_checkpoint
    assert len(source["sha256"]) == 64 and source["file"] == "teacher_checkpoint.pth" and source["parity"]
    reloaded = FrancaModel.from_pretrained(tmp_path / "hf")
    assert reloaded.dtype == torch.bfloat16
    card = (tmp_path / "hf" / "README.md").read_text()
    assert source["sha256"] in card and "pipeline_tag: image-feature-extraction" in card


def test_rasa_weights_keep_the_training_order():
    weights = load_rasa_weights(RASA_CHECKPOINT, 128)
    raw = torch.load(RASA_CHECKPOINT, weights_only=True)
    assert weights.shape == (10, 2, 128)
    assert torch.equal(weights[0], raw["rasa_head.pre_pos_layers.0.weight"])
    assert torch.equal(weights[8], raw["rasa_head.pre_pos_layers.8.weight"])
    assert torch.equal(weights[9], raw["rasa_head.pos_pred.weight"])


def _reference_teacher() -> dict:
    return torch.load(TEACHER_CHECKPOINT, weights_only=True)


def test_truncated_file_is_an_error(tmp_path):
    data = TEACHER_CHECKPOINT.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert_checkpoint(tmp_path / "cut.pth", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_missing_key_is_an_error_naming_it(tmp_path):
    checkpoint = _reference_teacher()
    del checkpoint["teacher"]["backbone.blocks.2.2.attn.proj.bias"]
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(tmp_path / "ckpt.pth", tmp_path / "hf")
    assert (
        "missing backbone keys (official name <- FrancaModel name): "
        "['blocks.2.2.attn.proj.bias <- encoder.layer.2.attention.proj.bias']"
    ) in str(error.value)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    checkpoint = _reference_teacher()
    checkpoint["teacher"]["backbone.extra_head.weight"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match=r"removing module\./backbone\. prefixes\): \['extra_head.weight'\]"):
        convert_checkpoint(tmp_path / "ckpt.pth", tmp_path / "hf")


def test_bad_rasa_file_and_existing_output(tmp_path):
    torch.save(
        {"rasa_head.pre_pos_layers.1.weight": torch.zeros(2, 128), "rasa_head.pos_pred.weight": torch.zeros(2, 128)},
        tmp_path / "rasa.pth",
    )
    with pytest.raises(CheckpointError, match="numbered 0..n-1"):
        load_rasa_weights(tmp_path / "rasa.pth")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # a model folder: replaced only with overwrite
    with pytest.raises(FileExistsError, match="already holds a model; pass overwrite=True to replace it"):
        convert_checkpoint(TEACHER_CHECKPOINT, tmp_path / "hf")
    convert_checkpoint(TEACHER_CHECKPOINT, tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging leftovers


def test_preset_and_head_count(tmp_path):
    with pytest.raises(CheckpointError, match="Preset vit_base is 768 wide"):
        convert_checkpoint(TEACHER_CHECKPOINT, tmp_path / "a", preset="vit_base")
    result = convert_checkpoint(TEACHER_CHECKPOINT, tmp_path / "b", num_heads=4)
    assert result.config.num_attention_heads == 4


def test_files_that_are_not_checkpoints_are_one_line_errors(tmp_path, capsys):
    """What is not a checkpoint (a folder, an empty file, text, a pickle of something else) or not a RASA head (a bare
    tensor, a head of the wrong shape) is named in one line, without torch's advice to load it unsafely."""
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("# not weights\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    wide = {"rasa_head.pre_pos_layers.0.weight": torch.zeros(2, 128), "rasa_head.pos_pred.weight": torch.zeros(3, 128)}
    torch.save(wide, tmp_path / "wide_rasa.pth")
    checkpoint = str(TEACHER_CHECKPOINT)
    cases = [
        ([str(TEACHER_CHECKPOINT.parent)], "is a folder; give the checkpoint file in it (.pth)."),
        ([str(tmp_path / "empty.pth")], "is empty (0 bytes); delete it and download it again."),
        ([str(tmp_path / "notes.pth")], "weights_only=True (Unsupported operand 35): it is not a torch checkpoint"),
        ([checkpoint, "--rasa", str(tmp_path / "tensor.pth")], "tensor.pth is not a RASA head: it holds a Tensor"),
        (
            [checkpoint, "--rasa", str(tmp_path / "wide_rasa.pth")],
            "RASA weights must be (2, 128) each (pre_pos_layers..., pos_pred); got [(2, 128), (3, 128)].",
        ),
    ]
    for argv, message in cases:
        assert main(["convert", *argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1 and "weights_only` set to `False`" not in err, err
    assert not (tmp_path / "out").exists()

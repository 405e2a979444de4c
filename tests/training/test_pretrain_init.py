"""Training on from an HF folder (`model.init_from`): fp32 master weights whatever the folder stores, and RASA
directions that the training would make stale are dropped, with a note on the exported teacher's card."""

import logging

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModel

from franca_hf.conversion.convert import convert_checkpoint
from franca_hf.modeling import FrancaConfig
from franca_hf.training.config import PretrainConfig
from franca_hf.training.export import export_teacher
from franca_hf.training.networks import build_networks
from franca_hf.training.pretrain import TrainState

from ..conftest import RASA_CHECKPOINT, TEACHER_CHECKPOINT, assert_publishable_folder


@pytest.fixture(scope="module")
def bf16_folder_with_rasa(tmp_path_factory):
    """The tiny reference converted as `franca-hf convert --dtype bfloat16 --rasa ...` writes it."""
    folder = tmp_path_factory.mktemp("init") / "bf16"
    convert_checkpoint(TEACHER_CHECKPOINT, folder, rasa=RASA_CHECKPOINT, dtype="bfloat16")
    return folder


def _config(folder, output_dir) -> PretrainConfig:
    config = PretrainConfig()
    config.model.init_from, config.crops.global_size = str(folder), 42
    config.heads.num_prototypes, config.heads.hidden_dim = 32, 32
    config.heads.dino_bottleneck_dim = config.heads.ibot_bottleneck_dim = 16
    config.run.output_dir = str(output_dir)
    return config


def test_a_bf16_folder_trains_fp32_master_weights(bf16_folder_with_rasa, tmp_path, caplog):
    assert AutoModel.from_pretrained(bf16_folder_with_rasa).dtype == torch.bfloat16  # what transformers loads
    with caplog.at_level(logging.INFO, logger="franca_hf"):
        student, teacher = build_networks(_config(bf16_folder_with_rasa, tmp_path))
    assert {p.dtype for p in student.parameters()} == {p.dtype for p in teacher.parameters()} == {torch.float32}
    assert "stores bfloat16 weights; student and teacher train float32 master weights" in caplog.text
    for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
        assert torch.equal(s, t)

    # One AdamW step at the high-resolution recipe's learning rate moves every weight that has a gradient (bf16
    # masters kept a few percent of them).
    pixels = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    student.backbone(pixels).last_hidden_state.square().mean().backward()
    before = {name: p.detach().clone() for name, p in student.backbone.named_parameters()}
    torch.optim.AdamW(student.backbone.parameters(), lr=1.25e-5).step()
    moved = total = 0
    for name, p in student.backbone.named_parameters():
        if p.grad is not None:
            has_gradient = p.grad != 0
            moved += (p.detach() != before[name])[has_gradient].sum().item()
            total += has_gradient.sum().item()
    assert total > 0.9 * sum(p.numel() for p in student.backbone.parameters())
    assert moved / total > 0.999


def test_rasa_of_the_starting_folder_is_dropped_and_the_card_says_how_to_refit(bf16_folder_with_rasa, tmp_path, caplog):
    assert AutoModel.from_pretrained(bf16_folder_with_rasa).config.rasa_steps == 10
    config = _config(bf16_folder_with_rasa, tmp_path)
    with caplog.at_level(logging.INFO, logger="franca_hf"):
        student, teacher = build_networks(config)
    assert "holds 10 RASA steps fitted to its backbone as it is now" in caplog.text
    assert "franca-hf rasa model=" in caplog.text
    for network in (student, teacher):
        assert network.backbone.rasa is None and network.backbone.config.rasa_steps == 0
        assert not any("rasa" in name for name in network.state_dict())

    folder = export_teacher(Accelerator(cpu=True), teacher, config, TrainState(step=3), "highres_364")
    assert_publishable_folder(folder)
    exported = AutoModel.from_pretrained(folder)
    assert exported.config.rasa_steps == 0 and exported.config.source_checkpoint["dropped_rasa_steps"] == 10
    assert exported.dtype == torch.float32
    output = exported(torch.randn(1, 3, 42, 42))
    assert output.debiased_patch_tokens is None  # no stale debiasing
    card = (folder / "README.md").read_text()
    assert "held 10 RASA steps" in card and "they were dropped" in card
    assert "franca-hf rasa model=path/to/this/folder data=<images>" in card
    assert "| RASA | no (debiased features unavailable) |" in card


@pytest.mark.parametrize("mode", ["subset", "sample"])
def test_drop_path_mode_reaches_new_and_loaded_backbones(bf16_folder_with_rasa, tmp_path, mode):
    """The official subset stochastic depth is every recipe's default; `model.drop_path_mode` selects either form."""
    fresh = PretrainConfig()
    fresh.model.hidden_size, fresh.model.num_hidden_layers, fresh.model.num_attention_heads = 32, 1, 2
    fresh.heads.num_prototypes = fresh.heads.hidden_dim = 32
    fresh.heads.dino_bottleneck_dim = fresh.heads.ibot_bottleneck_dim = 16
    assert FrancaConfig(**fresh.backbone_settings()).drop_path_mode == "subset"  # unset: FrancaConfig's default
    for config in (fresh, _config(bf16_folder_with_rasa, tmp_path)):
        config.model.drop_path_mode, config.model.drop_path_rate = mode, 0.1
        student, teacher = build_networks(config)
        drop = student.backbone.encoder.layer[0].drop_path
        assert (drop.mode, drop.drop_prob) == (mode, 0.1)


def test_a_basis_of_the_starting_folder_is_dropped_and_an_export_can_hold_a_new_one(
    bf16_folder_with_rasa, tmp_path, caplog
):
    from franca_hf.conversion.export import save_model_folder
    from franca_hf.matryoshka import CovarianceAccumulator, MatryoshkaFit, TokenStatistics, with_matryoshka_basis

    def fit(seed: int, data: str) -> MatryoshkaFit:
        generator = torch.Generator().manual_seed(seed)
        statistics = TokenStatistics(CovarianceAccumulator(128), CovarianceAccumulator(128), images=200)
        statistics.cls.update(torch.randn(200, 128, generator=generator))
        statistics.patches.update(torch.randn(800, 128, generator=generator))
        return MatryoshkaFit.from_statistics(statistics, data)

    start = with_matryoshka_basis(AutoModel.from_pretrained(bf16_folder_with_rasa), fit(0, "old images"))
    folder = save_model_folder(start, tmp_path / "with_basis")
    config = _config(folder, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="franca_hf"):
        student, teacher = build_networks(config)
    assert "holds a Matryoshka PCA basis fitted to its backbone as it is now" in caplog.text
    for network in (student, teacher):
        backbone = network.backbone
        assert backbone.matryoshka_basis is None and backbone.config.matryoshka_basis == "prefix"
        assert "matryoshka_pca" not in backbone.config.source_checkpoint
        assert not any("matryoshka_basis" in name for name in network.state_dict())

    exported = AutoModel.from_pretrained(
        export_teacher(Accelerator(cpu=True), teacher, config, TrainState(step=1), "x")
    )
    assert exported.config.matryoshka_basis == "prefix" and "matryoshka_pca" not in exported.config.source_checkpoint
    new = fit(1, "new images")
    folder = export_teacher(Accelerator(cpu=True), teacher, config, TrainState(step=2), "x", new)
    exported = AutoModel.from_pretrained(folder)
    assert exported.config.source_checkpoint["matryoshka_pca"]["data"] == "new images"
    torch.testing.assert_close(exported.matryoshka_basis.cls_rotation, new.cls.rotation.float())
    torch.testing.assert_close(exported.matryoshka_basis.patch_mean, new.patches.mean.float())

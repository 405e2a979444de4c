"""`franca-hf fit-pca`: a complete folder with a fitted Matryoshka basis, from trainer exports and converted releases,
that loads with AutoModel and with remote code where franca_hf cannot be imported; errors that name the flags."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, Dinov2Config, Dinov2Model

import franca_hf.features.extraction
from franca_hf import FrancaModel
from franca_hf.cli import main
from franca_hf.conversion.export import save_model_folder
from franca_hf.features import ModelSpec
from franca_hf.matryoshka import fit_pca as fit_pca_call
from franca_hf.matryoshka_settings import FitPcaSettings
from franca_hf.modeling.image_processing_franca import make_image_processor

from .conftest import assert_publishable_folder, tiny_config
from .conversion.test_remote_code import load_without_the_package
from .features.conftest import make_images


@pytest.fixture()
def trained_folder(tmp_path):
    """A small Franca folder as the trainer exports it (32-px images, patch 8, its provenance), plus a file of its
    own that the new folder must keep."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=32, num_attention_heads=2, patch_size=8, position_grid_size=4, image_size=32)
    model = FrancaModel(config).eval()
    model.config.source_checkpoint = {"trained_with": "franca_hf pretrain", "recipe": "demo", "steps": 500}
    folder = save_model_folder(model, tmp_path / "teacher", image_processor=make_image_processor(32, 32))
    (folder / "rasa_report.json").write_text('{"report": "kept"}')
    return folder


def fit_pca(model, data, out, *extra: str) -> list[str]:
    return ["fit-pca", "--model", str(model), "--data", str(data), "--out", str(out), "--num-workers", "0", *extra]


def test_fit_pca_folder_loads_everywhere_with_identical_features(trained_folder, tmp_path, capsys):
    out = tmp_path / "pca"
    assert main(fit_pca(trained_folder, "demo", out, "--max-images", "200", "--batch-size", "64")) == 0
    printed = capsys.readouterr().out
    assert f"fitted a PCA basis on 200 images of demo (split train) -> {out}" in printed
    assert (
        "| explained variance | dim 2 | dim 4 | dim 8 | dim 16 | dim 32 |" in printed and "| patch tokens |" in printed
    )

    assert_publishable_folder(out)
    assert (out / "rasa_report.json").read_text() == '{"report": "kept"}'
    before, after = load_file(trained_folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k for k in after if not k.startswith("matryoshka_basis.")} == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone is untouched
    config = json.loads((out / "config.json").read_text())
    assert config["matryoshka_basis"] == "pca"
    fit = config["source_checkpoint"]["matryoshka_pca"]
    assert config["source_checkpoint"]["recipe"] == "demo"  # provenance kept
    assert fit["data"] == "demo (split train)" and fit["images"] == 200 and fit["patch_tokens"] == 200 * 16
    assert fit["explained_variance"]["dims"] == [2, 4, 8, 16, 32]
    shares = dict(zip([2, 4, 8, 16, 32], fit["explained_variance"]["cls"], strict=True))
    assert 0 < shares[2] < shares[8] < shares[32] == 1.0
    card = ModelCard.load(out / "README.md")
    assert "Fitted on 200 images of demo (split train) (3,200 patch tokens)" in card.text
    assert f"| CLS embedding | {100 * shares[2]:.1f} % |" in card.text and "license: apache-2.0" in card.content

    model = AutoModel.from_pretrained(out).eval()
    pixels = torch.randn(3, 3, 32, 40)
    remote = load_without_the_package(out, pixels, tmp_path)
    assert remote["class"].startswith("transformers_modules.")
    with torch.no_grad():
        local = model.get_image_embeddings(pixels, dim=8)
        raw = model(pixels)
    torch.testing.assert_close(remote["cls"], local, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            remote["patch"], model.get_dense_features(pixels, dim=8, as_grid=False), rtol=0, atol=1e-6
        )
    prefix = AutoModel.from_pretrained(trained_folder).eval()
    with torch.no_grad():  # the basis is really used: not the prefix
        assert not torch.allclose(prefix.get_image_embeddings(pixels, dim=8), local, atol=1e-2)
    basis = model.matryoshka_basis
    expected = torch.nn.functional.normalize((raw.pooler_output - basis.cls_mean) @ basis.cls_rotation[:, :8], dim=-1)
    torch.testing.assert_close(local, expected)

    half = AutoModel.from_pretrained(out, dtype=torch.bfloat16)
    assert half.embeddings.cls_token.dtype == torch.bfloat16
    assert {p.dtype for n, p in half.named_parameters() if n.startswith("matryoshka_basis.")} == {torch.float32}
    assert torch.equal(half.matryoshka_basis.cls_rotation, basis.cls_rotation)

    # a folder that has a basis is refitted only on request, and the new fit replaces the old one on the card
    assert main(fit_pca(out, "demo", tmp_path / "again", "--max-images", "100")) == 2
    error = capsys.readouterr().err
    assert "already has a fitted Matryoshka basis (fitted on demo (split train)); set overwrite_basis" in error
    assert error.rstrip().endswith("(--overwrite-basis)")
    command = fit_pca(out, "demo", out, "--max-images", "100", "--split", "test", "--overwrite-basis", "--overwrite")
    assert main(command) == 0
    refit = json.loads((out / "config.json").read_text())["source_checkpoint"]["matryoshka_pca"]
    assert refit["data"] == "demo (split test)" and refit["images"] == 100
    assert "Fitted on 100 images of demo (split test)" in (out / "README.md").read_text()


def test_the_fit_pca_call_writes_what_the_command_writes(trained_folder, tmp_path, capsys):
    make_images(tmp_path / "images", 33, size=32)
    assert main(fit_pca(trained_folder, tmp_path / "images", tmp_path / "cli", "--batch-size", "33")) == 0
    printed = capsys.readouterr().out
    options = {"batch_size": 33, "num_workers": 0}
    result = fit_pca_call(
        FitPcaSettings(ModelSpec(str(trained_folder)), str(tmp_path / "images"), tmp_path / "call", **options)
    )

    assert result.folder == tmp_path / "call" and result.images == 33 and result.skipped == 0
    assert printed == (
        f"fitted a PCA basis on 33 images of {tmp_path / 'images'} -> {tmp_path / 'cli'}\n"
        f"{result.explained_variance_table()}\n"
    )
    cli, call = (load_file(tmp_path / name / "model.safetensors") for name in ("cli", "call"))
    assert cli.keys() == call.keys() and all(torch.equal(cli[name], call[name]) for name in cli)
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("cli", "call")]
    assert configs[0] == configs[1] and configs[0]["matryoshka_basis"] == "pca"


def test_fit_pca_on_a_release_name_keeps_its_license_and_rasa(tmp_path, tiny_release_server):
    make_images(tmp_path / "photos", 130, broken=2)  # 129 readable images are what a 128-dim basis needs
    out = tmp_path / "pca"
    assert main(fit_pca("franca_vitb14_In21K", tmp_path / "photos", out, "--batch-size", "65")) == 0
    assert_publishable_folder(out)
    model = AutoModel.from_pretrained(out)
    assert model.config.matryoshka_basis == "pca" and model.has_rasa
    source = model.config.source_checkpoint
    assert source["release"] == "franca_vitb14_In21K" and source["matryoshka_pca"]["images"] == 130
    card = (out / "README.md").read_text()
    assert "license: other" in card and "research-only RAIL" in card and "Fitted on 130 images of" in card


def test_fit_pca_errors_name_the_flags(trained_folder, tmp_path, capsys, monkeypatch):
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    def never_loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(franca_hf.features.extraction, "load_model_and_processor", never_loaded)
    out = tmp_path / "out"
    assert (
        "max_images=10 is too few: a PCA basis of this 32-dim model needs at least 33 images. (--max-images)"
        in error(*fit_pca(trained_folder, "demo", out, "--max-images", "10"))
    )
    make_images(tmp_path / "few", 20)
    assert (
        f"data={tmp_path / 'few'} holds 20 images; a PCA basis of this 32-dim model needs at least 33. (--data)"
        in error(*fit_pca(trained_folder, tmp_path / "few", out))
    )
    (tmp_path / "empty").mkdir()
    assert "No image files found" in error(*fit_pca(trained_folder, tmp_path / "empty", out))
    assert "is not 'demo', 'hf:<dataset>' or an existing image folder" in error(
        *fit_pca(trained_folder, tmp_path / "nope", out)
    )
    assert "batch_size must be at least 1; got 0. (--batch-size)" in error(
        *fit_pca(trained_folder, "demo", out, "--batch-size", "0")
    )
    assert f"{trained_folder} already holds a model; pass overwrite=True to replace it. (--overwrite)" in error(
        *fit_pca(trained_folder, "demo", trained_folder)
    )
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        tmp_path / "dinov2"
    )
    assert "is a 'dinov2' model; fit-pca fits the truncation basis of a Franca model" in error(
        *fit_pca(tmp_path / "dinov2", "demo", out)
    )
    monkeypatch.undo()
    (tmp_path / "unreadable").mkdir()
    for i in range(40):
        (tmp_path / "unreadable" / f"{i}.png").write_bytes(b"not a png")
    assert "None of the 40 images" in error(*fit_pca(trained_folder, tmp_path / "unreadable", out))
    make_images(tmp_path / "mostly_broken", 30, broken=10)
    assert "needs at least 33 readable images" in error(*fit_pca(trained_folder, tmp_path / "mostly_broken", out))
    assert not out.exists()


def test_extract_index_and_search_follow_the_fitted_basis(trained_folder, tmp_path, capsys):
    """Every consumer of embeddings goes through the model's basis: extracted rows (full width and --dim), the
    index's prefixes and the funnel search."""
    from transformers import AutoImageProcessor

    from franca_hf.retrieval import load_index

    out = tmp_path / "pca"
    assert main(fit_pca(trained_folder, "demo", out, "--max-images", "100")) == 0
    paths = make_images(tmp_path / "photos", 12)
    model = AutoModel.from_pretrained(out).eval()
    pixels = AutoImageProcessor.from_pretrained(out)([Image.open(p) for p in paths], return_tensors="pt")
    with torch.no_grad():
        expected = {dim: model.get_image_embeddings(pixels["pixel_values"], dim=dim) for dim in (4, 32)}
    features = tmp_path / "features"
    assert (
        main(["extract", str(tmp_path / "photos"), "--model", str(out), "--out", str(features), "--num-workers", "0"])
        == 0
    )
    small = tmp_path / "small"
    command = ["extract", str(tmp_path / "photos"), "--model", str(out), "--out", str(small), "--dim", "4"]
    assert main([*command, "--num-workers", "0"]) == 0
    index, index_small = load_index(features), load_index(small)
    assert index.ids == index_small.ids == paths
    torch.testing.assert_close(index.vectors, expected[32], rtol=0, atol=1e-5)
    torch.testing.assert_close(index_small.vectors, expected[4], rtol=0, atol=1e-5)
    torch.testing.assert_close(index.prefix(4), expected[4], rtol=0, atol=1e-5)  # cut, then renormalised
    capsys.readouterr()
    assert main(["search", paths[5], "--index", str(features), "--model", str(out), "--funnel", "--k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("top-3 of 12 images (funnel 2:") and printed[2].endswith(paths[5])

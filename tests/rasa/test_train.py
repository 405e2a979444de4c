"""RASA post-training: planted position signal, save/load, the official chain formula, real short runs."""

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from franca_hf import FrancaModel
from franca_hf.data.sources import open_source, split_off, subsample
from franca_hf.modeling.image_processing_franca import IMAGENET_MEAN, IMAGENET_STD
from franca_hf.rasa import RasaDirections, evaluate_chain, grid_coordinates, official_rasa_chain, patch_tokens, probe_r2
from franca_hf.rasa.probe import probe_sample_problem
from franca_hf.rasa.settings import RasaSettings
from franca_hf.rasa.train import RasaReport, fit_position_predictor, train_rasa, write_rasa_output

from ..conftest import assert_publishable_folder, tiny_config

WIDTH, ROWS, COLS = 24, 6, 6


def planted_tokens(images: int, generator: torch.Generator, planted: torch.Tensor) -> torch.Tensor:
    """(images, N, WIDTH) tokens: unit noise plus a strong linear code of (row, col) along `planted` (2, WIDTH)."""
    coords = grid_coordinates(ROWS, COLS)
    noise = torch.randn(images, ROWS * COLS, WIDTH, generator=generator)
    return noise + 10.0 * (coords @ planted)


def _rasa_on_planted_signal(orthogonal: bool) -> tuple[list[float], torch.Tensor]:
    """Three RASA steps on tokens with a planted position code; returns the held-out probe R² per chain length
    and how much of each planted direction the learned directions span."""
    torch.manual_seed(0)  # the predictors' initialisation
    generator = torch.Generator().manual_seed(0)
    planted = torch.linalg.qr(torch.randn(WIDTH, 2, generator=generator))[0].T  # orthonormal (2, WIDTH)
    train = [planted_tokens(16, generator, planted) for _ in range(4)]
    held_out = planted_tokens(32, generator, planted)
    coords = grid_coordinates(ROWS, COLS)
    weights = torch.zeros(0, 2, WIDTH)
    r2 = [evaluate_chain(held_out, coords, None)[0]]
    for _ in range(3):
        basis = RasaDirections(weights).basis if len(weights) else torch.zeros(0, 2, WIDTH)
        weight, _ = fit_position_predictor(
            lambda epoch: [(t, coords) for t in train], WIDTH, basis, epochs=30, lr=0.05, orthogonal=orthogonal
        )
        weights = torch.cat([weights, weight[None]])
        r2.append(evaluate_chain(held_out, coords, weights)[0])
    learned = torch.linalg.qr(weights.reshape(-1, WIDTH).T)[0]  # (WIDTH, 2 * steps) orthonormal
    return r2, (planted @ learned).norm(dim=1)


def test_planted_position_subspace_is_found_and_removed():
    r2, captured = _rasa_on_planted_signal(orthogonal=True)
    print(f"held-out probe R² per chain length: {[round(x, 3) for x in r2]}")
    assert r2[0] > 0.9, r2  # position is (almost fully) linearly decodable before RASA
    assert r2[-1] < 0.05, r2  # and not after
    assert torch.all(captured > 0.95), captured  # the learned directions span the planted subspace


def test_official_steps_write_position_back_into_removed_directions():
    # The learned directions span the planted code just as well, but the non-orthogonal per-step projections of the
    # official chain leave about half of the position signal decodable: why `orthogonal=True` is the default.
    r2, captured = _rasa_on_planted_signal(orthogonal=False)
    print(f"official steps, held-out probe R² per chain length: {[round(x, 3) for x in r2]}")
    assert torch.all(captured > 0.95), captured
    assert r2[-1] > 0.2, r2


def test_probe_r2_is_one_for_exact_codes_and_low_for_noise():
    coords = grid_coordinates(ROWS, COLS)
    generator = torch.Generator().manual_seed(1)
    exact = (coords @ torch.randn(2, WIDTH, generator=generator)).expand(6, -1, -1)
    assert probe_r2(exact, coords) == pytest.approx(1.0, abs=1e-3)
    assert probe_r2(torch.randn(6, ROWS * COLS, WIDTH, generator=generator), coords) < 0.2


def test_directions_round_trip_and_the_model_applies_the_official_rasa_chain(tmp_path):
    torch.manual_seed(0)
    weights = torch.randn(3, 2, 64)
    directions = RasaDirections(weights, {"note": "x"})
    loaded = RasaDirections.load(directions.save(tmp_path / "d.safetensors"))
    assert torch.equal(loaded.weights, weights) and loaded.metadata == {"note": "x"}
    tokens = torch.randn(2, 16, 64)
    torch.testing.assert_close(loaded(tokens), official_rasa_chain(tokens, weights), rtol=1e-5, atol=1e-5)

    model = FrancaModel(tiny_config()).eval()
    write_rasa_output(model, weights, RasaReport(), tmp_path / "franca", overwrite=False)
    debiased = FrancaModel.from_pretrained(tmp_path / "franca").eval()
    assert debiased.config.rasa_steps == 3
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = debiased(pixels)
    torch.testing.assert_close(
        out.debiased_patch_tokens, official_rasa_chain(out.patch_tokens, weights), rtol=1e-5, atol=1e-5
    )
    assert json.loads((tmp_path / "franca" / "rasa_report.json").read_text())["backbone"] == "FrancaModel"


def _with_linear_positions(model, rows: int = 8, cols: int = 8, scale: float = 1.0):
    """Random small backbones hardly use their 0.02-std position tables. Trained ViTs carry a strong, low-rank
    positional component; give these a table that is a linear code of (row, col) along two random directions."""
    table = model.embeddings.position_embeddings
    generator = torch.Generator().manual_seed(1)
    code = torch.randn(2, table.shape[-1], generator=generator)
    with torch.no_grad():
        table[0, 1:] = scale * (grid_coordinates(rows, cols) - 0.5) @ code
    return model.eval()


@pytest.mark.parametrize("kind", ["franca", "dinov2"])
def test_short_real_run_lowers_the_position_probe(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "franca":
        model = _with_linear_positions(FrancaModel(tiny_config(patch_size=4, position_grid_size=8, image_size=32)))
    else:
        config = Dinov2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=32, mlp_ratio=2
        )
        model = _with_linear_positions(Dinov2Model(config))
    source = subsample(open_source("demo", "train", demo_num_images=200), 160)
    train, held_out = split_off(source, 32)
    settings = RasaSettings(steps=8, epochs=5, lr=0.05, batch_size=32, resolution=32, held_out_images=32, num_workers=0)
    weights, report = train_rasa(model, train, held_out, settings, tmp_path / kind)
    # Measured: Franca 0.977 -> 0.809, DINOv2 0.982 -> 0.899 over 8 steps. Each step removes the two directions its
    # regressor uses, which for anisotropic tokens are not the only ones carrying position: R² falls step by step.
    print(
        f"{kind}: held-out position-probe R² per step {[round(r, 3) for r in report.probe_r2]}, "
        f"cosine to raw {[round(c, 3) for c in report.cosine_to_raw]}"
    )
    assert weights.shape == (8, 2, 64)
    assert report.probe_r2[0] > 0.9 and report.probe_r2[-1] < report.probe_r2[0] - 0.05
    assert report.cosine_to_raw[-1] > 0.3  # tokens keep most of what is not position
    written = json.loads((tmp_path / kind / "rasa_report.json").read_text())["report"]  # for every backbone
    assert written["probe_r2"] == report.probe_r2 and written["cosine_to_raw"] == report.cosine_to_raw
    if kind == "dinov2":
        directions = RasaDirections.load(tmp_path / kind)
        assert torch.equal(directions.weights, weights)
        tokens, grid = patch_tokens(model, torch.randn(1, 3, 32, 32))
        assert grid == (8, 8) and directions(tokens).shape == (1, 64, 64)
    else:
        assert FrancaModel.from_pretrained(tmp_path / kind).config.rasa_steps == 8


def test_a_rerun_resumes_after_the_last_finished_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _with_linear_positions(FrancaModel(tiny_config(patch_size=4, position_grid_size=8, image_size=32)))
    source = subsample(open_source("demo", "train", demo_num_images=200), 96)
    train, held_out = split_off(source, 16)
    settings = RasaSettings(steps=2, epochs=1, lr=0.01, batch_size=32, resolution=32, held_out_images=16, num_workers=0)
    import franca_hf.rasa.train as rasa_module

    real_write = rasa_module.write_rasa_output

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after both steps finished, before the output was written

    monkeypatch.setattr(rasa_module, "write_rasa_output", crash)
    with pytest.raises(KeyboardInterrupt):
        train_rasa(model, train, held_out, settings, tmp_path / "out")
    progress = tmp_path / ".out.rasa-progress.safetensors"
    saved = RasaDirections.load(progress)
    assert saved.weights.shape == (2, 2, 64)
    monkeypatch.setattr(rasa_module, "write_rasa_output", real_write)
    calls = []
    monkeypatch.setattr(rasa_module, "fit_position_predictor", lambda *a, **k: calls.append(1))
    weights, _ = train_rasa(model, train, held_out, settings, tmp_path / "out")
    assert calls == [] and torch.equal(weights, saved.weights)  # nothing retrained
    assert not progress.exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_trains_directions_for_a_converted_model(tiny_folder, tmp_path, capsys):
    from franca_hf.cli import main

    out = tmp_path / "rasa"
    small = ["steps=1", "epochs=1", "batch_size=16", "held_out_images=8", "max_images=32", "num_workers=0"]
    assert main(["rasa", f"model={tiny_folder}", "data=demo", f"out={out}", *small]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["probe_r2"]) == 2 and report["cosine_to_raw"][0] == 1.0
    # the converted model had 10 official steps; the new one is appended to its chain
    config = FrancaModel.from_pretrained(out).config
    assert config.rasa_steps == 11
    # the card tells the converted head's 10 steps from the one fitted here; the converter's debiased parity was
    # measured on the 10-step chain, so it is no longer claimed
    card = (out / "README.md").read_text()
    assert "| RASA | 11 steps (10 from the RASA file below, then 1 fitted by `franca-hf rasa` on demo" in card, card
    assert "| RASA file | `rasa_head.pth` |" in card and "patch_rasa" not in card
    assert "patch_rasa" not in config.source_checkpoint["parity"] and "patch" in config.source_checkpoint["parity"]
    assert_publishable_folder(out)
    # the resolution defaults to the model's native size: the tiny reference's 7 x 7 table, 98 px
    assert json.loads((out / "rasa_report.json").read_text())["report"]["probe_r2"] == report["probe_r2"]
    assert main(["rasa", f"model={tiny_folder}", "data=demo", f"out={out}"]) == 2
    assert f"{out} already holds a model or RASA directions; pass overwrite=true to replace it." in (
        capsys.readouterr().err
    )


def test_cli_errors_name_the_setting_before_loading_weights(tiny_folder, tmp_path, capsys, monkeypatch):
    from transformers import AutoModel

    from franca_hf.cli import main

    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded before the check"))
    out = tmp_path / "out"
    assert main(["rasa", f"model={tiny_folder}", "data=demo", f"out={out}", "resolution=100"]) == 2
    assert "resolution=100 must be a multiple of the model's patch size (14) of at least 2 patches, e.g. " in (
        capsys.readouterr().err
    )
    assert main(["rasa", f"model={tiny_folder}", "data=demo"]) == 2
    assert "out must be set (out=...)" in capsys.readouterr().err
    assert main(["rasa", f"model={tiny_folder}", "data=demo", f"out={out}", "stepz=3"]) == 2
    assert "unknown key stepz" in capsys.readouterr().err
    assert main(["rasa", f"model={tiny_folder}", "data=demo", f"out={out}", "max_images=0"]) == 2
    assert "max_images must be at least 1; got 0." in capsys.readouterr().err
    assert main(["rasa", f"model={tiny_folder}", "data=demo", f"out={out}", "num_workers=-1"]) == 2
    assert "num_workers must be at least 0; got -1." in capsys.readouterr().err
    assert main(["rasa", f"model={tiny_folder}", "data=nowhere", f"out={out}"]) == 2  # the data before the weights
    assert "nowhere" in capsys.readouterr().err
    for setting, message in (
        ("lr=-1", "lr must be positive; got -1.0."),
        ("resolution=0", "resolution must be a positive number of pixels (or null: the model's native size); got 0."),
        ("crop_scale=0.5", "override 'crop_scale=0.5': crop_scale takes a list, crop_scale=[a,b,...]; got 0.5."),
    ):
        assert main(["rasa", f"model={tiny_folder}", "data=demo", f"out={out}", setting]) == 2
        assert message in capsys.readouterr().err
    weightless = tmp_path / "weightless"  # a config without weights, and damaged weights: one line each
    shutil.copytree(tiny_folder, weightless)
    (weightless / "model.safetensors").unlink()
    monkeypatch.undo()
    assert main(["rasa", f"model={weightless}", "data=demo", f"out={out}", "max_images=8", "held_out_images=4"]) == 2
    assert f"error: model={weightless} has a config but no weights that can be read here (" in capsys.readouterr().err
    (weightless / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes()[:100])
    assert main(["rasa", f"model={weightless}", "data=demo", f"out={out}", "max_images=8", "held_out_images=4"]) == 2
    assert "cannot be read (" in capsys.readouterr().err
    assert not out.exists()


def test_holding_out_every_image_names_held_out_images(tiny_folder, tmp_path, capsys):
    from franca_hf.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(10):
        Image.new("RGB", (40, 30), (25 * index, 0, 0)).save(photos / f"{index}.png")
    out = tmp_path / "out"
    assert main(["rasa", f"model={tiny_folder}", f"data={photos}", f"out={out}"]) == 2
    assert f"held_out_images=64 leaves no image to train on: data={photos} holds 10 images; set held_out_images " in (
        capsys.readouterr().err
    )


def test_a_probe_on_too_few_held_out_images_or_tokens_is_flagged():
    assert probe_sample_problem(images=64, tokens_per_image=16, width=128) is None  # the demo: 4 tokens per parameter
    assert probe_sample_problem(images=4, tokens_per_image=1369, width=768).startswith(
        "4 held-out images fit the probe on 2 (3.6 tokens per parameter of a 768-dim probe)"
    )
    # enough images, but 16 tokens each cannot fit a 768-dim probe: 2 * ceil(2 * 769 / 16) images would
    assert probe_sample_problem(images=32, tokens_per_image=16, width=768).endswith(": 194 images here")


def test_the_flags_of_0_1_are_refused(capsys):
    from franca_hf.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["rasa", "--model", "m", "--official-steps", "data=demo"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --model" in capsys.readouterr().err


def test_augmentation_probabilities_are_settings():
    from PIL import Image

    from franca_hf.rasa.train import augmentation

    red = Image.new("RGB", (40, 40), (200, 20, 20))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def view(**probabilities) -> torch.Tensor:
        settings = RasaSettings(resolution=28, **probabilities)
        return augmentation(settings)(red) * std + mean  # back to [0, 1] pixels

    plain = view(jitter_probability=0.0, grayscale_probability=0.0, blur_probability=0.0)
    torch.testing.assert_close(plain[:, 5, 5], torch.tensor([200, 20, 20]) / 255, atol=1e-5, rtol=0)
    gray = view(jitter_probability=0.0, grayscale_probability=1.0, blur_probability=0.0)
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)
    with pytest.raises(ValueError, match=r"blur_probability must be in \[0, 1\], got 1.5"):
        RasaSettings(blur_probability=1.5).validate(patch_size=14)
    with pytest.raises(ValueError, match=r"crop_scale must be \[low, high\] with 0 < low <= high <= 1"):
        RasaSettings(crop_scale=[0.5, 0.2]).validate(patch_size=14)


def test_patch_tokens_of_dinov2_with_registers_skip_cls_and_registers():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=4, image_size=16, num_register_tokens=4
    )
    model = Dinov2WithRegistersModel(config).eval()
    pixels = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        tokens, grid = patch_tokens(model, pixels)
        everything = model(pixel_values=pixels).last_hidden_state
    assert grid == (4, 6) and tokens.shape == (2, 24, 16) and everything.shape[1] == 1 + 4 + 24
    assert torch.equal(tokens, everything[:, 5:])
    with pytest.raises(ValueError, match="RASA works with FrancaModel, Dinov2Model and Dinov2WithRegistersModel"):
        patch_tokens(torch.nn.Linear(2, 2), pixels)


def test_resolution_defaults_to_the_native_size_of_the_model():
    franca = tiny_config()  # a 4 x 4 position table of 14-px patches
    assert RasaSettings().for_model(franca).resolution == franca.position_grid_size * franca.patch_size == 56
    assert RasaSettings().for_model(Dinov2Config(image_size=518, patch_size=14)).resolution == 518
    assert RasaSettings(resolution=98).for_model(franca).resolution == 98  # an explicit value wins
    with pytest.raises(ValueError, match=r"resolution=100 must be a multiple of the model's patch size \(14\)"):
        RasaSettings(resolution=100).for_model(franca)


def test_a_release_that_cannot_be_downloaded_is_one_line(tmp_path, monkeypatch, capsys):
    from franca_hf.cli import main

    monkeypatch.setenv("FRANCA_HF_RELEASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("FRANCA_HF_CACHE", str(tmp_path / "cache"))
    assert main(["rasa", "model=franca_vitb14_In21K", "data=demo", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("franca-hf rasa: error:") and "Traceback" not in err

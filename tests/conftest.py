"""Shared fixtures: the official tiny reference (tests/reference/tiny, see its README.md) and its converted HF folder."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import franca_hf  # noqa: F401  (registers the Auto classes once transformers is imported)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / "tests" / "reference" / "tiny"
TEACHER_CHECKPOINT = REFERENCE_DIR / "teacher_checkpoint.pth"
RASA_CHECKPOINT = REFERENCE_DIR / "rasa_head.pth"
EXAMPLE_IMAGES = REPO_ROOT / "examples" / "images"
REFERENCE_SIZES = ("98x98", "112x112", "70x126")


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    """Inputs and outputs computed by the official Franca code on random weights (see reference.json)."""
    return load_file(REFERENCE_DIR / "reference.safetensors")


@pytest.fixture()
def tiny_releases(monkeypatch):
    """Let every release name stand for the tiny reference checkpoint (128 wide, 4 blocks, 7 x 7 table), so that
    downloads and conversions of "releases" run on it; the converter checks a release's architecture."""
    import dataclasses

    from franca_hf.conversion.releases import RELEASES
    from franca_hf.modeling import FRANCA_PRESETS

    monkeypatch.setitem(FRANCA_PRESETS, "tiny_reference", (128, 4, 2))
    for name, release in RELEASES.items():
        monkeypatch.setitem(RELEASES, name, dataclasses.replace(release, preset="tiny_reference", grid=7))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny reference checkpoint + RASA head converted once with the project's converter."""
    from franca_hf.conversion.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("converted") / "tiny"
    convert_checkpoint(TEACHER_CHECKPOINT, out, rasa=RASA_CHECKPOINT)
    return out


def tiny_config(**overrides):
    """A small random FrancaConfig for shape and behaviour tests."""
    values = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14, position_grid_size=4, image_size=56
    )
    values.update(overrides)
    return franca_hf.FrancaConfig(**values)


PUBLISHABLE_FILES = {
    "README.md",
    "config.json",
    "configuration_franca.py",
    "model.safetensors",
    "modeling_franca.py",
    "preprocessor_config.json",
}


def assert_publishable_folder(folder: Path) -> None:
    """What every folder franca_hf writes (converter, trainer, RASA) must hold to be pushed and used as is: weights,
    image processor, a model card whose metadata parses, and the remote code that `auto_map` points to."""
    from huggingface_hub import ModelCard

    assert PUBLISHABLE_FILES <= {p.name for p in folder.iterdir()}, sorted(p.name for p in folder.iterdir())
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_franca.FrancaModel"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"


def pytest_terminal_summary(terminalreporter):
    """How many README/docs code blocks ran and how many were skipped (tests/test_docs.py; the skip reasons are
    in pytest's short summary, `-ra`)."""
    counts = {
        outcome: len({r.nodeid for r in terminalreporter.stats.get(outcome, []) if "::test_doc_block[" in r.nodeid})
        for outcome in ("passed", "failed", "error", "skipped")
    }
    if any(counts.values()):
        summary = ", ".join(f"{count} {outcome}" for outcome, count in counts.items() if count)
        terminalreporter.write_sep("-", f"README and docs code blocks: {summary}")


@pytest.fixture()
def tiny_release_server(tiny_releases, tmp_path, monkeypatch):
    """The tiny reference served as the `franca_vitb14_In21K` release (with its RASA head) at
    `FRANCA_HF_RELEASE_URL`, converted into `<tmp_path>/cache` (`FRANCA_HF_CACHE`)."""
    from .conversion.test_releases import ReleaseServer

    running = ReleaseServer(
        {
            "/v1.0.0/franca_vitb14_In21K.pth": TEACHER_CHECKPOINT.read_bytes(),
            "/v1.0.0/franca_vitb14_In21K_rasa.pth": RASA_CHECKPOINT.read_bytes(),
        }
    )
    monkeypatch.setenv("FRANCA_HF_RELEASE_URL", running.url)
    monkeypatch.setenv("FRANCA_HF_CACHE", str(tmp_path / "cache"))
    yield running
    running.close()

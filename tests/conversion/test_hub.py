"""Publishing to the Hub, against a loopback stand-in for its HTTP API (tests/conversion/fake_hub.py)."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from franca_hf.cli import main
from franca_hf.conversion.hub import push_to_hub

from ..conftest import PUBLISHABLE_FILES
from .fake_hub import FakeHub


@pytest.fixture()
def hub():
    fake = FakeHub()
    yield fake
    fake.close()


def test_push_sends_every_file_with_a_parseable_model_card(hub, tiny_folder, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(tiny_folder, folder)
    url = push_to_hub(
        folder, "valeo/franca-tiny", private=True, token="hf_test", endpoint=hub.url, base_model="valeo/franca-base"
    )
    assert url.startswith(f"{hub.url}/valeo/franca-tiny/commit/")
    repo = hub.repos["valeo/franca-tiny"]
    assert repo["private"] is True
    uploaded = repo["revisions"]["main"]
    assert set(uploaded) == PUBLISHABLE_FILES
    assert uploaded["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    card = ModelCard(uploaded["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["base_model"] == "valeo/franca-base" and "matryoshka" in meta["tags"]
    assert hub.validated == [meta]  # the metadata block went through the Hub's check
    assert 'AutoModel.from_pretrained("valeo/franca-tiny", trust_remote_code=True)' in card.text
    assert "| patch_rasa |" in card.text  # the converter's parity figures
    sha256 = json.loads((folder / "config.json").read_text())["source_checkpoint"]["sha256"]
    assert sha256 in card.text


def test_push_to_a_branch_and_cli_errors(hub, tiny_folder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "folder"
    shutil.copytree(tiny_folder, folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["push", str(folder), "--repo-id", "valeo/tiny", "--revision", "v1", "--endpoint", hub.url]) == 0
    assert "commit" in capsys.readouterr().out
    assert "model.safetensors" in hub.repos["valeo/tiny"]["revisions"]["v1"]
    (folder / "model.safetensors").unlink()
    assert main(["push", str(folder), "--repo-id", "valeo/tiny", "--endpoint", hub.url]) == 2
    assert "missing ['model.safetensors']" in capsys.readouterr().err

"""Exported folders carry their own code: they load with trust_remote_code where franca_hf cannot be imported."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel

from franca_hf import FrancaBackbone, FrancaModel

from ..conftest import assert_publishable_folder, tiny_config

REMOTE_LOAD = r"""
import sys, json, torch

class BlockFrancaHF:  # make sure nothing below can use the installed package
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "franca_hf":
            raise ImportError("franca_hf is blocked in this process")

sys.meta_path.insert(0, BlockFrancaHF())
try:
    import franca_hf  # noqa: F401
    raise SystemExit("franca_hf was importable")
except ImportError:
    pass
from transformers import AutoConfig, AutoModel

folder, pixels_file, out_file = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
pixels = torch.load(pixels_file)
with torch.no_grad():
    dim = config.matryoshka_dims[2]
    cls = model.get_image_embeddings(pixels, dim=dim)
    patch = model.get_dense_features(pixels, dim=dim, as_grid=False)
    debiased = model.get_dense_features(pixels, debiased=True, dim=dim, as_grid=False) if model.has_rasa else None
torch.save({"class": type(model).__module__ + "." + type(model).__name__, "cls": cls, "patch": patch,
            "debiased": debiased}, out_file)
"""


def load_without_the_package(folder, pixels: torch.Tensor, work) -> dict:
    """`REMOTE_LOAD` on `folder` in a fresh interpreter that cannot import franca_hf (nothing on the Hub: offline);
    returns its outputs for `pixels` (the class, and CLS, patch and debiased outputs at the third Matryoshka dim)."""
    torch.save(pixels, work / "pixels.pt")
    env = {"HF_MODULES_CACHE": str(work / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), str(work / "pixels.pt"), str(work / "remote.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work / "remote.pt")


def test_folder_loads_with_remote_code_without_the_package(tiny_folder, tmp_path, reference):
    assert_publishable_folder(tiny_folder)
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoBackbone": "modeling_franca.FrancaBackbone",
        "AutoConfig": "configuration_franca.FrancaConfig",
        "AutoModel": "modeling_franca.FrancaModel",
    }
    pixels = reference["70x126.pixel_values"]
    remote = load_without_the_package(tiny_folder, pixels, tmp_path)
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith("FrancaModel")
    model = AutoModel.from_pretrained(tiny_folder).eval()
    with torch.no_grad():
        cls = model.get_image_embeddings(pixels, dim=32)
        patch = model.get_dense_features(pixels, dim=32, as_grid=False)
        debiased = model.get_dense_features(pixels, debiased=True, dim=32, as_grid=False)
    torch.testing.assert_close(remote["cls"], cls, rtol=0, atol=1e-6)
    torch.testing.assert_close(remote["patch"], patch, rtol=0, atol=1e-6)
    torch.testing.assert_close(remote["debiased"], debiased, rtol=0, atol=1e-6)


@pytest.mark.parametrize("saved_class", [FrancaModel, FrancaBackbone])
def test_a_plainly_saved_model_or_backbone_loads_with_remote_code_as_either(saved_class, tmp_path):
    torch.manual_seed(0)
    saved_class(tiny_config(rasa_steps=2)).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoBackbone": "modeling_franca.FrancaBackbone",
        "AutoConfig": "configuration_franca.FrancaConfig",
        "AutoModel": "modeling_franca.FrancaModel",
    }
    assert {"configuration_franca.py", "modeling_franca.py"} <= {p.name for p in (tmp_path / "saved").iterdir()}
    pixels = torch.randn(1, 3, 56, 70)
    remote = load_without_the_package(tmp_path / "saved", pixels, tmp_path)
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith("FrancaModel")
    model = FrancaModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(remote["cls"], model.get_image_embeddings(pixels, dim=16), rtol=0, atol=1e-6)
        debiased = model.get_dense_features(pixels, debiased=True, dim=16, as_grid=False)
    torch.testing.assert_close(remote["debiased"], debiased, rtol=0, atol=1e-6)

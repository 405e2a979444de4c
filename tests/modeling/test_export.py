"""Deployment: `torch.export` and ONNX (`torch.onnx.export(..., dynamo=True)`, run with onnxruntime) of FrancaModel
with and without RASA, batch and image size dynamic, match eager; `torch.compile(fullgraph=True)` has no graph break.

transformers' own export test file is not part of its source distribution (see transformers_suite.py); these take
its place for Franca, with transformers' own exporter (`transformers.exporters.DynamoExporter`) among them.
"""

import pytest
import torch
from torch.export import Dim

from franca_hf import FrancaBackbone, FrancaModel

from ..conftest import tiny_config

OUTPUTS = ("last_hidden_state", "pooler_output", "patch_tokens", "debiased_patch_tokens")
# the native 4 x 4 grid (the position table as stored) and two interpolated ones
SIZES = ((3, 56, 56), (1, 42, 70), (2, 98, 126))


def random_model(rasa_steps: int) -> FrancaModel:
    torch.manual_seed(0)
    model = FrancaModel(tiny_config(rasa_steps=rasa_steps)).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.normal_()  # make position interpolation errors visible
        if rasa_steps:
            model.rasa.position_weights.normal_()
    return model


def dynamic_shapes(model: FrancaModel) -> dict:
    patch = model.config.patch_size
    rows, cols = Dim("rows", min=2, max=256), Dim("cols", min=2, max=256)
    return {"pixel_values": {0: Dim("batch", min=1, max=1024), 2: patch * rows, 3: patch * cols}}


@pytest.mark.parametrize("rasa_steps", [0, 2])
def test_torch_export_matches_eager(rasa_steps):
    model = random_model(rasa_steps)
    program = torch.export.export(model, (torch.randn(2, 3, 42, 70),), dynamic_shapes=dynamic_shapes(model))
    for batch, height, width in SIZES:
        pixels = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(pixels)
        got = program.module()(pixels)
        for name in OUTPUTS[: 4 if rasa_steps else 3]:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("rasa_steps", [0, 2])
def test_transformers_dynamo_exporter_matches_eager(rasa_steps):
    from transformers.exporters.configs import DynamoConfig
    from transformers.exporters.exporter_dynamo import DynamoExporter

    model = random_model(rasa_steps)
    pixels = torch.randn(2, 3, 42, 70)
    exported = DynamoExporter().export(model, {"pixel_values": pixels}, config=DynamoConfig(dynamic=False))
    got = exported(pixel_values=pixels)
    with torch.no_grad():
        expected = model(pixels)
    for name in OUTPUTS[: 4 if rasa_steps else 3]:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("rasa_steps", [0, 2])
def test_onnx_export_runs_in_onnxruntime(rasa_steps, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = random_model(rasa_steps)
    names = list(OUTPUTS[: 4 if rasa_steps else 3])
    program = torch.onnx.export(
        model,
        (torch.randn(2, 3, 42, 70),),
        dynamic_shapes=dynamic_shapes(model),
        input_names=["pixel_values"],
        output_names=names,
        dynamo=True,
        verbose=False,
    )
    program.save(tmp_path / "franca.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "franca.onnx", providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    for batch, height, width in SIZES:
        pixels = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(pixels)
        got = session.run(names, {"pixel_values": pixels.numpy()})
        for name, value in zip(names, got, strict=True):
            torch.testing.assert_close(torch.from_numpy(value), expected[name], rtol=0, atol=1e-5, msg=name)


def test_compiles_without_graph_breaks():
    model = FrancaModel(tiny_config(rasa_steps=1, matryoshka_basis="pca")).eval()
    backbone = FrancaBackbone(tiny_config(out_indices=[1, 2])).eval()
    assert model._can_compile_fullgraph
    pixels = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        backbone(pixels)  # output capture installs its hooks on the first eager call (as for transformers' ViTs)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(pixels).debiased_patch_tokens, model(pixels).debiased_patch_tokens)
        embed = torch.compile(model.get_image_embeddings, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(embed(pixels, dim=16), model.get_image_embeddings(pixels, dim=16))
        maps = torch.compile(backbone, fullgraph=True, backend="aot_eager")(pixels).feature_maps
        torch.testing.assert_close(maps[-1], backbone(pixels).feature_maps[-1])

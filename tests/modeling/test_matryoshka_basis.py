"""A fitted Matryoshka basis (`matryoshka_basis="pca"`): every truncated output uses normalise(((z - mean) R)[:, :m])."""

import torch
import torch.nn.functional as F
from transformers import AutoModel

from franca_hf import FrancaBackbone, FrancaModel

from ..conftest import tiny_config


def random_rotation(width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))[0].float()


def pca_model(rasa_steps: int = 0) -> FrancaModel:
    torch.manual_seed(0)
    model = FrancaModel(tiny_config(matryoshka_basis="pca", rasa_steps=rasa_steps)).eval()
    basis = model.matryoshka_basis
    with torch.no_grad():
        basis.cls_mean.normal_()
        basis.patch_mean.normal_()
        basis.cls_rotation.copy_(random_rotation(64, 1))
        basis.patch_rotation.copy_(random_rotation(64, 2))
        if rasa_steps:
            model.rasa.position_weights.normal_()
    return model


@torch.no_grad()
def test_every_truncated_output_uses_the_basis():
    model = pca_model(rasa_steps=2)
    basis = model.matryoshka_basis
    pixels = torch.randn(3, 3, 56, 70)
    full = model(pixels)
    cls, patches, debiased = full.pooler_output, full.patch_tokens, full.debiased_patch_tokens
    for dim in model.config.matryoshka_dims:
        expected = F.normalize(((cls - basis.cls_mean) @ basis.cls_rotation)[:, :dim], dim=-1)
        torch.testing.assert_close(model.get_image_embeddings(pixels, dim=dim), expected)
        out = model.get_image_features(pixels, dim=dim)
        torch.testing.assert_close(out.pooler_output, expected)
        cut_patches = model.get_dense_features(pixels, dim=dim, as_grid=False)
        torch.testing.assert_close(cut_patches, ((patches - basis.patch_mean) @ basis.patch_rotation)[..., :dim])
        torch.testing.assert_close(
            model.get_dense_features(pixels, debiased=True, dim=dim, as_grid=False),
            ((debiased - basis.patch_mean) @ basis.patch_rotation)[..., :dim],
        )
        torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state)  # hidden states stay raw
        grid = model.get_dense_features(pixels, dim=dim)
        assert grid.shape == (3, dim, 4, 5)
        torch.testing.assert_close(grid.flatten(2).transpose(1, 2), cut_patches)


@torch.no_grad()
def test_an_unfitted_basis_is_the_prefix():
    fitted_or_not = FrancaModel(tiny_config(matryoshka_basis="pca")).eval()
    prefix = FrancaModel(tiny_config()).eval()
    prefix.load_state_dict({k: v for k, v in fitted_or_not.state_dict().items() if "matryoshka_basis" not in k})
    pixels = torch.randn(2, 3, 56, 56)
    for dim in (4, 16, 64):
        torch.testing.assert_close(
            fitted_or_not.get_image_embeddings(pixels, dim=dim), prefix.get_image_embeddings(pixels, dim=dim)
        )


def test_basis_and_rasa_stay_fp32_in_bf16(tmp_path):
    model = pca_model(rasa_steps=2)
    model.save_pretrained(tmp_path)
    created = AutoModel.from_config(model.config, dtype=torch.bfloat16)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for candidate in (created, loaded):
        dtypes = {name: p.dtype for name, p in candidate.named_parameters()}
        assert dtypes["embeddings.cls_token"] == torch.bfloat16
        kept = {n: d for n, d in dtypes.items() if n.startswith(("rasa.", "matryoshka_basis."))}
        assert len(kept) == 5 and set(kept.values()) == {torch.float32}, kept
    assert torch.equal(loaded.matryoshka_basis.cls_rotation, model.matryoshka_basis.cls_rotation)
    with torch.no_grad():
        embeddings = loaded.get_image_embeddings(torch.randn(2, 3, 56, 56).bfloat16(), dim=16)
    assert embeddings.dtype == torch.bfloat16 and embeddings.shape == (2, 16)


def test_a_cast_model_keeps_its_basis_and_rasa_fp32(tmp_path):
    """`.to(torch.bfloat16)` and `.half()` round the backbone, never the basis or RASA (their precision is their
    point): their outputs are those of the fp32 model up to the backbone's rounding."""
    model = pca_model(rasa_steps=2)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = model.get_image_embeddings(pixels, dim=16), model.get_dense_features(pixels, dim=16)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        rounded = cast(pca_model(rasa_steps=2))
        kept = {n: p.dtype for n, p in rounded.named_parameters() if n.startswith(("rasa.", "matryoshka_basis."))}
        assert len(kept) == 5 and set(kept.values()) == {torch.float32}, kept
        assert rounded.embeddings.cls_token.dtype != torch.float32
        assert torch.equal(rounded.matryoshka_basis.cls_rotation, model.matryoshka_basis.cls_rotation)
        with torch.no_grad():
            got = rounded.get_image_embeddings(pixels.to(rounded.dtype), dim=16)
            dense = rounded.get_dense_features(pixels.to(rounded.dtype), dim=16)
        torch.testing.assert_close(got.float(), expected[0], atol=0.05, rtol=0)
        torch.testing.assert_close(dense.float(), expected[1], atol=0.1, rtol=0)
    rounded.save_pretrained(tmp_path)  # saved as it is: the basis in fp32
    assert AutoModel.from_pretrained(tmp_path).matryoshka_basis.cls_rotation.dtype == torch.float32


def test_backbone_loads_a_folder_with_a_basis_without_complaint_and_saves_it_back(tmp_path, caplog):
    model = pca_model()
    model.save_pretrained(tmp_path / "model")
    with caplog.at_level("WARNING"):
        backbone = FrancaBackbone.from_pretrained(tmp_path / "model")
    assert not [r for r in caplog.records if "not used" in r.getMessage() or "unexpected" in r.getMessage().lower()]
    backbone.save_pretrained(tmp_path / "backbone")  # its config names the basis: the folder holds it too
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = AutoModel.from_pretrained(tmp_path / "backbone").eval()
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower()]
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(again.get_image_embeddings(pixels, dim=8), model.get_image_embeddings(pixels, dim=8))

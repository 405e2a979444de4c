"""The one image loop (`run_model`) and the one model call (`embed_batch`)."""

import logging

import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

from franca_hf import FrancaModel
from franca_hf.data import DECODE_ERRORS, SkipCounter, collect_image_paths, files_source
from franca_hf.features import embed_batch, run_model
from franca_hf.modeling.image_processing_franca import make_image_processor

from ..conftest import tiny_config


def test_run_model_with_workers_matches_the_model_and_reports_unreadable_images_once(photos, caplog):
    torch.manual_seed(0)
    model = FrancaModel(tiny_config()).train()
    processor = make_image_processor(56)
    source = files_source(collect_image_paths([photos]))
    by_hand = {}
    for position in range(len(source)):
        try:
            image = source.load(position)
        except DECODE_ERRORS:
            continue
        with torch.no_grad():
            by_hand[position] = model.eval().get_image_embeddings(processor(image, return_tensors="pt")["pixel_values"])
    model.train()

    results = {}
    for workers in (0, 2):
        skips = SkipCounter()
        with caplog.at_level(logging.WARNING):
            batches = list(
                run_model(
                    model,
                    source,
                    processor,
                    lambda model, pixels: embed_batch(model, pixels, dim=32),
                    batch_size=2,
                    num_workers=workers,
                    skips=skips,
                    progress=False,
                )
            )
        results[workers] = batches
        assert sorted(image_id.split("/")[-1] for image_id, _ in skips.failed) == ["broken.jpg", "huge.png"]
        assert "DecompressionBombError" in dict(skips.failed)[str(photos / "huge.png")]
    assert model.training  # restored after the loop
    for (positions, features), (positions_again, features_again) in zip(results[0], results[2], strict=True):
        assert positions == positions_again and torch.equal(features, features_again)
    positions = [p for batch, _ in results[0] for p in batch]
    assert positions == sorted(by_hand)  # source order, readable images only
    features = torch.cat([f for _, f in results[0]])
    expected = F.normalize(torch.cat([by_hand[p] for p in positions])[:, :32], dim=-1)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)

    # a subset of positions, e.g. one process's share
    share = run_model(model, source, processor, embed_batch, positions=[5, 1, 0], batch_size=2, progress=False)
    assert [p for batch, _ in share for p in batch] == [5, 0]  # 1 is broken.jpg


def test_embed_batch_rows_truncate_to_every_matryoshka_embedding(tiny_folder):
    """The contract an index relies on: a stored full-width row cut to m channels and renormalised is the model's
    embedding at m; dense maps have the grid shape; another transformers model gives its pooled CLS."""
    model = FrancaModel.from_pretrained(tiny_folder).eval()
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        full = embed_batch(model, pixels)
        for dim in model.config.matryoshka_dims:
            torch.testing.assert_close(F.normalize(full[:, :dim], dim=-1), embed_batch(model, pixels, dim=dim))
        assert embed_batch(model, pixels, dim=64, dense=True, debiased=True).shape == (3, 64, 4, 4)
        raw = embed_batch(model, pixels, normalize=False)
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(3)) and torch.allclose(F.normalize(raw, dim=-1), full)

    dinov2 = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8)).eval()
    with torch.no_grad():
        expected = F.normalize(dinov2(pixels).pooler_output[:, :8], dim=-1)
        torch.testing.assert_close(embed_batch(dinov2, pixels, dim=8), expected)

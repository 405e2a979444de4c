"""The linear protocol against the official one (tests/evaluation/data: names, learning rates; an official-style
training loop built from torch's own modules), log regression, caching as extract shards, and its errors."""

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import franca_hf
from franca_hf.data.demo import DEMO_CLASSES, generate_demo_images
from franca_hf.evaluation.linear import (
    ProbeData,
    batch_order,
    build_grids,
    evaluate_linear,
    fit_grids,
    fit_logistic_regression,
    input_columns,
    logistic_regression_by_dim,
    pick_classifier,
    probe_inputs,
)
from franca_hf.evaluation.settings import C_VALUES, LinearSettings
from franca_hf.features.store import ExtractionIndex
from franca_hf.modeling.image_processing_franca import make_image_processor

FIXTURE = Path(__file__).parent / "data" / "official_linear_grid.json"
WIDTH = 32


def tiny_model(**overrides) -> franca_hf.FrancaModel:
    torch.manual_seed(0)
    values = dict(
        hidden_size=WIDTH,
        num_hidden_layers=4,
        num_attention_heads=2,
        patch_size=8,
        position_grid_size=4,
        image_size=32,
        matryoshka_dims=[8, 16, 32],
    )
    values.update(overrides)
    return franca_hf.FrancaModel(franca_hf.FrancaConfig(**values)).eval()


def official_linear_input(x_tokens_list, use_n_blocks: int, use_avgpool: bool) -> torch.Tensor:
    """What the official `create_linear_input` feeds a classifier: the CLS tokens of the last n blocks side by side,
    then (with pooling) the mean patch token of the last block."""
    blocks = x_tokens_list[-use_n_blocks:]
    parts = [cls for _, cls in blocks] + ([blocks[-1][0].mean(dim=1)] if use_avgpool else [])
    return torch.cat(parts, dim=-1).float()


@torch.no_grad()
def test_probe_inputs_are_the_official_pooled_inputs():
    model = tiny_model()
    pixels = torch.randn(3, 3, 32, 32)
    rows = probe_inputs(model, pixels)
    official = model.get_intermediate_layers(pixels, 4, return_class_token=True)
    for n in (1, 4):
        for avgpool in (False, True):
            expected = official_linear_input(official, n, avgpool)
            got = rows[:, input_columns(WIDTH, 4, WIDTH, n, avgpool)]
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # at a Matryoshka dim, every part is cut in the model's basis (a fitted rotation here), as the embeddings are
    fitted = tiny_model(matryoshka_basis="pca")
    rotation = torch.linalg.qr(torch.randn(WIDTH, WIDTH))[0]
    fitted.matryoshka_basis.cls_rotation.copy_(rotation)
    fitted.matryoshka_basis.cls_mean.copy_(torch.randn(WIDTH))
    fitted.matryoshka_basis.patch_rotation.copy_(rotation.flip(1))
    rows = probe_inputs(fitted, pixels)
    layers = fitted.get_intermediate_layers(pixels, 4, return_class_token=True)
    cut = [fitted.matryoshka_cut(cls, 8) for _, cls in layers[-4:]]
    cut.append(fitted.matryoshka_cut(layers[-1][0], 8, patches=True).mean(dim=1))
    torch.testing.assert_close(rows[:, input_columns(WIDTH, 4, 8, 4, True)], torch.cat(cut, dim=-1))


def test_the_c_grid_is_the_official_one():
    official = 10 ** torch.linspace(-6, 5, 45, dtype=torch.float64)  # eval/log_regression.py
    torch.testing.assert_close(torch.tensor(C_VALUES, dtype=torch.float64), official, rtol=1e-15, atol=0)


def test_grid_has_the_official_classifiers_and_learning_rates():
    official = json.loads(FIXTURE.read_text())
    settings = LinearSettings(batch_size=official["batch_size"], learning_rates=tuple(official["learning_rates"]))
    grids = build_grids(WIDTH, 4, WIDTH, 5, settings, torch.Generator().manual_seed(0))
    ours = {}
    for grid in grids:  # as in the official ModuleDict, a repeated name keeps its place and takes the later lr
        ours.update(zip(grid.names, grid.learning_rates.tolist(), strict=True))
    assert list(ours) == [c["name"] for c in official["classifiers"]]
    np.testing.assert_allclose(list(ours.values()), [c["lr"] for c in official["classifiers"]], rtol=1e-6)


def official_style_training(initial, rows, labels, batches, steps):
    """The official training loop, written with torch's own modules: one nn.Linear per named classifier, one SGD
    with a param group per classifier, CosineAnnealingLR stepped per iteration, summed cross-entropies."""
    classifiers = torch.nn.ModuleDict()
    groups = []
    for name, (columns, lr, weight, bias) in initial.items():
        linear = torch.nn.Linear(len(columns), weight.shape[1])
        linear.weight.data.copy_(weight.T)
        linear.bias.data.copy_(bias)
        classifiers[name] = linear
        groups.append({"params": linear.parameters(), "lr": lr})
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0)
    for indices in batches:
        x, y = rows[indices], labels[indices]
        loss = sum(
            torch.nn.functional.cross_entropy(linear(x[:, initial[name][0]]), y) for name, linear in classifiers.items()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return classifiers


def test_training_and_choice_match_the_official_loop():
    generator = torch.Generator().manual_seed(1)
    classes, per_class = 3, 40
    centres = torch.randn(classes, 5 * WIDTH, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    rows = centres[labels] + 2.0 * torch.randn(len(labels), 5 * WIDTH, generator=generator)
    train, val = ProbeData(rows[::2], labels[::2]), ProbeData(rows[1::2], labels[1::2])
    settings = LinearSettings(batch_size=16, epochs=3)
    grids = build_grids(WIDTH, 4, 16, classes, settings, torch.Generator().manual_seed(0))
    initial = {}
    for grid in grids:
        for index, name in enumerate(grid.names):
            lr = grid.learning_rates[index].item()
            initial[name] = (grid.columns, lr, grid.weight[index].clone(), grid.bias[index].clone())
    steps = settings.epochs * (len(train.rows) // settings.batch_size)
    official = official_style_training(
        copy.deepcopy(initial), train.rows, train.labels, batch_order(len(train.rows), 16, steps, 0), steps
    )
    fit_grids(grids, train, settings)

    ours = {name: (grid, i) for grid in grids for i, name in enumerate(grid.names)}
    assert set(ours) == set(official)
    for name, linear in official.items():
        grid, index = ours[name]
        torch.testing.assert_close(grid.weight[index], linear.weight.detach().T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grid.bias[index], linear.bias.detach(), rtol=1e-4, atol=1e-6)
    # the official choice: the first classifier (dict order) whose validation top-1 beats all before it
    best_name, best_accuracy = "", 0.0
    with torch.no_grad():
        for name, linear in official.items():
            accuracy = (linear(val.rows[:, initial[name][0]]).argmax(-1) == val.labels).double().mean().item() * 100
            if accuracy > best_accuracy:
                best_name, best_accuracy = name, accuracy
    result = pick_classifier(16, grids, val, val)
    assert (result.best, result.val_top1) == (best_name, pytest.approx(best_accuracy))
    assert result.test_top1 == pytest.approx(best_accuracy) and 60 < best_accuracy <= 100


def test_logistic_regression_reaches_the_regularised_optimum():
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(60, 6, generator=generator), dim=-1)
    y = torch.randint(0, 3, (60,), generator=generator)
    for c in (0.01, 10.0):
        weight, bias = fit_logistic_regression(x, y, 3, c)
        weight, bias = weight.double().requires_grad_(), bias.double().requires_grad_()
        objective = 0.5 * weight.pow(2).sum() + c * torch.nn.functional.cross_entropy(
            x.double() @ weight + bias, y, reduction="sum"
        )
        gradients = torch.autograd.grad(objective, (weight, bias))
        assert max(g.abs().max().item() for g in gradients) < 1e-4 * max(1.0, c)
        warm = fit_logistic_regression(x, y, 3, c, start=(torch.randn(6, 3), torch.randn(3)))
        torch.testing.assert_close(warm[0], weight.detach().float(), atol=1e-4, rtol=1e-4)


def write_class_folder(root: Path, count: int, split: str) -> Path:
    images, labels = generate_demo_images(count, seed=0, split=split)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / DEMO_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def test_evaluate_linear_caches_features_as_extract_shards(tmp_path):
    model, processor = tiny_model(), make_image_processor(32)
    train = write_class_folder(tmp_path / "train", 60, "train")
    test = write_class_folder(tmp_path / "test", 30, "test")
    settings = LinearSettings(
        train=str(train), test=str(test), epochs=2, batch_size=16, features_dir=str(tmp_path / "features")
    )
    report = evaluate_linear(model, processor, settings)
    assert report.counts == {"train": 54, "validation": 6, "test": 30}
    assert [r.dim for r in report.grids] == [8, 16, 32] and all(0 <= r.test_top1 <= 100 for r in report.grids)
    folders = sorted((tmp_path / "features").iterdir())
    assert len(folders) == 2
    for folder in folders:
        index = ExtractionIndex.load(folder)
        assert index.complete and index.settings.kind == "linear_probe" and index.settings.dim == 5 * WIDTH
    # a second run reads the shards (a model that would compute anything else fails loudly), same numbers
    broken = copy.deepcopy(model)
    broken.get_intermediate_layers = None
    again = evaluate_linear(broken, processor, settings)
    assert [r.test_top1 for r in again.grids] == [r.test_top1 for r in report.grids]

    logistic = evaluate_linear(
        model, processor, LinearSettings(**{**vars(settings), "logistic": True, "c_values": (0.1, 10.0)})
    )
    assert [r.dim for r in logistic.logistic] == [8, 16, 32] and {r.c for r in logistic.logistic} <= {0.1, 10.0}


def test_unlabelled_source_is_refused(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i}.png")
    settings = LinearSettings(train=str(folder), test=str(folder))
    with pytest.raises(ValueError, match=f"train={folder} has no labels: give a folder with one subfolder per class"):
        evaluate_linear(tiny_model(), make_image_processor(32), settings)
    # a test or validation split with a class the train split lacks is refused before anything is embedded
    train = write_class_folder(tmp_path / "train", 20, "train")
    shutil.copytree(train / DEMO_CLASSES[0], tmp_path / "val" / "unseen")  # beside one of train's classes
    shutil.copytree(train / DEMO_CLASSES[0], tmp_path / "val" / DEMO_CLASSES[0])
    broken = tiny_model()
    broken.get_intermediate_layers = None  # a model that would embed anything fails loudly
    for role in ("test", "val"):
        settings = LinearSettings(train=str(train), **{"test": str(train), role: str(tmp_path / "val")})
        with pytest.raises(ValueError, match=rf"{role}=.* has classes that train=.* has not: \['unseen'\]"):
            evaluate_linear(broken, make_image_processor(32), settings)


@torch.no_grad()
def test_cached_demo_rows_are_of_the_images_of_this_run(tmp_path):
    """Demo image i depends on how many are generated (`max_images`): a cache made at one size is never read for
    another, and a cached run gives the numbers of an uncached one."""
    model, processor = tiny_model(), make_image_processor(32)
    for max_images in (40, 60):
        settings = LinearSettings(train="demo", test="demo", max_images=max_images, epochs=1, batch_size=16)
        fresh = evaluate_linear(model, processor, settings)
        cached = evaluate_linear(model, processor, replace(settings, features_dir=str(tmp_path / "features")))
        assert [r.test_top1 for r in cached.grids] == [r.test_top1 for r in fresh.grids], max_images
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == [
        "demo-40-seed0-test",
        "demo-40-seed0-train",
        "demo-60-seed0-test",
        "demo-60-seed0-train",
    ]


def test_the_log_regression_sweep_shows_its_progress(capsys):
    """One fit per (dim, C) and one refit per dim, each a step of the bar (the sweep is minutes on real data)."""
    generator = torch.Generator().manual_seed(0)
    split = (torch.randn(40, 32, generator=generator), torch.arange(40) % 2)
    results = logistic_regression_by_dim(split, split, split, [8, 32], 2, c_values=(0.1, 1.0, 10.0), progress=True)
    assert [r.dim for r in results] == [8, 32]
    progress = capsys.readouterr().err
    assert "log regression: 100%" in progress and "8/8" in progress

"""Dense evaluation: demo masks, segmentation sources and their errors, mIoU and matching, the whole evaluation on
folders and `hf:` datasets, the figure, and `franca-hf eval`."""

import dataclasses
import itertools
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from franca_hf.cli import main
from franca_hf.conversion.export import fill_model_folder
from franca_hf.data import IGNORE_INDEX, open_segmentation_source
from franca_hf.data.demo import DEMO_SEGMENTATION_CLASSES, generate_demo_segmentation, load_demo_dataset
from franca_hf.evaluation.linear import format_linear_report, run_linear_evaluation
from franca_hf.evaluation.matching import hungarian, match_clusters
from franca_hf.evaluation.segmentation import (
    cluster_miou,
    confusion,
    evaluate_segmentation,
    format_segmentation_result,
    mean_iou,
    run_segmentation_evaluation,
    show_predictions,
)
from franca_hf.evaluation.settings import LinearSettings, SegmentationSettings
from franca_hf.features import ModelSpec
from franca_hf.modeling.image_processing_franca import make_image_processor

from .test_linear import tiny_model, write_class_folder


def test_demo_masks_mark_the_shape_by_class():
    images, labels, masks = generate_demo_segmentation(20, seed=2, split="test")
    for image, label, mask in zip(images, labels, masks, strict=True):
        assert set(np.unique(mask)) == {0, label + 1}
        brightness = image.astype(float).mean(-1)
        assert brightness[mask > 0].mean() > brightness[mask == 0].mean() + 60  # the shape is the lighter part
    dataset = load_demo_dataset("test", num_images=20, seed=2, masks=True)
    np.testing.assert_array_equal(np.asarray(dataset[3]["mask"]), masks[3])
    assert len(DEMO_SEGMENTATION_CLASSES) == 11


def test_hungarian_is_exact_and_overclustering_is_many_to_one():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows, cols = int(rng.integers(1, 5)), int(rng.integers(4, 6))
        cost = rng.integers(0, 30, (rows, cols)).astype(float)
        best = min(sum(cost[i, p[i]] for i in range(rows)) for p in itertools.permutations(range(cols), rows))
        assignment = hungarian(cost)
        assert len(set(assignment)) == rows and cost[np.arange(rows), assignment].sum() == best
    overlap = np.array([[5, 1], [4, 0], [0, 9]])
    assert match_clusters(overlap).tolist() == [0, 0, 1]


def test_miou_and_clustering_of_perfect_features():
    masks = torch.tensor([[[0, 0], [1, 255]], [[2, 2], [1, 0]]])
    assert mean_iou(confusion(masks.clamp(max=2), masks, 3, 3)) == 100.0
    predictions = torch.zeros_like(masks)  # everything class 0: IoU 3/7 for class 0, 0 for 1 and 2
    assert mean_iou(confusion(predictions, masks, 3, 3)) == pytest.approx(100 * (3 / 7) / 3)
    # patch tokens that are one-hot codes of their class: K-means finds the classes, Hungarian names them
    grid_classes = torch.randint(0, 4, (30, 2, 2), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(30, 4, 4, generator=torch.Generator().manual_seed(1))
    tokens = torch.eye(4)[grid_classes.reshape(30, 4)] + 0.01 * noise
    masks = grid_classes.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert cluster_miou(tokens, masks, (2, 2), 4, 4, seed=0) == pytest.approx(100.0)
    assert cluster_miou(tokens, masks, (2, 2), 12, 4, seed=0) == pytest.approx(100.0)


def write_pairs(root, count, split, seed=0):
    images, _, masks = generate_demo_segmentation(count, seed=seed, split=split)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    return root


def save_hf(root, count, split):
    dataset = load_demo_dataset(split, num_images=count, masks=True)
    dataset = dataset.remove_columns("label").rename_column("mask", "annotation")
    datasets.DatasetDict({split: dataset}).save_to_disk(str(root))
    return f"hf:{root}"


def test_evaluation_on_folders_and_hf_datasets(tmp_path):
    model, processor = tiny_model(rasa_steps=1), make_image_processor(32)
    train = open_segmentation_source(str(write_pairs(tmp_path / "train", 24, "train")), "train")
    test = open_segmentation_source(save_hf(tmp_path / "hf", 12, "test"), "test")
    settings = SegmentationSettings(epochs=2, batch_size=8, num_classes=11)
    result, test_split = evaluate_segmentation(model, processor, train, test, settings)
    assert (result.num_train, result.num_test, result.num_classes) == (24, 12, 11)
    assert set(result.linear) == {(v, d) for v in ("raw", "debiased") for d in (8, 16, 32)}
    assert set(result.clustering) == {(v, d, k) for v in ("raw", "debiased") for d in (8, 16, 32) for k in (11, 33)}
    assert all(0 <= score <= 100 for score in [*result.linear.values(), *result.clustering.values()])
    assert test_split.masks.shape == (12, 32, 32) and test_split.tokens["raw"].shape == (12, 16, 32)
    figure = show_predictions(test_split, test, result, 3, tmp_path / "figure.png")
    with Image.open(figure) as opened:
        assert opened.size[1] > 3 * 128 and opened.size[0] > 4 * 128


def test_bad_sources_get_clear_errors(tmp_path):
    model, processor = tiny_model(), make_image_processor(32)
    settings = SegmentationSettings(epochs=1, num_classes=11)
    good = open_segmentation_source(str(write_pairs(tmp_path / "good", 4, "train")))

    missing = write_pairs(tmp_path / "missing", 3, "train")
    (missing / "masks" / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 images .* have no mask, e.g. .*001.jpg \(expected"):
        open_segmentation_source(str(missing))
    with pytest.raises(ValueError, match="needs an images/ folder and a masks/ folder"):
        open_segmentation_source(str(tmp_path / "good" / "images"))

    wrong_size = write_pairs(tmp_path / "size", 2, "train")
    Image.new("L", (16, 16)).save(wrong_size / "masks" / "001.png")
    with pytest.raises(ValueError, match=r"mask of .*001.jpg is 16x16 pixels and its image 32x32"):
        evaluate_segmentation(model, processor, good, open_segmentation_source(str(wrong_size)), settings)

    outside = write_pairs(tmp_path / "outside", 2, "train")
    Image.fromarray(np.full((32, 32), 40, np.uint8)).save(outside / "masks" / "000.png")
    with pytest.raises(ValueError, match=r"holds the value 40, outside the classes 0..10 \(and 255"):
        evaluate_segmentation(model, processor, good, open_segmentation_source(str(outside)), settings)
    ignored = write_pairs(tmp_path / "ignored", 2, "train")
    Image.fromarray(np.full((32, 32), IGNORE_INDEX, np.uint8)).save(ignored / "masks" / "000.png")
    eleven = dataclasses.replace(settings, clusters=(11,))
    evaluate_segmentation(model, processor, good, open_segmentation_source(str(ignored)), eleven, dims=[8])

    rgb = write_pairs(tmp_path / "rgb", 2, "train")
    Image.new("RGB", (32, 32)).save(rgb / "masks" / "000.png")
    with pytest.raises(ValueError, match="is a RGB image; masks are single-channel images of class indices"):
        evaluate_segmentation(model, processor, good, open_segmentation_source(str(rgb)), settings)

    unlabelled = load_demo_dataset("test", num_images=4)  # images and class labels, no masks
    unlabelled.save_to_disk(str(tmp_path / "nomask"))
    with pytest.raises(ValueError, match="has no mask column: a segmentation source needs an image column and a mask"):
        open_segmentation_source(f"hf:{tmp_path / 'nomask'}", "test")
    with pytest.raises(ValueError, match=r"Column 'label' of hf:.* holds ClassLabel values, not mask images"):
        open_segmentation_source(f"hf:{tmp_path / 'nomask'}", "test", mask_column="label")

    # an unreadable mask is refused before any image is embedded (a model that would embed fails loudly)
    damaged = write_pairs(tmp_path / "damaged", 2, "train")
    (damaged / "masks" / "001.png").write_bytes(b"not a png")
    broken = tiny_model()
    broken.forward = None
    with pytest.raises(ValueError, match=r"The mask of .*001.jpg cannot be read as an image \(cannot identify"):
        evaluate_segmentation(broken, processor, open_segmentation_source(str(damaged)), good, settings)
    # more clusters than the test split's patch tokens: refused before the heads train
    too_many = dataclasses.replace(settings, clusters=(11, 1000))
    with pytest.raises(ValueError, match=r"clusters=1000: K-means needs at least as many patch tokens, and the test"):
        evaluate_segmentation(model, processor, good, good, too_many, dims=[8])


def test_cli_eval_seg_and_linear(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    fill_model_folder(folder, tiny_model(rasa_steps=1), make_image_processor(32))
    train, test = write_pairs(tmp_path / "train", 16, "train"), write_pairs(tmp_path / "test", 8, "test")
    figure = tmp_path / "seg.png"
    seg = ["eval", "seg", "--model", str(folder), "--train", str(train), "--test", str(test), "--epochs", "1"]
    assert main([*seg, "--num-classes", "11", "--clusters", "11", "--show", "2", "--figure", str(figure)]) == 0
    printed, progress = capsys.readouterr()
    assert all(bar in progress for bar in ("masks", "dense features", "segmentation heads", "K-means: 100%"))
    assert "| dim | raw | debiased |" in printed and "K = 11 (Hungarian)" in printed and figure.is_file()
    # the library call behind the command gives the same table
    settings = SegmentationSettings(
        ModelSpec(str(folder)), str(train), str(test), epochs=1, num_classes=11, clusters=(11,), show=2, figure=figure
    )
    assert printed == f"{format_segmentation_result(run_segmentation_evaluation(settings))}\nwrote {figure}\n"
    assert main([*seg, "--num-classes", "3"]) == 2
    assert "outside the classes 0..2" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    for flags, message in (  # the figure is judged before the evaluation, which it would otherwise lose
        (["--show", "2", "--figure", str(tmp_path / "a_file" / "f.png")], "cannot be created: "),
        (["--show", "2", "--figure", str(tmp_path / "f.txt")], "does not end with the suffix of a picture format"),
        (["--figure", str(figure)], "names where show draws its figure; set show (images drawn) too. (--figure)"),
    ):
        assert main([*seg, *flags]) == 2
        assert message in capsys.readouterr().err
    assert (
        main([*seg, "--num-classes", "11", "--clusters", "11", "--show", "1", "--figure", str(tmp_path / "f.jpg")]) == 0
    )
    assert Image.open(tmp_path / "f.jpg").format == "JPEG" and capsys.readouterr().out.endswith(
        f"wrote {tmp_path / 'f.jpg'}\n"
    )

    labelled = write_class_folder(tmp_path / "labelled", 40, "train")
    linear = ["eval", "linear", "--model", str(folder), "--train", str(labelled), "--test", str(labelled)]
    assert main([*linear, "--epochs", "1", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "linear probe (official grid; 36 train, 4 validation, 40 test images)" in printed
    settings = LinearSettings(ModelSpec(str(folder)), str(labelled), str(labelled), epochs=1, batch_size=8)
    assert printed == format_linear_report(run_linear_evaluation(settings)) + "\n"
    (tmp_path / "notes.txt").write_text("")
    for flags, message in (  # errors name the command as typed and the flag
        (
            ["--val", "demo"],
            "eval linear: error: val_split: split must be one of ('train', 'test'), got 'validation'. (--val-split)",
        ),
        (
            ["--features-dir", str(tmp_path / "notes.txt")],
            "is a file; give a folder (created if missing). (--features-dir)",
        ),
        (
            ["--batch-size", "100"],
            "eval linear: error: The linear probe's batch_size 100 exceeds the 36 training images. (--batch-size)",
        ),
    ):
        assert main([*linear, "--epochs", "1", *flags]) == 2
        assert message in capsys.readouterr().err
    cache = tmp_path / "cache"
    assert main([*linear, "--epochs", "1", "--batch-size", "8", "--features-dir", str(cache)]) == 0
    other = tmp_path / "other_model"
    fill_model_folder(other, tiny_model(num_hidden_layers=3), make_image_processor(32))
    other_linear = ["eval", "linear", "--model", str(other), "--train", str(labelled), "--test", str(labelled)]
    assert main([*other_linear, "--epochs", "1", "--batch-size", "8", "--features-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "holds features made with other settings" in err and f"It is where features_dir={cache} caches the " in err
    assert err.rstrip().endswith("(--features-dir)")


def test_an_unreadable_image_of_a_hub_dataset_is_skipped_not_taken_for_its_mask(tmp_path, caplog):
    """A dataset row holds the image and the mask: reading the mask must not decode the image, which the embedding
    skips and reports, as for a folder."""
    rows = load_demo_dataset("train", num_images=12, masks=True).remove_columns("label")
    rows = rows.cast_column("image", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
    values = rows.to_dict()
    values["image"][3] = {"bytes": b"not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    datasets.Dataset.from_dict(values, features=features).save_to_disk(tmp_path / "hub")
    source = open_segmentation_source(f"hf:{tmp_path / 'hub'}")
    settings = SegmentationSettings(epochs=1, num_classes=11, clusters=(11,))
    with caplog.at_level(logging.WARNING):
        result, _ = evaluate_segmentation(tiny_model(), make_image_processor(32), source, source, settings, dims=[8])
    assert (result.num_train, result.num_test) == (11, 11)
    assert f"Skipping unreadable image hf:{tmp_path / 'hub'}[train][3]" in caplog.text

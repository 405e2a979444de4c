"""Each command's flags reach the settings of its one library call (the call captured, no model loaded), and the
settings' own checks name the setting, which the command line follows with its flag."""

import importlib

import pytest

from franca_hf.cli import main
from franca_hf.errors import UsageError
from franca_hf.evaluation.settings import KnnSettings, LinearSettings, SegmentationSettings
from franca_hf.features import ExtractSettings, ModelSpec
from franca_hf.matryoshka_settings import FitPcaSettings
from franca_hf.visualize_settings import VisualizeSettings

from .conftest import EXAMPLE_IMAGES


class Called(Exception):
    """Raised by a stand-in library call with the settings it was given."""


def settings_of(monkeypatch, module: str, function: str, argv: list[str]):
    """The settings object `franca-hf argv` passes to `module.function`."""

    def capture(settings):
        raise Called(settings)

    monkeypatch.setattr(importlib.import_module(module), function, capture)
    with pytest.raises(Called) as called:
        main(argv)
    return called.value.args[0]


def test_every_extract_flag_reaches_its_setting(monkeypatch):
    argv = ["extract", "a.jpg", "photos", "--model", "m", "--device", "cpu", "--dtype", "bfloat16", "--out", "f"]
    argv += ["--dim", "16", "--dense", "--debiased", "--no-normalize", "--features-dtype", "float16", "--split", "val"]
    argv += ["--image-column", "img", "--shard-size", "7", "--allow-other-model", "--batch-size", "3"]
    argv += ["--num-workers", "2"]
    settings = settings_of(monkeypatch, "franca_hf.features.extraction", "extract", argv)
    assert settings == ExtractSettings(
        images=["a.jpg", "photos"],
        out="f",
        model=ModelSpec("m", device="cpu", dtype="bfloat16"),
        dim=16,
        dense=True,
        debiased=True,
        normalize=False,
        features_dtype="float16",
        split="val",
        image_column="img",
        batch_size=3,
        num_workers=2,
        shard_size=7,
        allow_other_model=True,
    )
    int8 = settings_of(monkeypatch, "franca_hf.features.extraction", "extract", [*argv[:5], "--out", "f", "--int8"])
    assert int8.model == ModelSpec("m", int8=True)


def test_extract_settings_name_the_setting_at_fault(capsys):
    with pytest.raises(UsageError, match=r"^shard_size must be at least 1; got 0\.$") as raised:
        ExtractSettings(["photos"], "features", ModelSpec("m"), shard_size=0)
    assert raised.value.setting == "shard_size"
    with pytest.raises(UsageError, match="features_dtype='bfloat16' is not one of") as raised:
        ExtractSettings(["photos"], "features", ModelSpec("m"), features_dtype="bfloat16")
    assert raised.value.setting == "features_dtype"
    assert main(["extract", "photos", "--model", "m", "--out", "f", "--num-workers", "-1"]) == 2
    assert (
        capsys.readouterr().err == "franca-hf extract: error: num_workers must be at least 0; got -1. (--num-workers)\n"
    )


def test_every_fit_pca_flag_reaches_its_setting(monkeypatch):
    argv = ["fit-pca", "--model", "m", "--device", "cpu", "--int8", "--data", "hf:beans", "--out", "pca"]
    argv += ["--max-images", "50", "--split", "val", "--image-column", "img", "--overwrite-basis", "--overwrite"]
    argv += ["--batch-size", "4", "--num-workers", "1"]
    settings = settings_of(monkeypatch, "franca_hf.matryoshka", "fit_pca", argv)
    expected = FitPcaSettings(ModelSpec("m", "cpu", int8=True), "hf:beans", "pca", 50, "val", "img", True, True, 4, 1)
    assert settings == expected
    with pytest.raises(UsageError, match=r"^max_images must be at least 1; got 0\.$") as raised:
        FitPcaSettings(ModelSpec("m"), "demo", "pca", max_images=0)
    assert raised.value.setting == "max_images"


def test_every_visualize_flag_reaches_its_setting(monkeypatch, tmp_path):
    image = str(EXAMPLE_IMAGES / "coffee.jpg")
    argv = ["visualize", image, "--model", "m", "--device", "cpu", "--dtype", "float16", "--out", "f.png"]
    settings = settings_of(monkeypatch, "franca_hf.visualize", "visualize_image", [*argv, "--size", "56"])
    assert settings == VisualizeSettings(image, "f.png", ModelSpec("m", "cpu", "float16"), 56)
    with pytest.raises(UsageError, match=r"^size must be at least 1; got 0\.$") as raised:
        VisualizeSettings(image, "f.png", ModelSpec("m"), size=0)
    assert raised.value.setting == "size"


def test_every_knn_flag_reaches_its_setting(monkeypatch):
    argv = ["knn", "--model", "m", "--device", "cpu", "--int8", "--train", "demo", "--test", "hf:beans"]
    argv += ["--train-split", "a", "--test-split", "b", "--dims", "8", "16", "--k", "5", "--temperature", "0.1"]
    argv += ["--max-images", "30", "--crop-size", "64", "--batch-size", "4", "--num-workers", "1"]
    settings = settings_of(monkeypatch, "franca_hf.evaluation.nearest_neighbours", "knn", argv)
    model = ModelSpec("m", "cpu", int8=True)
    assert settings == KnnSettings(model, "demo", "hf:beans", "a", "b", (8, 16), 5, 0.1, 30, 64, 4, 1)
    with pytest.raises(UsageError, match=r"^temperature must be positive; got 0\.$") as raised:
        KnnSettings(model, "demo", "demo", temperature=0)
    assert raised.value.setting == "temperature"


def test_every_eval_flag_reaches_its_setting(monkeypatch):
    common = ["--model", "m", "--train", "demo", "--test", "hf:t", "--train-split", "a", "--test-split", "b"]
    common += ["--max-images", "30", "--epochs", "2", "--device", "cpu", "--batch-size", "4"]
    argv = ["eval", "linear", *common, "--val", "hf:v", "--val-split", "c", "--features-dir", "probe", "--logistic"]
    settings = settings_of(monkeypatch, "franca_hf.evaluation.linear", "run_linear_evaluation", argv)
    shared = dict(
        model=ModelSpec("m", "cpu"), train="demo", test="hf:t", train_split="a", test_split="b", max_images=30, epochs=2
    )
    expected = LinearSettings(**shared, batch_size=4, val="hf:v", val_split="c", features_dir="probe", logistic=True)
    assert settings == expected
    argv = ["eval", "seg", *common, "--image-column", "img", "--mask-column", "mask", "--num-classes", "5"]
    argv += ["--image-size", "64", "--clusters", "5", "15", "--show", "3", "--figure", "f.png"]
    settings = settings_of(monkeypatch, "franca_hf.evaluation.segmentation", "run_segmentation_evaluation", argv)
    columns = dict(image_column="img", mask_column="mask")
    assert settings == SegmentationSettings(
        **shared, batch_size=4, **columns, num_classes=5, image_size=64, clusters=(5, 15), show=3, figure="f.png"
    )
    with pytest.raises(UsageError, match=r"^held_out is a fraction of the train images; got 1\.5\.$") as raised:
        LinearSettings(held_out=1.5)
    assert raised.value.setting == "held_out"


def test_the_command_functions_are_not_shadowed_by_their_modules():
    # importing a submodule binds its name on the package: a function named like its module would be hidden
    import franca_hf.evaluation.nearest_neighbours
    import franca_hf.features.extraction  # noqa: F401
    from franca_hf.evaluation import knn
    from franca_hf.features import extract

    assert (knn.__module__, extract.__module__) == (
        "franca_hf.evaluation.nearest_neighbours",
        "franca_hf.features.extraction",
    )

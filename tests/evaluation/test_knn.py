"""k-NN evaluation: the DINO weighted vote, truncate-then-normalise per Matryoshka dim."""

import shutil

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from franca_hf.cli import main
from franca_hf.data import open_source
from franca_hf.evaluation.nearest_neighbours import embed_source, format_knn_table, knn_accuracy_by_dim, knn_predict
from franca_hf.evaluation.nearest_neighbours import knn as knn_call
from franca_hf.evaluation.settings import KnnSettings
from franca_hf.features import ModelSpec
from franca_hf.modeling.image_processing_franca import make_image_processor


def test_weighted_vote_follows_the_nearest_neighbours():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_predict(bank, labels, queries, num_classes=2, k=3).tolist() == [0, 1]
    # with k covering the whole bank, a colder temperature lets the two close neighbours outvote three far ones
    assert knn_predict(bank, labels, queries[:1], 2, k=5, temperature=0.01).tolist() == [0]
    assert knn_predict(bank, labels, queries[:1], 2, k=5, temperature=100.0).tolist() == [1]


def test_accuracy_per_dim_truncates_then_normalises():
    torch.manual_seed(0)
    labels = torch.arange(200) % 2
    informative = (labels.float() * 2 - 1)[:, None] * torch.ones(200, 2)  # class in the first 2 channels
    noise = torch.randn(200, 14) * 3  # no class information after them
    features = torch.cat([informative + 0.1 * torch.randn(200, 2), noise], dim=1)
    accuracy = knn_accuracy_by_dim(features[:100], labels[:100], features[100:], labels[100:], dims=[2, 16])
    assert accuracy[2] == 100.0
    assert accuracy[16] < 90.0  # the noisy channels dilute the neighbourhoods
    assert "dim 2" in format_knn_table(accuracy) and "100.0" in format_knn_table(accuracy)


def test_knn_cli_on_a_transformers_dinov2_model(tmp_path, capsys):
    """`franca-hf knn` on a model that is not a FrancaModel: full width by default, any prefixes with --dims."""
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            shade = tuple(min(255, c + 5 * i) for c in colour)
            Image.new("RGB", (40, 40), shade).save(tmp_path / "images" / label / f"{i}.png")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=8, image_size=32
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    make_image_processor(32).save_pretrained(tmp_path / "dinov2")
    images = str(tmp_path / "images")

    def knn(*extra: str) -> int:
        argv = ["knn", "--model", str(tmp_path / "dinov2"), "--train", images, "--test", images, "--k", "3"]
        return main([*argv, *extra, "--device", "cpu"])

    assert knn() == 0
    printed = capsys.readouterr().out
    model = Dinov2Model.from_pretrained(tmp_path / "dinov2").eval()
    features, labels = embed_source(model, open_source(images), make_image_processor(32))
    expected = knn_accuracy_by_dim(features, labels, features, labels, dims=[32], k=3)
    assert format_knn_table(expected, label="top-1 (%), prefix") in printed and "dim 32 |" in printed
    # the library call behind the command gives the same numbers
    result = knn_call(KnnSettings(ModelSpec(str(tmp_path / "dinov2"), device="cpu"), images, images, k=3))
    assert result.accuracy == expected and result.truncation == "prefix"
    assert printed == f"k-NN (k=3, T=0.07) of {tmp_path / 'dinov2'}: 12 train / 12 test images\n{result.table()}\n"

    assert knn("--dims", "8", "32") == 0
    assert "| k-NN accuracy | dim 8 | dim 32 |" in capsys.readouterr().out
    assert knn("--dims", "64") == 2
    assert "dims=64 is not allowed; choose one between 1 and 32. (--dims)" in capsys.readouterr().err
    config_only = tmp_path / "config-only"  # the dims are judged on the config, before any weights are read
    shutil.copytree(tmp_path / "dinov2", config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    argv = ["knn", "--model", str(config_only), "--train", images, "--test", images, "--dims", "64", "--device", "cpu"]
    assert main(argv) == 2
    assert "dims=64 is not allowed; choose one between 1 and 32. (--dims)" in capsys.readouterr().err

    # a split none of whose images can be read is a usage error, not a traceback from an empty memory bank
    for label in ("red", "blue"):
        (tmp_path / "broken" / label).mkdir(parents=True)
        (tmp_path / "broken" / label / "0.png").write_bytes(b"not an image")
    argv = ["knn", "--model", str(tmp_path / "dinov2"), "--train", str(tmp_path / "broken"), "--test", images]
    assert main([*argv, "--device", "cpu"]) == 2
    assert f"train={tmp_path / 'broken'} (split train): none of its 2 images could be read. (--train)" in (
        capsys.readouterr().err
    )


def test_splits_are_scored_by_class_name_and_unlabelled_or_foreign_classes_are_refused(tmp_path, capsys):
    """Two image folders number their own subfolders: a test folder holding two of train's three classes is scored
    against train's classes by name (a nearest neighbour, k = 1, finds each test image's identical train copy)."""
    colours = {"circle": (220, 30, 30), "square": (30, 220, 30), "triangle": (30, 30, 220)}
    for label, colour in colours.items():
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), tuple(min(255, c + 9 * i) for c in colour)).save(
                tmp_path / f"train/{label}/{i}.png"
            )
    for label in ("square", "triangle"):  # test: copies of two of train's classes ("square" is 0 here, 1 there)
        shutil.copytree(tmp_path / "train" / label, tmp_path / "test" / label)
    shutil.copytree(tmp_path / "train" / "circle", tmp_path / "other" / "hexagon")  # one of train's, one foreign
    shutil.copytree(tmp_path / "train" / "square", tmp_path / "other" / "square")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32)
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    make_image_processor(32).save_pretrained(tmp_path / "dinov2")
    model = ModelSpec(str(tmp_path / "dinov2"), device="cpu")
    result = knn_call(KnnSettings(model, str(tmp_path / "train"), str(tmp_path / "test"), k=1))
    assert result.accuracy == {32: 100.0} and (result.train_images, result.test_images) == (12, 8)

    def refused(test: str) -> str:
        argv = ["knn", "--model", str(tmp_path / "dinov2"), "--train", str(tmp_path / "train"), "--test", test]
        assert main([*argv, "--device", "cpu"]) == 2
        return capsys.readouterr().err

    assert f"test={tmp_path / 'other'} has classes that train={tmp_path / 'train'} has not: ['hexagon']; a " in (
        refused(str(tmp_path / "other"))
    )
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rows = {"image": [Image.new("RGB", (40, 40), colour) for colour in colours.values()], "label": [0, -1, 2]}
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(colours))})
    Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "hub")
    assert "1 of its 3 images have no label (-1, as in unlabelled test splits); give a labelled split. (--test)" in (
        refused(f"hf:{tmp_path / 'hub'}")
    )


def test_k_past_the_train_images_and_a_crop_below_one_patch(tmp_path, capsys):
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), tuple(min(255, c + 9 * i) for c in colour)).save(
                tmp_path / f"images/{label}/{i}.png"
            )
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32)
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    make_image_processor(32).save_pretrained(tmp_path / "dinov2")
    images = str(tmp_path / "images")
    argv = ["knn", "--model", str(tmp_path / "dinov2"), "--train", images, "--test", images, "--device", "cpu"]
    assert main([*argv, "--k", "50"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("k-NN (k=6, T=0.07) of ")  # the k that voted
    assert "note: --k 50 is more than the 6 train images; every train image votes (k=6)." in captured.err
    assert main([*argv, "--crop-size", "7"]) == 2
    assert "crop_size=7 is smaller than one patch of the model (8 px); give at least 8. (--crop-size)" in (
        capsys.readouterr().err
    )

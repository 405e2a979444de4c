"""Image sources: ids that say where each image came from, de-duplicated inputs, sources that pickle, the classes of a
classifier's splits."""

import logging
import pickle
from dataclasses import replace

import datasets
import pytest
from PIL import Image

from franca_hf.data import collect_image_paths, files_source, folder_source, open_source, subset
from franca_hf.data.sources import classes_of
from franca_hf.errors import UsageError


def test_ids_say_where_each_image_came_from_and_sources_pickle(tmp_path):
    for label in ("cats", "dogs"):
        (tmp_path / "pets" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), (len(label), 0, 0)).save(tmp_path / "pets" / label / "0.png")
    folder = folder_source(tmp_path / "pets")
    assert [folder.describe(i) for i in range(2)] == [str(tmp_path / "pets" / n / "0.png") for n in ("cats", "dogs")]

    rows = {"image": [Image.new("RGB", (8, 8), (v, v, v)) for v in (10, 20, 30)]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        tmp_path / "saved"
    )
    spec = f"hf:{tmp_path / 'saved'}"
    rows_source = open_source(spec)
    assert rows_source.describe(2) == f"{spec}[train][2]"
    part = subset(rows_source, [2, 0])
    assert part.describe(0) == f"{spec}[train][2]"  # a subset keeps the original ids

    for source in (folder, rows_source, part):  # module-level loaders: DataLoader workers get them by pickling
        copy = pickle.loads(pickle.dumps(source))
        assert copy.describe(0) == source.describe(0) and copy.load(0).tobytes() == source.load(0).tobytes()


def test_inputs_given_twice_are_collected_once(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    paths = collect_image_paths([tmp_path / "b.png", tmp_path, tmp_path / "a.png"])
    assert paths == [tmp_path / "b.png", tmp_path / "a.png"]
    assert len(files_source(paths)) == 2
    # one path, as a string or a Path, is that path (a string is not walked letter by letter)
    assert (
        collect_image_paths(str(tmp_path)) == collect_image_paths(tmp_path) == [tmp_path / "a.png", tmp_path / "b.png"]
    )


def test_the_splits_of_a_classifier_are_numbered_by_train_class_names(tmp_path, caplog):
    """Each folder numbers its own subfolders from 0: a test folder of two of train's three classes gets train's
    numbers, by name; a foreign class, unlabelled images (-1) and an unlabelled source are refused."""
    for split, classes in (("train", ("a", "b", "c")), ("test", ("b", "c")), ("odd", ("c", "z"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    train, test, odd = (folder_source(tmp_path / split) for split in ("train", "test", "odd"))
    assert test.labels == [0, 1] and test.class_names == ["b", "c"]
    kept, aligned = classes_of(train, ("test", test))
    assert kept is train and aligned.labels == [1, 2] and aligned.class_names == ["a", "b", "c"]
    assert [aligned.describe(i) for i in range(2)] == [test.describe(i) for i in range(2)]
    with pytest.raises(UsageError, match=r"test=.*odd has classes that train=.*train has not: \['z'\]") as error:
        classes_of(train, ("test", odd))
    assert error.value.setting == "test"
    # no name in common: two namings of the classes (ImageNet's wnids and words), matched by number with a warning
    words = replace(train, class_names=["apple", "banana", "cherry"])
    with caplog.at_level(logging.WARNING, "franca_hf"):
        assert classes_of(train, ("test", words))[1] is words
    assert "names its classes otherwise than train=" in caplog.text and "matched by number" in caplog.text
    unlabelled = replace(test, labels=[1, -1])
    with pytest.raises(UsageError, match=r"val=.*: 1 of its 2 images have no label \(-1"):
        classes_of(train, ("val", unlabelled))
    with pytest.raises(UsageError, match="train=.* has no labels"):
        classes_of(replace(train, labels=None), ("test", test))

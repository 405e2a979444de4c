"""Training data: sources, per-sample seeded augmentation, resumable sharded sampling, unreadable images."""

import json

import datasets
import pytest
import torch
from PIL import Image

from franca_hf.training.augment import MultiCropAugmentation
from franca_hf.training.data import (
    AugmentedImages,
    EpochBatchSampler,
    StreamedAugmentedImages,
    folder_source,
    hf_source,
    load_hf_dataset,
    open_source,
    subsample,
)
from franca_hf.training.pretrain import TrainState, iterate_batches


def _image(value: int) -> Image.Image:
    return Image.new("RGB", (20, 20), (value, 255 - value, (3 * value) % 256))


@pytest.fixture()
def labelled_folder(tmp_path):
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(3):
            _image(40 * i + (label == "dogs")).save(tmp_path / label / f"{i}.png")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    return tmp_path


def test_folder_source_labels_from_subfolders(labelled_folder):
    source = folder_source(labelled_folder)
    assert len(source) == 7 and source.class_names == ["cats", "dogs"]
    assert source.labels == [0, 0, 0, 1, 1, 1, 1]
    assert source.load(0).size == (20, 20)
    assert open_source(str(labelled_folder)).labels == source.labels
    with pytest.raises(ValueError, match="is not 'demo', 'hf:<dataset>' or an existing image folder"):
        open_source("/no/such/folder")


def test_unreadable_images_are_replaced_and_counted(labelled_folder):
    source = folder_source(labelled_folder)
    broken = next(i for i in range(len(source)) if source.describe(i).endswith("broken.png"))
    images = AugmentedImages(source, lambda image: torch.tensor(image.getpixel((0, 0))), seed=1)
    crops, skipped, _ = images[(broken, 0)]
    assert skipped == 1 and images.skips.count == 1
    assert torch.equal(crops, images[((broken + 1) % len(source), 0)][0])  # the next readable image instead


def test_augmentation_is_seeded_per_sample_and_epoch(labelled_folder):
    transform = MultiCropAugmentation(16, 8, num_local_crops=1)
    images = AugmentedImages(folder_source(labelled_folder), transform, seed=3)
    first, _, seed = images[(1, 0)]
    torch.manual_seed(123)  # the global RNG state must not matter
    again, _, seed_again = images[(1, 0)]
    other_epoch, _, _ = images[(1, 1)]
    assert seed == seed_again and torch.equal(first["global_crops"][0], again["global_crops"][0])
    assert not torch.equal(first["global_crops"][0], other_epoch["global_crops"][0])


def test_epoch_sampler_shards_resumes_and_reshuffles():
    full = list(EpochBatchSampler(10, batch_size=2, seed=5))
    shards = [list(EpochBatchSampler(10, batch_size=2, rank=r, world_size=2, seed=5)) for r in range(2)]
    assert len(full) == 5 and len(shards[0]) == len(shards[1]) == 2  # 10 // (2 * 2) batches per process
    indices = [i for shard in shards for batch in shard for i, _ in batch]
    assert len(set(indices)) == 8  # disjoint shards
    sampler = EpochBatchSampler(10, batch_size=2, seed=5)
    sampler.start(epoch=0, batch=3)
    assert list(sampler) == full[3:]
    sampler.start(epoch=1, batch=0)
    next_epoch = list(sampler)
    assert [i for b in next_epoch for i, _ in b] != [i for b in full for i, _ in b]
    assert all(epoch == 1 for batch in next_epoch for _, epoch in batch)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(3, batch_size=2, world_size=2)


def test_hugging_face_datasets_map_style_and_streamed(tmp_path):
    rows = {"image": [_image(v) for v in range(0, 200, 25)], "label": [v % 2 for v in range(8)]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    source = open_source(f"hf:{tmp_path / 'saved'}")
    assert len(source) == 8 and source.labels == rows["label"] and source.class_names == ["a", "b"]
    assert source.load(2).getpixel((0, 0)) == (50, 205, 150)
    assert len(subsample(source, 3)) == 3

    stream = load_hf_dataset(f"hf:{tmp_path / 'saved'}", "train", streaming=True)

    def pixels_of(rank: int, **kwargs) -> list:
        dataset = StreamedAugmentedImages(
            stream, lambda im: im.getpixel((0, 0)), None, rank, 2, seed=0, batch_size=2, **kwargs
        )
        return [pixel for pixel, _, _ in dataset]

    shards = [pixels_of(rank) for rank in range(2)]
    assert len(shards[0]) + len(shards[1]) == 8 and len(set(shards[0] + shards[1])) == 8  # each row once
    assert pixels_of(0, start_batch=1) == shards[0][2:]  # resuming after one batch of 2
    with pytest.raises(ValueError, match="Column 'pixels' not found"):
        hf_source(datasets.load_from_disk(tmp_path / "saved"), "x", image_column="pixels")


def test_streamed_resume_with_dataloader_workers():
    rows = {"image": [_image(v) for v in range(0, 240, 10)]}
    stream = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
    stream = stream.to_iterable_dataset(num_shards=4)

    def batches(start_batch: int) -> list[list]:
        dataset = StreamedAugmentedImages(
            stream, lambda im: im.getpixel((0, 0))[0], None, 0, 1, seed=0, batch_size=2, start_batch=start_batch
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
        return [batch[0].tolist() for batch in loader]

    full = batches(0)
    assert len(full) == 12 and sorted(v for b in full for v in b) == list(range(0, 240, 10))
    assert batches(4) == full[4:]  # 2 workers took turns: each passes over the 2 batches it had delivered


def test_streamed_passes_reshuffle_and_resume_in_any_pass():
    """Three passes over an 8-row stream (4 batches of 2 each), one row corrupt: every pass is a new order, and a
    run resumed from the state saved after any batch (end of a pass included) continues with exactly the batches,
    and the skipped-row counts, of the uninterrupted run."""
    images = [_image(v) for v in range(0, 80, 10)] + [{"bytes": b"not an image", "path": "broken.png"}]
    stream = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    stream = stream.to_iterable_dataset(num_shards=3)

    def run(state: TrainState, num_batches: int) -> list[tuple[list, int]]:
        dataset = StreamedAugmentedImages(
            stream,
            lambda im: im.getpixel((0, 0))[0],
            None,
            0,
            1,
            seed=0,
            batch_size=2,
            epoch=state.stream_epoch,
            start_batch=state.batches_seen - state.stream_epoch_start,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, drop_last=True)
        batches = iterate_batches(loader, None, state)
        seen = []
        for _ in range(num_batches):
            pixels, skipped, _ = next(batches)
            seen.append((pixels.tolist(), int(skipped.sum())))
            state.batches_seen += 1
        return seen

    full = run(TrainState(), 12)
    passes = [[v for batch, _ in full[i : i + 4] for v in batch] for i in (0, 4, 8)]
    assert all(sorted(p) == list(range(0, 80, 10)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3  # reshuffled every pass
    assert [sum(s for _, s in full[i : i + 4]) for i in (0, 4, 8)] == [1, 1, 1]  # the corrupt row, once per pass
    for stop in (3, 4, 6, 8):
        state = TrainState()
        first = run(state, stop)
        saved = TrainState()
        saved.load_state_dict(json.loads(json.dumps(state.state_dict())))  # as a checkpoint stores it
        assert first + run(saved, 12 - stop) == full, stop

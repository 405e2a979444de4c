"""Training data: sources, per-sample seeded augmentation, resumable sharded sampling, unreadable images."""

import json

import datasets
import pytest
import torch
from PIL import Image

from franca_hf.data import folder_source, hf_source, load_hf_dataset, open_source, subsample
from franca_hf.data.augmented import AugmentedImages, EpochBatchSampler, StreamedAugmentedImages, worker_index
from franca_hf.training.augment import MultiCropAugmentation
from franca_hf.training.pipeline import CollatedBatch, StreamPosition


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
    assert pixels_of(0, worker_batches=[1]) == shards[0][2:]  # resuming after one batch of 2
    with pytest.raises(ValueError, match="Column 'pixels' not found"):
        hf_source(datasets.load_from_disk(tmp_path / "saved"), "x", image_column="pixels")


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_passes_reshuffle_and_resume_anywhere(workers):
    """Three passes over a stream of 13 images and one corrupt row in 3 shards (with 2 DataLoader workers: one
    worker's part runs out mid-pass). Every pass is a new order; a run resumed from the state a checkpoint saves
    after any batch (end of a pass included) delivers the rest of the uninterrupted run's batches, with their
    skipped-row counts, none repeated or lost. In the same order without workers; with workers the resumed
    DataLoader asks worker 0 first, so only the order inside the resumed pass may differ."""
    images = [_image(v) for v in range(0, 130, 10)] + [{"bytes": b"not an image", "path": "broken.png"}]
    stream = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    stream = stream.to_iterable_dataset(num_shards=3)

    def collate(samples) -> CollatedBatch:  # the trainer's batch type, with the crops' first pixels as "crops"
        pixels = tuple(pixel for pixel, _, _ in samples)
        return CollatedBatch(pixels, None, skipped_images=sum(s for _, s, _ in samples), worker=worker_index())

    def run(position: StreamPosition, num_batches: int) -> list[tuple[int, tuple, int]]:
        position.restore(rank=0, world_size=1, workers=max(1, workers))
        dataset = StreamedAugmentedImages(stream, lambda im: im.getpixel((0, 0))[0], None, 0, 1, seed=0, batch_size=2)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=2, drop_last=True, num_workers=workers, collate_fn=collate
        )
        batches = position.passes(loader)
        seen = []
        for _ in range(num_batches):
            batch = next(batches)
            seen.append((position.epoch, batch.crops, batch.skipped_images))
        return seen

    full = run(StreamPosition(), 18)
    passes = [sorted(v for epoch, batch, _ in full if epoch == e for v in batch) for e in range(3)]
    assert all(len(p) == len(passes[0]) >= 10 for p in passes)  # the same images each pass (minus drop_last)
    orders = [[v for epoch, batch, _ in full if epoch == e for v in batch] for e in range(3)]
    assert len({tuple(order) for order in orders}) == 3  # reshuffled every pass
    # the corrupt row is counted with the next image its worker yields (none when it ends a worker's part)
    assert sum(s for _, _, s in full) >= 1
    for stop in range(1, 18):
        position = StreamPosition()
        first = run(position, stop)
        saved = [[position.epoch, list(position.worker_batches)]]  # as a checkpoint holds it (TrainingBatches)
        resumed = first + run(StreamPosition(json.loads(json.dumps(saved))), 18 - stop)
        if workers == 0:
            assert resumed == full, stop
        else:
            assert sorted(resumed) == sorted(full), stop
            assert [epoch for epoch, _, _ in resumed] == [epoch for epoch, _, _ in full], stop


def test_streamed_resume_needs_the_same_process_and_worker_counts():
    saved = [[1, [2, 3]], [1, [4, 1]]]
    with pytest.raises(ValueError, match="checkpointed by 2 processes: resume it with 2"):
        StreamPosition(saved).restore(rank=0, world_size=4, workers=2)
    with pytest.raises(ValueError, match=r"checkpointed with 2 DataLoader worker\(s\) per process: resume it with "):
        StreamPosition(saved).restore(rank=1, world_size=2, workers=3)
    position = StreamPosition(saved)
    position.restore(rank=1, world_size=2, workers=2)
    assert (position.epoch, position.worker_batches) == (1, [4, 1])  # this process's own position

"""Training data: per-sample seeded augmentation over image sources, map-style or streamed, and resumable sharded
sampling. Unreadable images are skipped and counted, never fatal: a training sample that cannot be decoded is
replaced by the next readable one, so every process keeps the same batch size.

The sources themselves (`open_source` and friends: the demo set, folders, `hf:` datasets) are in `sources.py`; this
module sits beside them, below both trainers (pretraining and RASA), and imports torch.
"""

from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import UsageError
from .sources import DECODE_ERRORS, ImageSource, SkipCounter, _image_column

MAX_CONSECUTIVE_FAILURES = 100


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, epoch, index, ...), the same in every process and worker."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part + 1) % (2**63 - 1)
    return seed


def seeded(transform: Callable, image: Image.Image, seed: int):
    """`transform(image)` with torch's RNG seeded by `seed` (and restored afterwards), so that a sample's crops do
    not depend on the number of processes or DataLoader workers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


class AugmentedImages(Dataset):
    """Map-style training set indexed by `(index, epoch)` (see `EpochBatchSampler`): the augmented image, seeded per
    sample and epoch. Unreadable images are replaced by the next readable one.
    Items are `(crops, skipped, seed)`: `skipped` counts the images passed over."""

    def __init__(self, source: ImageSource, transform: Callable, seed: int = 0):
        self.source, self.transform, self.seed = source, transform, seed
        self.skips = SkipCounter()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        skipped = 0
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            position = (index + attempt) % len(self.source)
            try:
                image = self.source.load(position)
            except DECODE_ERRORS as error:
                self.skips.record(self.source.describe(position), error)
                skipped += 1
                continue
            # a replacement image gets the requested sample's seed, not its own (which may be in the same batch)
            seed = sample_seed(self.seed, epoch, index, *([attempt] if attempt else []))
            return seeded(self.transform, image, seed), skipped, seed
        raise RuntimeError(f"{MAX_CONSECUTIVE_FAILURES} consecutive images of {self.source.name} are unreadable.")


def worker_index() -> int:
    """The DataLoader worker running this code (0 in the main process)."""
    worker = get_worker_info()
    return worker.id if worker else 0


class StreamedAugmentedImages(IterableDataset):
    """Streaming training set over a `datasets.IterableDataset`, split by process (`split_dataset_by_node`) and by
    DataLoader worker (by `datasets` itself). Yields `(crops, skipped, seed)`.

    Pass `epoch` over the stream is shuffled with `seed` and `epoch` (`set_epoch`). Resumable: each DataLoader worker
    builds whole batches of `batch_size` examples from its own part of the stream, so a worker that has delivered n
    batches of the current pass (`worker_batches[w]`) passes over n * batch_size readable examples before yielding
    again. Images are decoded here rather than by `datasets`, so that one corrupt file is skipped instead of ending
    the stream. `start(epoch, worker_batches)` sets where the next iteration begins.
    """

    def __init__(
        self,
        dataset,
        transform: Callable,
        image_column: str | None,
        rank: int,
        world_size: int,
        seed: int,
        batch_size: int,
        epoch: int = 0,
        worker_batches: Sequence[int] = (),
    ):
        from datasets import Image as ImageFeature

        self.column = _image_column(dataset, image_column)
        self.decoder = ImageFeature()
        self.stream = dataset.cast_column(self.column, ImageFeature(decode=False)).shuffle(seed=seed, buffer_size=1000)
        self.transform, self.seed, self.rank, self.world_size = transform, seed, rank, world_size
        self.batch_size = batch_size
        self.start(epoch, worker_batches)
        self.skips = SkipCounter()

    def start(self, epoch: int, worker_batches: Sequence[int] = ()) -> None:
        self.epoch, self.worker_batches = epoch, list(worker_batches)

    def __iter__(self) -> Iterator:
        from datasets.distributed import split_dataset_by_node

        worker = worker_index()
        stream = split_dataset_by_node(self.stream, rank=self.rank, world_size=self.world_size)
        stream.set_epoch(self.epoch)  # after the split, which does not carry the epoch over
        to_skip = (self.worker_batches[worker] if worker < len(self.worker_batches) else 0) * self.batch_size
        readable, skipped = 0, 0
        for row in stream:
            try:
                image = self.decoder.decode_example(row[self.column]).convert("RGB")
            except DECODE_ERRORS as error:
                if readable >= to_skip:  # rows before that were counted by the run that trained on them
                    self.skips.record(f"{row[self.column].get('path') or 'a streamed row'}", error)
                    skipped += 1
                continue
            readable += 1
            if readable <= to_skip:  # resuming: already trained on
                continue
            seed = sample_seed(self.seed, self.epoch, self.rank, worker, readable)
            yield seeded(self.transform, image, seed), skipped, seed
            skipped = 0


class EpochBatchSampler:
    """Shuffled batches of one process's share of a map-style dataset, reproducible and resumable.

    Epoch e uses the permutation seeded by `seed + e`, truncated to a multiple of `world_size * batch_size` so that
    every process gets the same number of batches; process r takes every `world_size`-th index from r. Batches are
    lists of `(index, epoch)`. `start(epoch, batch)` makes the next iteration begin at that batch of that epoch.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UsageError(
                f"The dataset has {num_items} images, fewer than one global batch "
                f"({batch_size} per process x {world_size} processes)."
            )
        self.num_items, self.batch_size, self.rank, self.world_size, self.seed = (
            num_items,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.epoch, self.first_batch = 0, 0

    def start(self, epoch: int, batch: int) -> None:
        self.epoch, self.first_batch = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.first_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator)
        usable = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:usable][self.rank :: self.world_size].tolist()
        for batch in range(self.first_batch, self.batches_per_epoch):
            yield [(index, self.epoch) for index in mine[batch * self.batch_size : (batch + 1) * self.batch_size]]

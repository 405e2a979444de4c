"""Image sources for pretraining and evaluation: the embedded demo set, image folders, Hugging Face datasets.

A source spec is a string: `"demo"` (procedural, no download), a folder path (images found recursively; labels
from the first-level subfolder names when every image sits in one), or `"hf:<name or saved path>"` (any `datasets`
image dataset, map-style or streamed). Unreadable images are skipped and counted, never fatal: a training sample
that cannot be decoded is replaced by the next readable one, so every process keeps the same batch size.
"""

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..features import DECODE_ERRORS, collect_image_paths

logger = logging.getLogger(__name__)
MAX_CONSECUTIVE_FAILURES = 100


@dataclass
class ImageSource:
    """An indexable set of images with optional integer labels (-1 when unlabelled).

    Attributes:
        name: the spec it came from.
        load: index -> PIL image (may raise a decoding error).
        size: number of images.
        labels: per-image class index, or None.
        class_names: names of the classes, or None.
        describe: index -> a human-readable location (path or row), for error reports.
    """

    name: str
    load: Callable[[int], Image.Image]
    size: int
    labels: list[int] | None = None
    class_names: list[str] | None = None
    describe: Callable[[int], str] = str

    def __len__(self) -> int:
        return self.size


def _open_path(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def folder_source(root: str | Path) -> ImageSource:
    """Every image under `root`; labelled by first-level subfolder when all images are inside subfolders."""
    root = Path(root)
    paths = collect_image_paths([root])
    parents = [p.relative_to(root).parts for p in paths]
    labels = class_names = None
    if all(len(parts) > 1 for parts in parents):
        class_names = sorted({parts[0] for parts in parents})
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[parts[0]] for parts in parents]
    return ImageSource(
        str(root), lambda i: _open_path(paths[i]), len(paths), labels, class_names, lambda i: str(paths[i])
    )


def _image_column(dataset, requested: str | None) -> str:
    from datasets import Image as ImageFeature

    features = dataset.features or {}
    if requested is not None:
        if features and requested not in features:
            raise ValueError(f"Column {requested!r} not found; the dataset has {sorted(features)}.")
        return requested
    for name, feature in features.items():
        if isinstance(feature, ImageFeature):
            return name
    raise ValueError(f"No Image column found among {sorted(features)}; set data.image_column.")


def _label_column(dataset) -> tuple[str | None, list[str] | None]:
    from datasets import ClassLabel

    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, ClassLabel):
            return name, list(feature.names)
    return None, None


def load_hf_dataset(spec: str, split: str, streaming: bool = False):
    """`datasets.load_from_disk` for a saved folder, `datasets.load_dataset(name, split=...)` otherwise."""
    import datasets

    target = spec.removeprefix("hf:")
    if Path(target).is_dir() and any(Path(target).glob("*.json")):
        loaded = datasets.load_from_disk(target)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{target} has splits {sorted(loaded)}, not {split!r}.")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    return datasets.load_dataset(target, split=split, streaming=streaming)


def hf_source(dataset, name: str, image_column: str | None = None) -> ImageSource:
    """A map-style `datasets.Dataset` as an ImageSource (images decoded lazily, row by row)."""
    column = _image_column(dataset, image_column)
    label_column, class_names = _label_column(dataset)
    labels = list(dataset[label_column]) if label_column else None

    def load(index: int) -> Image.Image:
        return dataset[index][column].convert("RGB")

    return ImageSource(name, load, len(dataset), labels, class_names, lambda i: f"{name} row {i}")


def open_source(
    spec: str, split: str = "train", image_column: str | None = None, demo_num_images: int = 5000, seed: int = 0
) -> ImageSource:
    """Resolve a source spec (see the module docstring) to a map-style ImageSource."""
    if spec == "demo":
        from .demo_data import load_demo_dataset

        return hf_source(load_demo_dataset(split=split, num_images=demo_num_images, seed=seed), "demo", "image")
    if spec.startswith("hf:"):
        return hf_source(load_hf_dataset(spec, split), spec, image_column)
    if Path(spec).is_dir():
        return folder_source(spec)
    raise ValueError(f"Data source {spec!r} is not 'demo', 'hf:<dataset>' or an existing image folder.")


class SkipCounter:
    """Counts the images that could not be decoded and reports each one once."""

    def __init__(self) -> None:
        self.count = 0
        self.reported: set[str] = set()

    def record(self, where: str, error: Exception) -> None:
        self.count += 1
        if where not in self.reported:
            self.reported.add(where)
            logger.warning("Skipping unreadable image %s: %s: %s", where, type(error).__name__, error)


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
            raise ValueError(
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


def subset(source: ImageSource, indices: list[int]) -> ImageSource:
    """The images of `source` at `indices`, labels kept aligned."""
    labels = [source.labels[i] for i in indices] if source.labels is not None else None
    return ImageSource(
        source.name,
        lambda i: source.load(indices[i]),
        len(indices),
        labels,
        source.class_names,
        lambda i: source.describe(indices[i]),
    )


def subsample(source: ImageSource, max_images: int | None, seed: int = 0) -> ImageSource:
    """At most `max_images` images of `source`, a fixed random subset."""
    if max_images is None or max_images >= len(source):
        return source
    return subset(source, sorted(random.Random(seed).sample(range(len(source)), max_images)))


def split_off(source: ImageSource, count: int, seed: int = 0) -> tuple[ImageSource, ImageSource]:
    """(rest, held_out): `count` random images held out, disjoint from the rest."""
    if not 0 < count < len(source):
        raise ValueError(f"Cannot hold out {count} of the {len(source)} images of {source.name}.")
    held = set(random.Random(seed).sample(range(len(source)), count))
    rest = [i for i in range(len(source)) if i not in held]
    return subset(source, rest), subset(source, sorted(held))

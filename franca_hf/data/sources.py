"""Image sources for extraction, evaluation and training: image files and folders, Hugging Face datasets, the demo.

A source spec is a string: `"demo"` (procedural, no download), a folder path (images found recursively; labels
from the first-level subfolder names when every image sits in one), or `"hf:<name or saved path>"` (any `datasets`
image dataset). Every image has an id that says where it came from: its file path, or `<spec>[<split>][<row>]` for
a dataset row. Unreadable images are skipped, reported once each (`SkipCounter`), never fatal.

Nothing here imports the trainer, so inference code can use it without loading `franca_hf.training`.
"""

import dataclasses
import logging
import os
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import InputNotFoundError, UsageError

logger = logging.getLogger(__name__)
# What opening a damaged, truncated, unsupported or absurdly large (decompression bomb) image file raises.
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


@dataclass
class ImageSource:
    """An indexable set of images with optional integer labels.

    Attributes:
        name: the spec it came from.
        load: index -> PIL RGB image (may raise one of `DECODE_ERRORS`).
        size: number of images.
        labels: per-image class index, or None.
        class_names: names of the classes, or None.
        describe: index -> the image's id: its file path, or `<spec>[<split>][<row>]` for a dataset row.

    The sources built here use module-level functions (not closures), so they pickle: DataLoader workers get them
    under any multiprocessing start method.
    """

    name: str
    load: Callable[[int], Image.Image]
    size: int
    labels: list[int] | None = None
    class_names: list[str] | None = None
    describe: Callable[[int], str] = str

    def __len__(self) -> int:
        return self.size


def collect_image_paths(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted); a path given twice (or inside two
    given folders) is kept once, at its first place. One path stands for itself (not its letters). Errors on missing
    inputs and on finding no image."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: dict[Path, None] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            paths.update(dict.fromkeys(sorted(p for p in item.rglob("*") if p.is_file() and _is_image(p))))
        elif item.is_file():
            paths[item] = None
        else:
            raise InputNotFoundError(f"{item} is neither an image file nor a folder.")
    if not paths:
        raise UsageError(f"No image files found in {[str(i) for i in inputs]} (suffixes: {sorted(IMAGE_SUFFIXES)}).")
    return list(paths)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def open_image(path: str | Path) -> Image.Image:
    """The RGB image of a file (fully decoded, file closed)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """The RGB image of one image file; a folder, a missing file or one that does not decode (not an image, truncated)
    is a one-line error naming the file (needs neither torch nor a model)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; visualize draws one image file.")
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist.")
    try:
        return open_image(path)
    except DECODE_ERRORS as error:
        raise UsageError(f"{path} cannot be read as an image ({error}).") from error


def _open_listed(paths: list[str], index: int) -> Image.Image:
    return open_image(paths[index])


def files_source(paths: Sequence[str | Path], name: str | None = None) -> ImageSource:
    """Image files as an unlabelled source; their paths are the ids."""
    paths = [str(p) for p in paths]
    return ImageSource(name or "files", partial(_open_listed, paths), len(paths), describe=paths.__getitem__)


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
    source = files_source(paths, str(root))
    source.labels, source.class_names = labels, class_names
    return source


def _image_column(dataset, requested: str | None) -> str:
    from datasets import Image as ImageFeature

    features = dataset.features or {}
    if requested is not None:
        if features and requested not in features:
            raise UsageError(f"Column {requested!r} not found; the dataset has {sorted(features)}.")
        return requested
    for name, feature in features.items():
        if isinstance(feature, ImageFeature):
            return name
    raise UsageError(f"No Image column found among {sorted(features)}; set data.image_column.")


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
                raise UsageError(f"{target} has splits {sorted(loaded)}, not {split!r}.", setting="split")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    return datasets.load_dataset(target, split=split, streaming=streaming)


def hf_source(dataset, name: str, image_column: str | None = None) -> ImageSource:
    """A map-style `datasets.Dataset` as an ImageSource (images decoded lazily, row by row); row ids are
    `<name>[<split>][<row>]`."""
    column = _image_column(dataset, image_column)
    label_column, class_names = _label_column(dataset)
    labels = list(dataset[label_column]) if label_column else None
    describe = f"{name}[{dataset.split or 'train'}][{{}}]".format
    return ImageSource(name, partial(_load_row, dataset, column), len(dataset), labels, class_names, describe)


def _load_row(dataset, column: str, index: int) -> Image.Image:
    return dataset[index][column].convert("RGB")


def open_source(
    spec: str, split: str = "train", image_column: str | None = None, demo_num_images: int = 5000, seed: int = 0
) -> ImageSource:
    """Resolve a source spec (see the module docstring) to a map-style ImageSource."""
    if spec == "demo":
        from .demo import load_demo_dataset

        return hf_source(load_demo_dataset(split=split, num_images=demo_num_images, seed=seed), "demo", "image")
    if spec.startswith("hf:"):
        return hf_source(load_hf_dataset(spec, split), spec, image_column)
    if Path(spec).is_dir():
        return folder_source(spec)
    raise UsageError(f"Data source {spec!r} is not 'demo', 'hf:<dataset>' or an existing image folder.")


class SkipCounter:
    """Counts the images that could not be decoded, keeps (id, reason) of each, and logs each one once."""

    def __init__(self) -> None:
        self.count = 0
        self.failed: list[tuple[str, str]] = []
        self.reported: set[str] = set()

    def record(self, where: str, error: Exception | str) -> None:
        """Note that image `where` could not be read, because of `error` (an exception, or its description)."""
        self.count += 1
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if where not in self.reported:
            self.reported.add(where)
            self.failed.append((where, reason))
            logger.warning("Skipping unreadable image %s: %s", where, reason)

    def describe(self, shown: int = 3) -> str:
        """The first `shown` unreadable images with their reasons, one clause each: 'a.jpg (OSError: ...); b.jpg
        (...); and 4 more'."""
        clauses = [f"{where} ({reason})" for where, reason in self.failed[:shown]]
        more = len(self.failed) - shown
        return "; ".join(clauses) + (f"; and {more} more" if more > 0 else "")


@contextmanager
def naming_split(role: str):
    """Re-raise a source's refusal of a split (setting `split`) as one of the setting `<role>_split` (`test_split`),
    the name the caller's settings give it."""
    try:
        yield
    except UsageError as error:
        if error.setting != "split":
            raise
        raise UsageError(f"{role}_split: {error}", setting=f"{role}_split") from None


def classes_of(train: ImageSource, *others: tuple[str, ImageSource]) -> tuple[ImageSource, ...]:
    """The sources of a classifier's splits, every label an index into `train`'s classes: each of `others` (role,
    source) with its labels renumbered by class name where both name their classes (two image folders number their
    own subfolders from 0: a test folder without one of train's classes would score against the wrong ones); by
    number, with a warning, where the two share no class name (two namings of one class list). A UsageError names an
    unlabelled source, unlabelled images (label -1, as in unlabelled Hub test splits), and classes of another split
    that `train` lacks (some of its names are train's, others not: no classifier of train's classes predicts them)."""
    aligned = [train]
    for role, source in (("train", train), *others):
        if source.labels is None:
            raise UsageError(
                f"{role}={source.name} has no labels: give a folder with one subfolder per class, an hf: dataset "
                "with a ClassLabel column, or 'demo'.",
                setting=role,
            )
        unlabelled = sum(label < 0 for label in source.labels)
        if unlabelled:
            raise UsageError(
                f"{role}={source.name}: {unlabelled} of its {len(source)} images have no label (-1, as in unlabelled "
                "test splits); give a labelled split.",
                setting=role,
            )
        if role == "train":
            continue
        if source.class_names is None or train.class_names is None:
            aligned.append(source)  # numbered classes without names: taken as train's numbering
            continue
        missing = [name for name in source.class_names if name not in train.class_names]
        if len(missing) == len(source.class_names):  # two namings of the classes (ImageNet's wnids and words, say)
            logger.warning(
                "%s=%s names its classes otherwise than train=%s (%r vs %r ...): matched by number, class i to "
                "class i.",
                role,
                source.name,
                train.name,
                source.class_names[0],
                train.class_names[0],
            )
            aligned.append(source)
            continue
        if missing:
            raise UsageError(
                f"{role}={source.name} has classes that train={train.name} has not: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; a classifier of train's {len(train.class_names)} classes "
                "cannot predict them. Give splits of the same classes.",
                setting=role,
            )
        number = {name: index for index, name in enumerate(train.class_names)}
        labels = [number[source.class_names[label]] for label in source.labels]
        aligned.append(dataclasses.replace(source, labels=labels, class_names=list(train.class_names)))
    return tuple(aligned)


def subset(source: ImageSource, indices: list[int]) -> ImageSource:
    """The images of `source` at `indices`, labels and ids kept aligned."""
    labels = [source.labels[i] for i in indices] if source.labels is not None else None
    return ImageSource(
        source.name,
        partial(_through, source.load, indices),
        len(indices),
        labels,
        source.class_names,
        partial(_through, source.describe, indices),
    )


def _through(function: Callable, indices: list[int], index: int):
    return function(indices[index])


def subsample(source: ImageSource, max_images: int | None, seed: int = 0) -> ImageSource:
    """At most `max_images` images of `source`, a fixed random subset."""
    if max_images is None or max_images >= len(source):
        return source
    return subset(source, _sample(len(source), max_images, seed))


def _sample(size: int, count: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(size), count))


def split_off(source: ImageSource, count: int, seed: int = 0) -> tuple[ImageSource, ImageSource]:
    """(rest, held_out): `count` random images held out, disjoint from the rest."""
    if not 0 < count < len(source):
        raise UsageError(f"Cannot hold out {count} of the {len(source)} images of {source.name}.")
    held = set(random.Random(seed).sample(range(len(source)), count))
    rest = [i for i in range(len(source)) if i not in held]
    return subset(source, rest), subset(source, sorted(held))


IGNORE_INDEX = 255  # mask value of pixels that no metric counts (unlabelled, boundaries), as in the common datasets
MASK_COLUMNS = ("mask", "annotation", "label", "segmentation", "semantic_segmentation", "gtFine")


@dataclass
class SegmentationSource:
    """Images with per-pixel class masks.

    Attributes:
        images: the images (ids, lazy loading) as an ImageSource.
        load_mask: index -> the (H, W) mask image as given (single-channel, class indices; 255 = ignored).
        class_names: the classes in index order, when the source names them (the demo does).
    """

    images: ImageSource
    load_mask: Callable[[int], Image.Image]
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)


def _mask_column(dataset, image_column: str, requested: str | None, spec: str) -> str:
    from datasets import Image as ImageFeature

    features = dataset.features or {}
    if requested is not None:
        if requested not in features:
            raise UsageError(f"Mask column {requested!r} not found in {spec}; the dataset has {sorted(features)}.")
        if not isinstance(features[requested], ImageFeature):
            images = [name for name, feature in features.items() if isinstance(feature, ImageFeature)]
            raise UsageError(
                f"Column {requested!r} of {spec} holds {type(features[requested]).__name__} values, not mask images "
                f"(an Image feature of class indices); its Image columns are {images}.",
                setting="mask_column",
            )
        return requested
    candidates = [
        name for name, feature in features.items() if isinstance(feature, ImageFeature) and name != image_column
    ]
    named = [name for name in candidates if name in MASK_COLUMNS]
    if named or len(candidates) == 1:
        return (named or candidates)[0]
    raise UsageError(
        f"{spec} has no mask column: a segmentation source needs an image column and a mask column (an Image "
        f"feature of class indices); its columns are {sorted(features)}"
        + (f". Several could be masks ({candidates}): set mask_column." if candidates else ".")
    )


def _load_row_mask(masks, column: str, index: int) -> Image.Image:
    """The mask of row `index` of a dataset of that column alone (`select_columns`): a row's unreadable image, skipped
    where it is embedded, is never decoded here."""
    return masks[index][column]


def _open_listed_mask(paths: list[str], index: int) -> Image.Image:
    with Image.open(paths[index]) as mask:
        mask.load()
        return mask


def _folder_pairs(root: Path) -> SegmentationSource:
    images_dir, masks_dir = root / "images", root / "masks"
    if not (images_dir.is_dir() and masks_dir.is_dir()):
        raise UsageError(
            f"{root} is not a segmentation folder: it needs an images/ folder and a masks/ folder holding, for each "
            "image, a mask of the same relative path with a .png suffix."
        )
    images = collect_image_paths([images_dir])
    masks = [masks_dir / path.relative_to(images_dir).with_suffix(".png") for path in images]
    missing = [(image, mask) for image, mask in zip(images, masks, strict=True) if not mask.is_file()]
    if missing:
        image, mask = missing[0]
        raise InputNotFoundError(
            f"{len(missing)} of the {len(images)} images of {root} have no mask, e.g. {image} (expected {mask})."
        )
    return SegmentationSource(files_source(images, str(root)), partial(_open_listed_mask, [str(m) for m in masks]))


def open_segmentation_source(
    spec: str,
    split: str = "train",
    image_column: str | None = None,
    mask_column: str | None = None,
    demo_num_images: int = 5000,
    seed: int = 0,
) -> SegmentationSource:
    """Resolve a segmentation source spec: `"demo"` (shape vs background masks, by class), `"hf:<dataset>"` with an
    image column and a mask column (as `scene_parse_150`: `image`, `annotation`), or a folder with `images/` and
    `masks/` (a `.png` mask per image, same relative path)."""
    if spec == "demo":
        from .demo import DEMO_SEGMENTATION_CLASSES, load_demo_dataset

        dataset = load_demo_dataset(split=split, num_images=demo_num_images, seed=seed, masks=True)
        return SegmentationSource(
            hf_source(dataset, "demo", "image"),
            partial(_load_row_mask, dataset.select_columns(["mask"]), "mask"),
            list(DEMO_SEGMENTATION_CLASSES),
        )
    if spec.startswith("hf:"):
        dataset = load_hf_dataset(spec, split)
        images = hf_source(dataset, spec, image_column)
        masks = _mask_column(dataset, _image_column(dataset, image_column), mask_column, spec)
        return SegmentationSource(images, partial(_load_row_mask, dataset.select_columns([masks]), masks))
    if Path(spec).is_dir():
        return _folder_pairs(Path(spec))
    raise UsageError(f"Segmentation source {spec!r} is not 'demo', 'hf:<dataset>' or an existing folder.")


def subsample_segmentation(source: SegmentationSource, max_images: int | None, seed: int = 0) -> SegmentationSource:
    """At most `max_images` images of `source` with their masks, a fixed random subset (the one `subsample` takes)."""
    if max_images is None or max_images >= len(source):
        return source
    indices = _sample(len(source), max_images, seed)
    return SegmentationSource(
        subset(source.images, indices), partial(_through, source.load_mask, indices), source.class_names
    )

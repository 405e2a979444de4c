"""Dense evaluation on frozen patch tokens at every Matryoshka dim, raw and RASA-debiased: a linear segmentation
probe and (over)clustering.

Images are resized to `image_size` x `image_size` (bicubic, the model's mean/std) and masks to the same size
(nearest); scores are computed at that resolution over the whole test set.

* Linear probe: a 1x1 linear head (a Linear layer on each patch token) per (variant, dim), its (C, h, w) logits
  bilinearly upsampled to the image size, trained with cross-entropy (255 ignored) on the train split; mIoU of the
  argmax on the test split (IoU per class from the dataset's confusion matrix, mean over the classes that occur).
* Clustering: FAISS K-means on the test split's L2-normalised patch tokens, each patch's cluster upsampled (nearest)
  to pixels, clusters matched to classes (`matching.match_clusters`: Hungarian for K <= C, many-to-one beyond),
  mIoU of the matched map. K = C is clustering proper; K > C is overclustering.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data.sources import DECODE_ERRORS, IGNORE_INDEX, SegmentationSource, SkipCounter, subsample_segmentation
from ..errors import UsageError
from ..features.loop import run_model
from ..modeling import matryoshka_dims_of
from .matching import match_clusters
from .settings import SegmentationSettings

VARIANTS = ("raw", "debiased")


def square_processor(image_processor, size: int):
    """The model's image processor resizing to `size` x `size` with no crop (dense evaluation keeps the whole image)."""
    from transformers import BitImageProcessor
    from transformers.image_utils import PILImageResampling

    return BitImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        do_center_crop=False,
        resample=PILImageResampling.BICUBIC,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        do_convert_rgb=True,
    )


def read_mask(source: SegmentationSource, position: int, size: int, num_classes: int | None) -> torch.Tensor:
    """(size, size) int64 class indices of one mask (nearest resize); errors on a mask that does not fit its image
    or holds a value outside the classes (255 = ignored is allowed)."""
    where = source.images.describe(position)
    try:
        mask = source.load_mask(position)
    except DECODE_ERRORS as error:
        raise UsageError(f"The mask of {where} cannot be read as an image ({error}).") from None
    if mask is None:
        raise UsageError(f"The image {where} has no mask; every image of a segmentation source needs one.")
    if mask.mode not in ("L", "P", "I", "I;16"):
        raise UsageError(
            f"The mask of {where} is a {mask.mode} image; masks are single-channel images of class indices "
            "(mode L, P or I)."
        )
    image = source.images.load(position)
    if mask.size != image.size:
        raise UsageError(
            f"The mask of {where} is {mask.size[0]}x{mask.size[1]} pixels and its image "
            f"{image.size[0]}x{image.size[1]}; a mask must have its image's size."
        )
    values = torch.from_numpy(np.asarray(mask.resize((size, size), Image.NEAREST), dtype=np.int64).copy())
    if num_classes is not None:
        bad = (values >= num_classes) & (values != IGNORE_INDEX)
        if bad.any():
            raise UsageError(
                f"The mask of {where} holds the value {int(values[bad][0])}, outside the classes 0..{num_classes - 1} "
                f"(and {IGNORE_INDEX}, ignored pixels); set num_classes if the source has more classes."
            )
    return values


@dataclass
class DenseSplit:
    """Patch tokens of one split in the model's Matryoshka basis, full width: {variant: (n, N, D)}; masks (n, S, S);
    the image ids; grid (h, w)."""

    tokens: dict[str, torch.Tensor]
    masks: torch.Tensor
    ids: list[str]
    grid: tuple[int, int]


def dense_split(
    model,
    image_processor,
    source: SegmentationSource,
    size: int,
    num_classes: int | None,
    batch_size: int = 32,
    num_workers: int | None = 0,
    progress: bool = False,
) -> DenseSplit:
    """Patch tokens (raw, and RASA-debiased when the model has RASA weights) and masks of every readable image."""
    width = model.config.hidden_size
    variants = VARIANTS if getattr(model, "has_rasa", False) else VARIANTS[:1]

    def forward(model, pixels):
        output = model(pixels, return_dict=True)
        parts = {"raw": output.patch_tokens, "debiased": output.debiased_patch_tokens}
        return {name: model.matryoshka_cut(parts[name], width, patches=True).float().cpu() for name in variants}

    masks = {}  # read first: a bad mask is refused before the images are embedded
    for position in tqdm(range(len(source)), desc="masks", unit="img", disable=not progress):
        try:
            masks[position] = read_mask(source, position, size, num_classes)
        except UsageError:  # a bad mask (a ValueError, as some decode errors are)
            raise
        except DECODE_ERRORS:  # an unreadable image: skipped, and reported, where it is embedded
            continue
    skips = SkipCounter()
    tokens = {name: [] for name in variants}
    positions_done = []
    processor = square_processor(image_processor, size)
    for positions, outputs in run_model(
        model,
        source.images,
        processor,
        forward,
        batch_size=batch_size,
        num_workers=num_workers,
        skips=skips,
        progress=progress,
        desc="dense features",
    ):
        positions_done.extend(positions)
        for name in variants:
            tokens[name].append(outputs[name])
    if not positions_done:
        raise UsageError(f"None of the {len(source)} images of {source.images.name} could be read.")
    masks = torch.stack([masks[p] for p in positions_done])
    patch = model.config.patch_size
    return DenseSplit(
        {name: torch.cat(parts) for name, parts in tokens.items()},
        masks,
        [source.images.describe(p) for p in positions_done],
        (size // patch, size // patch),
    )


def confusion(predictions: torch.Tensor, masks: torch.Tensor, num_predicted: int, num_classes: int) -> torch.Tensor:
    """(num_predicted, num_classes) pixel counts of (prediction, true class), pixels marked 255 left out."""
    keep = masks != IGNORE_INDEX
    pairs = predictions[keep].long() * num_classes + masks[keep]
    return torch.bincount(pairs, minlength=num_predicted * num_classes).reshape(num_predicted, num_classes)


def mean_iou(matrix: torch.Tensor) -> float:
    """mIoU (%) of a square (predicted, true) confusion matrix over the classes present in it."""
    matrix = matrix.double()
    true_positive = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    present = union > 0
    return (true_positive[present] / union[present]).mean().item() * 100


@dataclass
class SegmentationResult:
    """mIoU (%) per (variant, dim) of the linear probe, per (variant, dim, K) of clustering; seconds per stage."""

    num_classes: int
    num_train: int
    num_test: int
    linear: dict[tuple[str, int], float] = field(default_factory=dict)
    clustering: dict[tuple[str, int, int], float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    heads: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)


def predict(tokens: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor], grid, size: int) -> torch.Tensor:
    """(B, C, size, size) upsampled logits of a linear head (weight (d, C), bias (C,)) on tokens (B, N, d)."""
    weight, bias = head
    logits = (tokens @ weight + bias).transpose(1, 2).reshape(len(tokens), -1, *grid)
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def train_heads(
    train: DenseSplit, dims: Sequence[int], num_classes: int, settings: SegmentationSettings, progress: bool = False
) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """A 1x1 linear head per (variant, dim), AdamW on the upsampled-logit cross-entropy (255 ignored)."""
    generator = torch.Generator().manual_seed(settings.seed)
    heads, optimizers = {}, {}
    for variant in train.tokens:
        for dim in dims:
            weight = torch.empty(dim, num_classes).normal_(0.0, 0.01, generator=generator).requires_grad_()
            bias = torch.zeros(num_classes, requires_grad=True)
            heads[variant, dim] = (weight, bias)
            optimizers[variant, dim] = torch.optim.AdamW([weight, bias], lr=settings.learning_rate, weight_decay=0.0)
    size = train.masks.shape[-1]
    count = len(train.masks)
    for _ in tqdm(range(settings.epochs), desc="segmentation heads", disable=not progress):
        for indices in torch.randperm(count, generator=generator).split(settings.batch_size):
            masks = train.masks[indices]
            for (variant, dim), head in heads.items():
                logits = predict(train.tokens[variant][indices, :, :dim], head, train.grid, size)
                loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
                optimizers[variant, dim].zero_grad()
                loss.backward()
                optimizers[variant, dim].step()
    return {key: (weight.detach(), bias.detach()) for key, (weight, bias) in heads.items()}


@torch.no_grad()
def probe_miou(test: DenseSplit, heads, num_classes: int, chunk: int = 64) -> dict[tuple[str, int], float]:
    """Test mIoU (%) of each trained head."""
    size = test.masks.shape[-1]
    scores = {}
    for (variant, dim), head in heads.items():
        matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for start in range(0, len(test.masks), chunk):
            tokens = test.tokens[variant][start : start + chunk, :, :dim]
            predictions = predict(tokens, head, test.grid, size).argmax(1)
            matrix += confusion(predictions, test.masks[start : start + chunk], num_classes, num_classes)
        scores[variant, dim] = mean_iou(matrix)
    return scores


def cluster_miou(tokens: torch.Tensor, masks: torch.Tensor, grid, clusters: int, num_classes: int, seed: int) -> float:
    """mIoU (%) of FAISS K-means (`clusters` centroids) of L2-normalised patch tokens (n, N, d), matched to classes."""
    import faiss

    flat = F.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1).numpy().astype(np.float32)
    if len(flat) < clusters:
        raise UsageError(
            f"K-means with {clusters} clusters needs at least as many patch tokens; the test split has {len(flat)}."
        )
    # the best of 3 seedings (by K-means objective): one seeding alone often merges two true clusters
    kmeans = faiss.Kmeans(flat.shape[1], clusters, niter=30, nredo=3, seed=seed, verbose=False, spherical=True)
    kmeans.train(flat)
    _, assignment = kmeans.index.search(flat, 1)
    size = masks.shape[-1]
    maps = torch.from_numpy(assignment.reshape(len(tokens), 1, *grid)).float()
    pixels = F.interpolate(maps, size=(size, size), mode="nearest")[:, 0].long()
    overlap = confusion(pixels, masks, clusters, num_classes)
    cluster_class = torch.from_numpy(match_clusters(overlap.numpy()))
    return mean_iou(confusion(cluster_class[pixels], masks, num_classes, num_classes))


def infer_num_classes(source: SegmentationSource, masks: torch.Tensor, settings: SegmentationSettings) -> int:
    if settings.num_classes is not None:
        return settings.num_classes
    if source.class_names is not None:
        return len(source.class_names)
    labelled = masks[masks != IGNORE_INDEX]
    if labelled.numel() == 0:
        raise UsageError(f"Every pixel of the train masks of {source.images.name} is {IGNORE_INDEX} (ignored).")
    return int(labelled.max()) + 1


def evaluate_segmentation(
    model,
    image_processor,
    train_source: SegmentationSource,
    test_source: SegmentationSource,
    settings: SegmentationSettings,
    dims: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[SegmentationResult, DenseSplit]:
    """Linear segmentation probe and clustering mIoU at each dim (the model's Matryoshka dims when None), raw and
    debiased (when the model has RASA weights). Returns the result and the test split (for figures)."""
    dims = list(dims or matryoshka_dims_of(model.config))
    size = settings.image_size or model.config.image_size
    if size % model.config.patch_size:
        raise UsageError(
            f"image_size={size} is not a multiple of the model's patch size {model.config.patch_size}.",
            setting="image_size",
        )
    train_source = subsample_segmentation(train_source, settings.max_images, settings.seed)
    test_source = subsample_segmentation(test_source, settings.max_images, settings.seed)
    seconds = {}
    start = time.perf_counter()
    known = settings.num_classes or (len(train_source.class_names) if train_source.class_names else None)
    embed = dict(batch_size=settings.embed_batch_size, num_workers=settings.num_workers, progress=progress)
    train = dense_split(model, image_processor, train_source, size, known, **embed)
    num_classes = infer_num_classes(train_source, train.masks, settings)
    test = dense_split(model, image_processor, test_source, size, num_classes, **embed)
    seconds["features"] = time.perf_counter() - start
    cluster_counts = settings.clusters or (num_classes, 3 * num_classes)
    patch_tokens = len(test.masks) * test.grid[0] * test.grid[1]
    for clusters in cluster_counts:  # refused before the heads train, not after
        if clusters > patch_tokens:
            raise UsageError(
                f"clusters={clusters}: K-means needs at least as many patch tokens, and the test split has "
                f"{patch_tokens} ({len(test.masks)} images of {test.grid[0]} x {test.grid[1]} patches).",
                setting="clusters",
            )

    start = time.perf_counter()
    heads = train_heads(train, dims, num_classes, settings, progress)
    linear = probe_miou(test, heads, num_classes)
    seconds["linear"] = time.perf_counter() - start

    start = time.perf_counter()
    clustering = {}
    runs = [(k, variant, dim) for k in cluster_counts for variant in test.tokens for dim in dims]
    for clusters, variant, dim in tqdm(runs, desc="K-means", unit="fit", disable=not progress):
        tokens = test.tokens[variant][..., :dim]
        clustering[variant, dim, clusters] = cluster_miou(
            tokens, test.masks, test.grid, clusters, num_classes, settings.seed
        )
    seconds["clustering"] = time.perf_counter() - start
    result = SegmentationResult(num_classes, len(train.masks), len(test.masks), linear, clustering, seconds, heads)
    return result, test


PANEL = 128  # pixels per panel side in figures


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: a fixed colour per class, black for 255 (ignored)."""
    colours = np.zeros((256, 3), np.uint8)
    rng = np.random.default_rng(0)
    colours[:num_classes] = rng.integers(40, 256, (num_classes, 3))
    colours[0] = (0, 0, 0) if num_classes > 1 else colours[0]
    return colours


def show_predictions(
    test: DenseSplit, source: SegmentationSource, result: SegmentationResult, count: int, out: str | Path
) -> Path:
    """A PNG of the first `count` test images, one per row: the image, its ground truth, and the linear probe's
    prediction at the largest dim, raw and (with RASA weights) debiased; written atomically to `out`."""
    from PIL import ImageDraw

    from ..io import picture_format, write_file_atomically

    count = min(count, len(test.masks))
    dim = max(d for _, d in result.heads)
    size = test.masks.shape[-1]
    colours = palette(result.num_classes)
    columns = ["image", "ground truth"] + [f"{variant}, dim {dim}" for variant in test.tokens]
    caption, margin = 16, 6
    canvas = Image.new(
        "RGB", (len(columns) * (PANEL + margin) + margin, count * (PANEL + margin) + margin + caption), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(columns):
        draw.text((margin + column * (PANEL + margin), 2), title, fill="black")
    positions = {source.images.describe(i): i for i in range(len(source))}
    for row in range(count):
        image = source.images.load(positions[test.ids[row]]).resize((size, size), Image.BICUBIC)
        maps = [test.masks[row]] + [
            predict(test.tokens[variant][row : row + 1, :, :dim], result.heads[variant, dim], test.grid, size)[
                0
            ].argmax(0)
            for variant in test.tokens
        ]
        panels = [image] + [Image.fromarray(colours[m.numpy().astype(np.uint8)]) for m in maps]
        for column, panel in enumerate(panels):
            top = caption + margin + row * (PANEL + margin)
            canvas.paste(panel.resize((PANEL, PANEL), Image.NEAREST), (margin + column * (PANEL + margin), top))
    return write_file_atomically(out, lambda staging: canvas.save(staging, format=picture_format(out, "figure")))


def format_segmentation_result(result: SegmentationResult) -> str:
    """Markdown tables: linear-probe mIoU per dim and variant, then clustering mIoU per K, dim and variant."""
    variants = sorted({v for v, _ in result.linear}, key=VARIANTS.index)
    dims = sorted({d for _, d in result.linear})
    header = "| dim | " + " | ".join(variants) + " |"
    rule = "|---:|" + "---:|" * len(variants)
    lines = [
        f"linear segmentation mIoU (%), {result.num_classes} classes, {result.num_train} train / "
        f"{result.num_test} test images",
        header,
        rule,
    ]
    lines += [f"| {d} | " + " | ".join(f"{result.linear[v, d]:.1f}" for v in variants) + " |" for d in dims]
    for clusters in sorted({k for _, _, k in result.clustering}):
        how = "Hungarian" if clusters <= result.num_classes else "many-to-one"
        lines += ["", f"clustering mIoU (%), K = {clusters} ({how})", header, rule]
        lines += [
            f"| {d} | " + " | ".join(f"{result.clustering[v, d, clusters]:.1f}" for v in variants) + " |" for d in dims
        ]
    return "\n".join(lines)


def run_segmentation_evaluation(settings: SegmentationSettings) -> SegmentationResult:
    """What `franca-hf eval seg` does: `evaluate_segmentation` of `settings.model` on `settings.train` /
    `settings.test`; with `settings.show`, also the figure of that many test images (`show_predictions`) at
    `settings.figure`."""
    if settings.model is None:
        raise UsageError("run_segmentation_evaluation needs the model to evaluate: set model.", setting="model")
    from ..data.demo import demo_split_size
    from ..data.sources import naming_split, open_segmentation_source

    opened = []
    for role, spec, split in (
        ("train", settings.train, settings.train_split),
        ("test", settings.test, settings.test_split),
    ):
        with naming_split(role):
            opened.append(
                open_segmentation_source(
                    spec,
                    split,
                    image_column=settings.image_column,
                    mask_column=settings.mask_column,
                    demo_num_images=demo_split_size(split, settings.max_images),
                    seed=settings.seed,
                )
            )
    train, test = opened
    loaded, image_processor = settings.model.load()  # after the sources: a bad one is refused before the weights load
    result, test_split = evaluate_segmentation(loaded, image_processor, train, test, settings, progress=True)
    if settings.show:
        test_images = subsample_segmentation(test, settings.max_images, settings.seed)
        show_predictions(test_split, test_images, result, settings.show, settings.figure_path)
    return result

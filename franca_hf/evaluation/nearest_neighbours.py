"""k-NN evaluation (DINO protocol) of CLS features at every Matryoshka dim: what `franca-hf knn` runs (`knn`), and
the pieces the trainer's periodic evaluation (`franca_hf.training.knn.KnnEvaluator`) uses.

Features are the models' full-width CLS embeddings, truncated to each nested dim and then L2-normalised; a query's k
nearest training features (cosine similarity) vote for their class with weight exp(similarity / T). Defaults: k = 20,
T = 0.07. Any transformers backbone whose pooler_output is its CLS embedding works (Franca, DINOv2, ...); prefixes
of a model not trained for them are a baseline for the Matryoshka ones.
"""

from dataclasses import dataclass

import torch

from ..data.sources import ImageSource, classes_of, naming_split, open_source, subsample
from ..errors import UsageError
from ..features.loop import embed_batch, run_model
from ..modeling import matryoshka_dim_problem, matryoshka_dims_of, normalized_prefix
from ..modeling.image_processing_franca import make_image_processor
from .settings import KnnSettings


def embed_source(
    model,
    source: ImageSource,
    image_processor,
    batch_size: int = 64,
    indices: list[int] | None = None,
    progress: bool = False,
    num_workers: int | None = 0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width CLS embeddings (n, D) (`franca_hf.features.embed_batch`: the model's Matryoshka embedding, unit
    norm unless `normalize=False`) and labels (n,) of the readable images of `source`.

    `indices` restricts the work to those images (e.g. one process's share); unreadable images are skipped.
    `num_workers` DataLoader workers decode (0: in this process, as the trainer's periodic evaluation does).
    """
    if source.labels is None:
        raise UsageError(f"k-NN needs labels, and {source.name} has none.")
    features, labels = [], []
    batches = run_model(
        model,
        source,
        image_processor,
        lambda model, pixels: embed_batch(model, pixels, normalize=normalize),
        positions=indices,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        desc=f"embed {source.name}",
    )
    for positions, batch in batches:
        features.append(batch.float().cpu())
        labels.append(torch.tensor([source.labels[p] for p in positions], dtype=torch.long))
    if not features:
        return torch.empty(0, model.config.hidden_size), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """(Q,) predicted classes of L2-normalised queries (Q, d) against a normalised memory bank (N, d)."""
    if len(train_features) == 0:
        raise ValueError("The k-NN memory bank is empty.")
    k = min(k, len(train_features))
    predictions = []
    for queries in query_features.split(chunk_size):
        similarity, neighbours = (queries @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_accuracy_by_dim(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    dims: list[int],
    k: int = 20,
    temperature: float = 0.07,
) -> dict[int, float]:
    """Top-1 k-NN accuracy (%) for each prefix length in `dims` (truncate, then L2-normalise)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    accuracy = {}
    for dim in dims:
        train, test = normalized_prefix(train_features, dim), normalized_prefix(test_features, dim)
        predicted = knn_predict(train, train_labels, test, num_classes, k, temperature)
        accuracy[dim] = 100.0 * (predicted == test_labels).float().mean().item()
    return accuracy


def format_knn_table(accuracy: dict[int, float], title: str = "k-NN accuracy", label: str = "top-1 (%)") -> str:
    """A Markdown table of accuracy per Matryoshka dim, in one row named `label`."""
    return format_knn_rows({label: accuracy}, title)


def format_knn_rows(rows: dict[str, dict[int, float]], title: str = "k-NN accuracy") -> str:
    """A Markdown table with one row of accuracy per Matryoshka dim for each entry of `rows` (label -> accuracy),
    e.g. the same model cut as prefixes and in a fitted PCA basis. The dims are those of the first row."""
    dims = list(next(iter(rows.values())))
    lines = [f"| {title} | " + " | ".join(f"dim {d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
    lines += [
        f"| {label} | " + " | ".join(f"{accuracy[d]:.1f}" for d in dims) + " |" for label, accuracy in rows.items()
    ]
    return "\n".join(lines)


@dataclass
class KnnResult:
    """What `knn` measured: top-1 accuracy (%) per dim, the train and test images embedded, how the dims were cut
    ("prefix", or "PCA basis" for a model with a fitted Matryoshka basis), and the k that voted (at most the train
    images)."""

    accuracy: dict[int, float]
    train_images: int
    test_images: int
    truncation: str
    k: int

    def table(self) -> str:
        """The Markdown table of `format_knn_table`, its row named after the truncation."""
        return format_knn_table(self.accuracy, label=f"top-1 (%), {self.truncation}")


def knn(settings: KnnSettings) -> KnnResult:
    """What `franca-hf knn` does: embed `settings.train` and `settings.test` with `settings.model` (`embed_source`)
    and score the k-NN vote at each of `settings.dims` (default: the model's Matryoshka dims, else its width)."""
    dims = list(settings.dims or [])

    def check_request(config) -> None:  # before the weights are read
        for dim in dims:
            problem = matryoshka_dim_problem(dim, range(1, config.hidden_size + 1), "dims")
            if problem:
                raise UsageError(problem, setting="dims")
        if settings.crop_size and settings.crop_size < config.patch_size:
            raise UsageError(
                f"crop_size={settings.crop_size} is smaller than one patch of the model ({config.patch_size} px); give "
                f"at least {config.patch_size}.",
                setting="crop_size",
            )

    with naming_split("train"):
        train = subsample(open_source(settings.train, settings.train_split), settings.max_images)
    with naming_split("test"):
        test = subsample(open_source(settings.test, settings.test_split), settings.max_images)
    sources = classes_of(train, ("test", test))  # before the model loads
    model, processor = settings.model.load(check=check_request)
    dims = dims or matryoshka_dims_of(model.config)
    if settings.crop_size:
        processor = make_image_processor(settings.crop_size)
    splits = []
    splits_named = (("train", settings.train_split), ("test", settings.test_split))
    for (name, split), source in zip(splits_named, sources, strict=True):
        features, labels = embed_source(
            model, source, processor, batch_size=settings.batch_size, progress=True, num_workers=settings.num_workers
        )
        if not len(features):
            raise UsageError(
                f"{name}={source.name} (split {split}): none of its {len(source)} images could be read.", name
            )
        splits.append((features, labels))
    (train_x, train_y), (test_x, test_y) = splits
    k = min(settings.k, len(train_x))  # as `knn_predict` votes
    accuracy = knn_accuracy_by_dim(train_x, train_y, test_x, test_y, dims, k, settings.temperature)
    truncation = "PCA basis" if getattr(model.config, "matryoshka_basis", "prefix") == "pca" else "prefix"
    return KnnResult(accuracy, len(train_x), len(test_x), truncation, k)

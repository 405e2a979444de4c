"""k-NN evaluation (DINO protocol) of CLS features at every Matryoshka dim.

Features are the models' full-width CLS embeddings, truncated to each nested dim and then L2-normalised; a query's k nearest
training features (cosine similarity) vote for their class with weight exp(similarity / T). Defaults: k = 20,
T = 0.07.
"""

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import broadcast_object_list, gather_object

from ..data.sources import ImageSource, open_source, subsample
from ..errors import UsageError
from ..features.loop import embed_batch, run_model
from ..matryoshka import (
    MatryoshkaFit,
    accumulate_token_statistics,
    describe_data,
    minimum_images,
)
from ..modeling import FrancaModel, normalized_prefix
from ..modeling.image_processing_franca import make_image_processor
from .config import PretrainConfig
from .export import teacher_backbone_copy
from .networks import Teacher


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


class KnnEvaluator:
    """Teacher k-NN at every Matryoshka dim on fixed labelled splits, and the PCA truncation basis of the teacher on
    the train split; each process embeds its share."""

    def __init__(self, config: PretrainConfig, width: int):
        settings = config.eval
        self.settings = settings
        self.sources = [
            subsample(
                open_source(spec, split, demo_num_images=config.data.demo_num_images, seed=config.run.seed),
                settings.knn_max_images,
                config.run.seed,
            )
            for spec, split in ((settings.knn_train, "train"), (settings.knn_test, "test"))
        ]
        self.processor = make_image_processor(config.crops.global_size)
        train, needed = self.sources[0], minimum_images(width)
        if settings.fit_pca_on_export and len(train) < needed:
            raise UsageError(
                f"eval.fit_pca_on_export: a PCA basis of this {width}-dim model needs at least {needed} images, and "
                f"the k-NN train split ({settings.knn_train}, eval.knn_max_images={settings.knn_max_images}) holds "
                f"{len(train)}."
            )

    @torch.no_grad()
    def __call__(
        self, accelerator: Accelerator, teacher: Teacher, basis: MatryoshkaFit | None = None
    ) -> dict[str, dict[int, float]] | None:
        """Accuracy per dim of the teacher's CLS cut as prefixes ("prefix") and, given `basis`, in it ("pca"), from
        one pass over each split; on the main process (None on the others under FSDP, where the main process
        evaluates a gathered full copy alone)."""
        if accelerator.distributed_type == DistributedType.FSDP:
            model = teacher_backbone_copy(accelerator, teacher)
            result = None if model is None else self._evaluate(model.to(accelerator.device), 0, 1, basis)
            accelerator.wait_for_everyone()
            return result
        model = accelerator.unwrap_model(teacher).backbone
        return self._evaluate(model, accelerator.process_index, accelerator.num_processes, basis)

    @torch.no_grad()
    def fit_basis(self, accelerator: Accelerator, teacher: Teacher) -> MatryoshkaFit:
        """The teacher's PCA truncation basis on the k-NN train split, on every process: each process accumulates
        the statistics of its share and the shares merge (under FSDP the main process fits a gathered copy alone and
        sends the fit to the others)."""
        train, world = self.sources[0], accelerator.num_processes
        described = f"the k-NN train set, {describe_data(self.settings.knn_train, 'train')}"
        if accelerator.distributed_type == DistributedType.FSDP:
            model = teacher_backbone_copy(accelerator, teacher)
            fit = None
            if model is not None:
                statistics = self._statistics(model.to(accelerator.device), range(len(train)))
                fit = MatryoshkaFit.from_statistics(statistics, described)
            return broadcast_object_list([fit])[0] if world > 1 else fit
        rank = accelerator.process_index
        mine = self._statistics(accelerator.unwrap_model(teacher).backbone, range(rank, len(train), world))
        shares = gather_object([mine]) if world > 1 else [mine]
        statistics = shares[0]
        for share in shares[1:]:
            statistics.merge(share)
        return MatryoshkaFit.from_statistics(statistics, described)

    def _statistics(self, model: FrancaModel, positions: range):
        return accumulate_token_statistics(
            model, self.sources[0], self.processor, positions=list(positions), num_workers=0, progress=False
        ).cpu()

    def _evaluate(
        self, model: FrancaModel, rank: int, world: int, basis: MatryoshkaFit | None
    ) -> dict[str, dict[int, float]]:
        features = []
        for source in self.sources:
            mine = embed_source(
                model, source, self.processor, indices=list(range(rank, len(source), world)), normalize=False
            )
            gathered = gather_object([mine]) if world > 1 else [mine]
            features.append((torch.cat([f for f, _ in gathered]), torch.cat([label for _, label in gathered])))
        (train_x, train_y), (test_x, test_y) = features
        cuts = {"prefix": lambda x: x}  # (the teacher's own cut: a training backbone holds no basis)
        if basis is not None:  # ((z - mean) R), as `with_matryoshka_basis` would cut it
            mean, rotation = basis.cls.mean.float(), basis.cls.rotation.float()
            cuts["pca"] = lambda x: (x - mean) @ rotation
        settings = self.settings
        return {
            name: knn_accuracy_by_dim(
                cut(train_x),
                train_y,
                cut(test_x),
                test_y,
                model.config.matryoshka_dims,
                settings.knn_k,
                settings.knn_temperature,
            )
            for name, cut in cuts.items()
        }

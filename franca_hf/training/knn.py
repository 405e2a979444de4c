"""k-NN evaluation (DINO protocol) of CLS features at every Matryoshka dim.

Features are the final-normed CLS tokens, truncated to each nested dim and then L2-normalised; a query's k nearest
training features (cosine similarity) vote for their class with weight exp(similarity / T). Defaults: k = 20,
T = 0.07.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DECODE_ERRORS, ImageSource, SkipCounter


@torch.no_grad()
def embed_source(
    model,
    source: ImageSource,
    image_processor,
    batch_size: int = 64,
    indices: list[int] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width final-normed CLS features (n, D) and labels (n,) of the readable images of `source`.

    `indices` restricts the work to those images (e.g. one process's share); unreadable images are skipped.
    """
    if source.labels is None:
        raise ValueError(f"k-NN needs labels, and {source.name} has none.")
    indices = list(range(len(source))) if indices is None else indices
    skips = SkipCounter()
    features, labels = [], []
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(indices), batch_size), desc=f"embed {source.name}", disable=not progress):
        images, batch_labels = [], []
        for index in indices[start : start + batch_size]:
            try:
                images.append(source.load(index))
            except DECODE_ERRORS as error:
                skips.record(source.describe(index), error)
                continue
            batch_labels.append(source.labels[index])
        if not images:
            continue
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        parameter = next(model.parameters())
        output = model(pixels.to(parameter.device, parameter.dtype))
        features.append(output.pooler_output.float().cpu())
        labels.append(torch.tensor(batch_labels))
    model.train(was_training)
    width = model.config.hidden_size
    if not features:
        return torch.empty(0, width), torch.empty(0, dtype=torch.long)
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
        train = F.normalize(train_features[:, :dim], dim=-1)
        test = F.normalize(test_features[:, :dim], dim=-1)
        predicted = knn_predict(train, train_labels, test, num_classes, k, temperature)
        accuracy[dim] = 100.0 * (predicted == test_labels).float().mean().item()
    return accuracy


def format_knn_table(accuracy: dict[int, float], title: str = "k-NN accuracy") -> str:
    """A Markdown table of accuracy per Matryoshka dim."""
    lines = [
        f"| {title} | " + " | ".join(f"dim {d}" for d in accuracy) + " |",
        "|---|" + "---|" * len(accuracy),
        "| top-1 (%) | " + " | ".join(f"{a:.1f}" for a in accuracy.values()) + " |",
    ]
    return "\n".join(lines)

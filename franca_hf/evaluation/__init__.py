"""Evaluation of frozen features beyond k-NN, at every Matryoshka dim: linear probing (the official DINOv2/Franca
protocol and its log-regression variant) and dense evaluation (linear segmentation, clustering), raw vs RASA."""

from .linear import (
    LinearReport,
    LinearSettings,
    evaluate_linear,
    format_linear_report,
    probe_inputs,
    train_linear_grids,
)
from .matching import hungarian, match_clusters
from .segmentation import (
    SegmentationResult,
    SegmentationSettings,
    evaluate_segmentation,
    format_segmentation_result,
    show_predictions,
)

__all__ = [
    "LinearReport",
    "LinearSettings",
    "SegmentationResult",
    "SegmentationSettings",
    "evaluate_linear",
    "evaluate_segmentation",
    "format_linear_report",
    "format_segmentation_result",
    "hungarian",
    "match_clusters",
    "probe_inputs",
    "show_predictions",
    "train_linear_grids",
]

"""Evaluation of frozen features at every Matryoshka dim: k-NN (`knn`, the DINO protocol), linear probing (the
official DINOv2/Franca protocol and its log-regression variant) and dense evaluation (linear segmentation,
clustering), raw vs RASA. The settings (`settings`) are cheap to import, like this package: its names load on first
use."""

from ..lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "nearest_neighbours": (
            "KnnResult",
            "embed_source",
            "format_knn_rows",
            "format_knn_table",
            "knn",
            "knn_accuracy_by_dim",
        ),
        "linear": (
            "LinearReport",
            "evaluate_linear",
            "format_linear_report",
            "probe_inputs",
            "run_linear_evaluation",
            "train_linear_grids",
        ),
        "matching": ("hungarian", "match_clusters"),
        "segmentation": (
            "SegmentationResult",
            "evaluate_segmentation",
            "format_segmentation_result",
            "run_segmentation_evaluation",
            "show_predictions",
        ),
        "settings": ("KnnSettings", "LinearSettings", "SegmentationSettings"),
    },
)

__all__ = sorted(__dir__())

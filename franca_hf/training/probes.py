"""Linear probing and dense evaluation of an exported teacher (`eval.linear`, `eval.seg`), as metrics."""

from pathlib import Path

from ..data.sources import open_segmentation_source
from ..evaluation.linear import evaluate_linear
from ..evaluation.segmentation import evaluate_segmentation
from ..evaluation.settings import LinearSettings, SegmentationSettings
from ..features.extraction import load_model_and_processor
from .config import PretrainConfig


def evaluate_export(folder: Path, config: PretrainConfig, device=None) -> dict[str, float]:
    """Metrics of the teacher folder on the k-NN sources, by dim d: `linear_top1_dim_{d}` (test top-1 of the
    classifier chosen on held-out train images), `seg_miou_{variant}_dim_{d}` and
    `cluster_miou_{variant}_k{K}_dim_{d}` (variant raw / debiased), as `eval.linear` and `eval.seg` ask."""
    settings = config.eval
    model, processor = load_model_and_processor(str(folder), device=str(device) if device is not None else None)
    metrics: dict[str, float] = {}
    shared = dict(
        max_images=settings.knn_max_images,
        epochs=settings.probe_epochs,
        batch_size=settings.probe_batch_size,
        seed=config.run.seed,
    )
    if settings.linear:
        linear = LinearSettings(
            train=settings.knn_train, test=settings.knn_test, demo_num_images=config.data.demo_num_images, **shared
        )
        report = evaluate_linear(model, processor, linear, model_name=str(folder))
        metrics.update({f"linear_top1_dim_{d}": top1 for d, top1 in report.test_top1().items()})
    if settings.seg:
        seg = SegmentationSettings(train=settings.knn_train, test=settings.knn_test, **shared)
        sources = [
            open_segmentation_source(spec, split, demo_num_images=config.data.demo_num_images, seed=config.run.seed)
            for spec, split in ((seg.train, seg.train_split), (seg.test, seg.test_split))
        ]
        result, _ = evaluate_segmentation(model, processor, *sources, seg)
        metrics.update({f"seg_miou_{v}_dim_{d}": score for (v, d), score in result.linear.items()})
        metrics.update({f"cluster_miou_{v}_k{k}_dim_{d}": score for (v, d, k), score in result.clustering.items()})
    return metrics

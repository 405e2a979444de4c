"""The evaluation table of a teacher: k-NN, linear probe, log regression, linear segmentation and (over)clustering
mIoU, raw vs RASA-debiased, prefix vs fitted Matryoshka basis, per dim; and the seconds each evaluation took.

The model is evaluated as it is (its fitted basis, when it has one: "pca") and as prefixes (the same weights without
the basis). Sources default to the embedded demo set (classification labels and shape-vs-background masks). The
log regression sweeps every 4th C of the official grid (12 of 45) to keep the run short.

Run (several minutes on 2 shared CPU cores for the demo teacher with RASA):
    franca-hf rasa model=runs/demo/teacher data=demo out=runs/demo/teacher_rasa steps=2 max_images=2000
    python benchmarks/evaluation.py --model runs/demo/teacher_rasa --images 1000 --seg-images 500 --docs docs/evaluation.md
"""

import argparse
import os
import platform
import time

import torch

from franca_hf.data import open_segmentation_source, open_source, subsample, subsample_segmentation
from franca_hf.data.demo import demo_split_size
from franca_hf.evaluation.linear import evaluate_linear
from franca_hf.evaluation.nearest_neighbours import embed_source, knn_accuracy_by_dim
from franca_hf.evaluation.segmentation import evaluate_segmentation
from franca_hf.evaluation.settings import C_VALUES, LinearSettings, SegmentationSettings
from franca_hf.features.extraction import load_model_and_processor
from franca_hf.io import replace_marked_block
from franca_hf.matryoshka import without_matryoshka_basis


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def demo_or(open_function, split: str, args):
    """`open_function(args.data, split)`, generating no more demo images than `args.images` asks."""
    return open_function(args.data, split, demo_num_images=demo_split_size(split, args.images))


def evaluate(model, processor, args) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """Rows {measurement: {dim: value}} and seconds per evaluation for one model."""
    rows, seconds = {}, {}
    dims = model.config.matryoshka_dims

    def knn():
        (train_x, train_y), (test_x, test_y) = (
            embed_source(model, subsample(demo_or(open_source, split, args), args.images), processor, num_workers=0)
            for split in ("train", "test")
        )
        return knn_accuracy_by_dim(train_x, train_y, test_x, test_y, dims)

    rows["k-NN top-1"], seconds["k-NN"] = timed(knn)
    for name, logistic in (("linear probe", False), ("log regression", True)):
        settings = LinearSettings(
            train=args.data,
            test=args.data,
            max_images=args.images,
            epochs=args.epochs,
            logistic=logistic,
            c_values=C_VALUES[::4],
        )
        report, seconds[name] = timed(evaluate_linear, model, processor, settings)
        rows[f"{name} top-1"] = report.test_top1()

    train, test = (
        subsample_segmentation(demo_or(open_segmentation_source, split, args), args.seg_images)
        for split in ("train", "test")
    )
    seg = SegmentationSettings(epochs=args.epochs)
    (result, _), seconds["segmentation + clustering"] = timed(evaluate_segmentation, model, processor, train, test, seg)
    names = {"raw": "raw", "debiased": "RASA"}
    for variant in ("raw", "debiased"):
        if (variant, dims[0]) not in result.linear:
            continue
        rows[f"linear seg mIoU, {names[variant]}"] = {d: result.linear[variant, d] for d in dims}
        for clusters in sorted({k for _, _, k in result.clustering}):
            kind = "clustering" if clusters <= result.num_classes else "overclustering"
            rows[f"{kind} K={clusters} mIoU, {names[variant]}"] = {
                d: result.clustering[variant, d, clusters] for d in dims
            }
    return rows, seconds


def markdown(models: dict[str, tuple[dict, dict]], dims: list[int], args) -> str:
    lines = [
        f"Measured by `benchmarks/evaluation.py` on {platform.machine()} with {os.cpu_count()} CPU cores, torch "
        f"threads {args.threads}: at most {args.images} images per split of `{args.data}` for k-NN, linear probe and "
        f"log regression (classifier or C chosen on 10% of train), {args.seg_images} per split for segmentation "
        f"and clustering (K-means on the test split); {args.epochs} epochs. Top-1 and mIoU in %.",
        "",
        "| measurement | basis | " + " | ".join(f"dim {d}" for d in dims) + " |",
        "|---|---|" + "---:|" * len(dims),
    ]
    for basis, (rows, _) in models.items():
        for name, values in rows.items():
            lines.append(f"| {name} | {basis} | " + " | ".join(f"{values[d]:.1f}" for d in dims) + " |")
    lines += ["", "| evaluation (all dims) | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    names = next(iter(models.values()))[1]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{models[b][1][name]:.1f} s" for b in models) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Franca folder (ideally with RASA weights and a fitted basis)")
    parser.add_argument("--data", default="demo", help="labelled source with masks and train/test splits")
    parser.add_argument("--images", type=int, default=2000, help="per split, for k-NN and linear probing")
    parser.add_argument("--seg-images", type=int, default=1000, help="per split, for segmentation")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--docs", help="write the table into this page's evaluation-benchmark block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model_and_processor(args.model, device="cpu")
    variants = (
        {"fitted": model, "prefix": without_matryoshka_basis(model)} if model.matryoshka_basis is not None else {}
    )
    variants = variants or {"prefix": model}
    models = {basis: evaluate(variant, processor, args) for basis, variant in variants.items()}
    table = markdown(models, model.config.matryoshka_dims, args)
    print(table)
    if args.docs:
        replace_marked_block(args.docs, "evaluation-benchmark", table)


if __name__ == "__main__":
    main()

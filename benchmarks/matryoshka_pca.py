"""Prefix vs PCA truncation of a trained demo teacher, with the package's own commands, CLS and patch tokens.

    franca-hf pretrain --config demo eval.fit_pca_on_export=false run.output_dir=runs/demo_prefix   # a prefix teacher
    python benchmarks/matryoshka_pca.py --teacher runs/demo_prefix/teacher --docs docs/matryoshka.md

1. CLS k-NN (k 20, T 0.07, 2000 demo test images against 2000 demo train images) at every Matryoshka dim, three
   truncations of the same teacher, each measured by `franca-hf knn` on a folder:
   * prefix z[:m]: the teacher as trained (`--teacher`, a folder without a basis);
   * a random orthogonal rotation, then prefix: the teacher with a Haar-random rotation and no mean stored as its
     basis (written by this script, the one row no command makes);
   * PCA: the folder `franca-hf fit-pca --data demo --max-images 2000` writes (the k-NN train images).
2. Patch tokens, prefix vs the patch PCA basis of the same fit: a patch-level k-NN and a linear probe at every dim.
   Each 8 x 8 patch of a 32-px demo image is labelled with the image's class when at least a quarter of its pixels
   belong to the shape (HSV value > 0.5: shapes are drawn at 0.7-0.9, backgrounds at 0.15-0.3), as background (an
   11th class) otherwise; 2000 train images (32,000 patches) are the memory bank / probe training set, 2000 test
   images the queries. Background is most patches, so the score is the balanced accuracy (the mean of the 11
   per-class accuracies; chance 9.1 %). The probe is softmax regression on standardised features with class-balanced
   weights (L-BFGS, 200 iterations).

Commands and tables are printed; `--docs` replaces the blocks between the `matryoshka-pca-...` markers of a page.
About 5 minutes on 2 CPU cores for the 0.8 M-parameter demo ViT (the time of the last run is on the page).
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel

import franca_hf  # noqa: F401  (registers the Auto classes)
from franca_hf.conversion.export import save_model_folder
from franca_hf.data import open_source, subsample
from franca_hf.evaluation.nearest_neighbours import format_knn_rows, knn_predict
from franca_hf.io import portable_path, replace_marked_block
from franca_hf.matryoshka import MatryoshkaFit, PrincipalBasis, with_matryoshka_basis

BACKGROUND = 10  # the demo has classes 0..9


def cli(*arguments: str) -> str:
    """Run `franca-hf ARGUMENTS` in a subprocess, return what it printed (fails loudly)."""
    command = [sys.executable, "-m", "franca_hf.cli", *arguments]
    print("$ franca-hf " + " ".join(arguments), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode:
        raise SystemExit(f"franca-hf {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    print(result.stdout, flush=True)
    return result.stdout


def knn_row(printed: str) -> dict[int, float]:
    """The accuracy per dim of a `franca-hf knn` table."""
    header = next(line for line in printed.splitlines() if line.startswith("| k-NN accuracy |"))
    row = next(line for line in printed.splitlines() if line.startswith("| top-1 (%)"))
    dims = [int(d) for d in re.findall(r"dim (\d+)", header)]
    return dict(zip(dims, [float(v) for v in row.split("|")[2:-1]], strict=True))


def random_rotation_folder(teacher: Path, out: Path, seed: int) -> Path:
    """The teacher with a Haar-random orthogonal rotation (and a zero mean) as its basis: prefixes of randomly
    rotated embeddings."""
    model = AutoModel.from_pretrained(teacher)
    width = model.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    identity = PrincipalBasis(torch.zeros(width), torch.eye(width), torch.ones(width), 0)
    basis = PrincipalBasis(torch.zeros(width, dtype=torch.float64), rotation, torch.ones(width), 0)
    fit = MatryoshkaFit(basis, identity, 0, f"none: a random orthogonal rotation (seed {seed}), zero mean")
    rotated = with_matryoshka_basis(model, fit).eval()
    return save_model_folder(rotated, out, overwrite=True, image_processor=AutoImageProcessor.from_pretrained(teacher))


def patch_labels(pixels: torch.Tensor, labels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, N) labels of the patches of (B, 3, H, W) images in [0, 1]: the image's class where a quarter of the patch
    is shape (HSV value > 0.5), BACKGROUND elsewhere."""
    foreground = (pixels.amax(dim=1, keepdim=True) > 0.5).float()
    share = F.avg_pool2d(foreground, patch).flatten(1)  # (B, N) row-major, as the model's patch tokens
    return torch.where(share >= 0.25, labels[:, None], torch.full_like(share, BACKGROUND, dtype=torch.long))


@torch.no_grad()
def patch_tokens(model, processor, source, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N, D) raw final-normed patch tokens of the first `count` images of `source` and their (n, N) labels."""
    images = [source.load(i) for i in range(count)]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    plain = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 255
    if plain.shape[-2:] != pixels.shape[-2:]:
        raise SystemExit("The patch labels assume the processor keeps the demo's 32-px geometry (resize 32, crop 32).")
    tokens = torch.cat([model(chunk).patch_tokens for chunk in pixels.split(256)])
    labels = torch.tensor([source.labels[i] for i in range(count)])
    return tokens, patch_labels(plain, labels, model.config.patch_size)


def balanced_accuracy(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """Mean over the classes present in `truth` of the share (%) of their samples predicted right."""
    right = torch.zeros(classes).index_add_(0, truth, (predicted == truth).float())
    counts = truth.bincount(minlength=classes).float()
    return 100.0 * (right[counts > 0] / counts[counts > 0]).mean().item()


def linear_probe(train_x, train_y, test_x, classes: int) -> torch.Tensor:
    """Predictions of softmax regression on standardised features, class-balanced loss (full-batch L-BFGS)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    counts = train_y.bincount(minlength=classes).float().clamp_min(1)
    weights = counts.sum() / (classes * counts)
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_y, weight=weights) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return probe(test_x).argmax(1)


def patch_evaluation(teacher: Path, fitted: Path, images: int) -> tuple[dict, str]:
    """{"k-NN" | "linear probe": {"prefix" | "PCA": {dim: balanced accuracy}}} on patch tokens cut by each folder's
    basis, and a sentence on the patches."""
    results = {"k-NN": {}, "linear probe": {}}
    train, test = (subsample(open_source("demo", split), images) for split in ("train", "test"))
    for name, folder in (("prefix", teacher), ("PCA", fitted)):
        model = AutoModel.from_pretrained(folder).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        (train_x, train_y), (test_x, test_y) = (patch_tokens(model, processor, s, images) for s in (train, test))
        train_y, test_y = train_y.flatten(), test_y.flatten()
        for key in results:
            results[key][name] = {}
        for dim in model.config.matryoshka_dims:
            with torch.no_grad():
                bank, queries = (model.matryoshka_cut(x, dim, patches=True).flatten(0, 1) for x in (train_x, test_x))
            classes = BACKGROUND + 1
            predicted = knn_predict(F.normalize(bank, dim=-1), train_y, F.normalize(queries, dim=-1), classes)
            results["k-NN"][name][dim] = balanced_accuracy(predicted, test_y, classes)
            predicted = linear_probe(bank, train_y, queries, classes)
            results["linear probe"][name][dim] = balanced_accuracy(predicted, test_y, classes)
    background = 100.0 * (test_y == BACKGROUND).float().mean().item()
    described = (
        f"Patch labels: 11 classes (10 shapes + background), {len(train_y):,} train and {len(test_y):,} test patches, "
        f"{background:.1f} % of them background; chance 9.1 %."
    )
    return results, described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a trained demo teacher folder without a basis")
    parser.add_argument("--work", default="runs/matryoshka_pca", help="where the PCA and rotated folders go")
    parser.add_argument("--images", type=int, default=2000, help="images per split (k-NN bank, queries, PCA fit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rotation")
    parser.add_argument("--docs", type=Path, help="replace the result blocks of this markdown page")
    args = parser.parse_args()
    teacher, work = Path(args.teacher), Path(args.work)
    if AutoModel.from_pretrained(teacher).config.matryoshka_basis != "prefix":
        raise SystemExit(f"{teacher} already has a basis; give a prefix teacher (eval.fit_pca_on_export=false).")
    started, load = time.time(), os.getloadavg()[0]
    images = str(args.images)
    fitted = work / "pca"
    fit_command = ["fit-pca", "--model", str(teacher), "--data", "demo", "--max-images", images, "--out", str(fitted)]
    printed = cli(*fit_command, "--overwrite")
    rotated = random_rotation_folder(teacher, work / "random_rotation", args.seed)
    knn = ["--train", "demo", "--test", "demo", "--max-images", images]
    cls = {
        "prefix z[:m]": knn_row(cli("knn", "--model", str(teacher), *knn)),
        "a random orthogonal rotation, then prefix": knn_row(cli("knn", "--model", str(rotated), *knn)),
        f"PCA fitted on the {images} train images (`fit-pca`), then prefix": knn_row(
            cli("knn", "--model", str(fitted), *knn)
        ),
    }
    patches, described = patch_evaluation(teacher, fitted, args.images)
    minutes = (time.time() - started) / 60
    measured = (
        f"Measured by `python benchmarks/matryoshka_pca.py --teacher {portable_path(teacher, '<teacher>')}` "
        f"({os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {minutes:.1f} minutes, load average {load:.1f} at the start)."
    )
    cls_block = "\n\n".join([format_knn_rows(cls, "CLS k-NN top-1 (%)"), measured])
    patch_block = "\n\n".join(
        [format_knn_rows(rows, f"patch {kind}, balanced accuracy (%)") for kind, rows in patches.items()]
        + [f"{described} {measured}"]
    )
    shown = {str(teacher): portable_path(teacher, "<teacher>"), str(fitted): portable_path(fitted, "<work>/pca")}
    fit_block = "```\n$ franca-hf " + " ".join(shown.get(part, part) for part in fit_command) + "\n"
    fit_block += printed.strip().replace(str(fitted), shown[str(fitted)]) + "\n```"
    print(cls_block + "\n\n" + patch_block)
    if args.docs:
        replace_marked_block(args.docs, "matryoshka-pca-fit", fit_block)
        replace_marked_block(args.docs, "matryoshka-pca-cls", cls_block)
        replace_marked_block(args.docs, "matryoshka-pca-patches", patch_block)
        print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()

"""Nested heads ablation: dedicated heads on backbone prefixes (paper) vs one shared MRL head vs learned projections
(official code) vs a single un-nested head, same data, steps and seeds, each cut as prefixes and in a fitted PCA basis.

    python benchmarks/ablation_heads.py                    # the default CPU scale: writes docs/ablation_heads.md
    python benchmarks/ablation_heads.py --scale smoke      # a few steps, to check the pipeline (writes no docs)
    python benchmarks/ablation_heads.py --scale gpu        # a larger model and budget for one GPU (writes no docs)

The time of the last run of the default scale is in docs/ablation_heads.md; a run that finds a run folder with
checkpoints resumes it (the trainer resumes), and the page says which runs were resumed. Every run is `franca_hf.training.pretrain` with the demo recipe and
`heads.mode` changed; runs go two at a time on one thread each (what uses 2 cores best). The script first runs the
pilot (a supervised run of the same backbone and budget, next to the DINO runs' initial and final k-NN), then the
ablation, and writes the tables, the plot and the measured facts to `docs/ablation_heads.md` (only at the default
scale, or wherever `--docs PATH` says). Teacher k-NN (k = 20, T = 0.07) is measured at every Matryoshka dim D/16 ... D
with two truncations of the same teacher: the CLS prefix z[:m], and the first m coordinates in the PCA basis the
trainer fits on the k-NN train split when it exports the teacher (`eval.fit_pca_on_export`, `franca_hf.matryoshka`),
each L2-normalised after the cut.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from franca_hf import FrancaModel
from franca_hf.data import open_source, subsample
from franca_hf.data.augmented import AugmentedImages, EpochBatchSampler
from franca_hf.evaluation.nearest_neighbours import embed_source, knn_accuracy_by_dim
from franca_hf.io import portable_path, write_file_atomically
from franca_hf.modeling.image_processing_franca import make_image_processor
from franca_hf.training.checkpoints import find_latest_checkpoint
from franca_hf.training.config import load_config
from franca_hf.training.networks import backbone_config, build_networks
from franca_hf.training.pipeline import make_augmentation


def modes(width: int) -> dict[str, list[str]]:
    """The compared head layouts as config overrides, for a backbone of width D = `width`."""
    return {
        "slice": ["heads.mode=slice"],  # paper: level l sees the backbone prefix z[:m_l]
        "shared": ["heads.mode=shared"],  # standard MRL: one head whose weights are sliced per level
        "project": ["heads.mode=project"],  # official code: level l sees a learned projection of the full z
        "single": ["heads.mode=slice", f"heads.nesting_dims=[{width}]"],  # one un-nested head on the full CLS
    }


DOCS_PAGE = "docs/ablation_heads.md"  # the report of the default scale
SCALES = {
    # steps, seeds, images in the k-NN memory bank, extra overrides
    "default": (600, 3, 2000, []),
    "smoke": (4, 1, 200, ["data.demo_num_images=200", "optim.warmup_steps=1"]),  # a PCA basis needs D + 1 images
    # A ViT-S-width model, 4 runs at a time on one GPU with 3 augmentation workers each (16 cores); sized by estimate
    # for about 15 minutes, never run (no GPU was lent to this project's sessions so far).
    "gpu": (
        1500,
        3,
        5000,
        [
            "model.hidden_size=384",
            "model.num_attention_heads=6",
            "model.num_hidden_layers=6",
            "optim.batch_size_per_device=128",
            "data.num_workers=3",
            "data.demo_num_images=20000",
            "run.mixed_precision=bf16",
        ],
    ),
}


def scale_config(scale: str):
    """The demo recipe with the scale's overrides (model size, batch, data)."""
    return load_config("demo", SCALES[scale][3])


TRUNCATIONS = {"prefix": "knn_final", "PCA": "knn_final_pca"}  # truncation -> summary key of its final k-NN


def run_pretraining(name: str, overrides: list[str], out: Path, threads: int) -> dict:
    """One `franca_hf.training.pretrain` run in a subprocess (the teacher's PCA basis fitted at export); returns its
    summary plus seconds per step."""
    folder = out / name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [
        sys.executable,
        "-m",
        "franca_hf.cli",
        "pretrain",
        "--config",
        "demo",
        f"run.output_dir={folder}",
        "run.log_with=null",
        "run.log_every=10",
        "eval.knn_every=null",
        "eval.fit_pca_on_export=true",
        *overrides,
    ]
    latest = find_latest_checkpoint(folder / "checkpoints")
    resumed_from = json.loads((latest / "train_state.json").read_text())["step"] if latest else 0
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    speeds = [json.loads(line).get("images_per_second") for line in (folder / "metrics.jsonl").read_text().splitlines()]
    speeds = [s for s in speeds if s]
    summary["wall_seconds"] = time.time() - started
    summary["resumed_from_step"] = resumed_from
    summary["images_per_second"] = statistics.median(speeds) if speeds else math.nan
    return summary


def head_parameters(overrides: list[str]) -> int:
    """Parameters of the student's DINO and iBOT heads under these overrides."""
    student, _ = build_networks(load_config("demo", overrides))
    return sum(p.numel() for head in (student.dino_head, student.ibot_head) for p in head.parameters())


class FirstGlobalCrop:
    """The first global crop of the multi-crop augmentation: the supervised pilot's input."""

    def __init__(self, augment):
        self.augment = augment

    def __call__(self, image):
        return self.augment(image)["global_crops"][0]


class LabelledCrops(Dataset):
    """`(crop, label)` of an `AugmentedImages` set, keyed by `(index, epoch)` as `EpochBatchSampler` yields them."""

    def __init__(self, images: AugmentedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        return self.images[key][0], self.images.source.labels[key[0]]


def supervised_pilot(overrides: list[str], steps: int, bank: int, threads: int) -> dict[str, dict]:
    """The same backbone and budget trained with labels (cross-entropy on a linear classifier over the CLS token),
    from the same initialisation: k-NN before and after, to show the scale can learn at all."""
    torch.set_num_threads(threads)
    config = load_config("demo", overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(config.run.seed)
    backbone = FrancaModel(backbone_config(config))
    classifier = torch.nn.Linear(backbone.config.hidden_size, 10)
    backbone.to(device), classifier.to(device)
    source = open_source("demo", "train", demo_num_images=config.data.demo_num_images, seed=config.run.seed)
    processor = make_image_processor(config.crops.global_size, config.crops.global_size)
    knn_sources = [
        subsample(open_source("demo", split, demo_num_images=config.data.demo_num_images), bank)
        for split in ("train", "test")
    ]

    def knn() -> dict[int, float]:
        (tx, ty), (qx, qy) = (embed_source(backbone, s, processor) for s in knn_sources)
        accuracy = knn_accuracy_by_dim(tx, ty, qx, qy, backbone.config.matryoshka_dims)
        return {str(dim): value for dim, value in accuracy.items()}  # the keys of the runs' summary.json

    before = knn()
    images = AugmentedImages(source, FirstGlobalCrop(make_augmentation(config)), seed=config.run.seed)
    sampler = EpochBatchSampler(len(source), config.optim.batch_size_per_device, seed=config.run.seed)
    loader = DataLoader(LabelledCrops(images), batch_sampler=sampler, num_workers=config.data.num_workers)
    parameters = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.04)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    backbone.train()
    step = 0
    while step < steps:
        sampler.start(step // sampler.batches_per_epoch, 0)
        for pixels, labels in loader:
            pixels, labels = pixels.to(device), labels.to(device)
            loss = F.cross_entropy(classifier(backbone(pixels).pooler_output), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
    backbone.eval()
    return {"knn_at_init": before, "knn_final": knn()}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_report(
    path: Path,
    scale: str,
    steps: int,
    seeds: int,
    pilot: dict,
    results: dict,
    parameters: dict,
    command: str,
    machine: str,
) -> None:
    dims = list(next(iter(results.values()))[0]["knn_final"])
    config = scale_config(scale)
    model, batch = backbone_config(config), config.optim.batch_size_per_device
    width = model.hidden_size
    backbone_parameters = sum(p.numel() for p in FrancaModel(model).parameters())
    bank = SCALES[scale][2]
    lines = [
        "# Nested heads: dedicated vs shared vs learned projections, cut as prefixes or in a fitted PCA basis",
        "",
        "Produced by `"
        + command
        + "` ("
        + machine
        + "). Do not edit the numbers by hand: rerun the command."
        + resumed_note(results, steps),
        "",
        "## The question",
        "",
        "Franca's Matryoshka embeddings are prefixes z[:m] of the backbone output, yet the paper gives every prefix its "
        "own head and prototypes, standard MRL would share one head across prefixes, and the official code feeds "
        "every level a learned projection of the full vector (so its backbone prefixes are never trained as such). "
        "Here the same small model is pretrained with each layout on the same data, steps and seeds, and its "
        "teacher's CLS embedding is evaluated by k-NN at every nested dim, cut in two ways: as the prefix z[:m], and "
        "as the first m coordinates in a PCA basis fitted on the k-NN train split (what `franca-hf fit-pca` and "
        "`eval.fit_pca_on_export` store in a model, see docs/matryoshka.md). The second question: do nested heads "
        "buy anything at small dims over PCA of an un-nested model (`single` + PCA)?",
        "",
        "| mode | what each nesting level sees | head parameters (DINO + iBOT) |",
        "|---|---|---|",
        f"| slice | its own MLP + prototypes on the backbone prefix z[:m] (paper) | {parameters['slice']:,} |",
        f"| shared | one MLP + prototype set, sliced per level (standard MRL) | {parameters['shared']:,} |",
        f"| project | its own Linear(D, m) on the full z, then its own MLP + prototypes (official code) | "
        f"{parameters['project']:,} |",
        f"| single | one head on the full z, no nesting (DINOv2-style baseline) | {parameters['single']:,} |",
        "",
        f"Scale `{scale}`: the demo recipe (`franca_hf/training/configs/demo.yaml`) with a ViT of patch "
        f"{model.patch_size}, D = {width}, {model.num_hidden_layers} blocks ({backbone_parameters / 1e6:.1f} M "
        f"parameters), {config.crops.global_size}-px demo shapes ({config.data.demo_num_images} training images), "
        f"batch {batch}, DINO + iBOT + KoLeo, for {steps} steps, {seeds} seed(s) per mode. k-NN: {bank} demo train "
        f"images as the memory bank (and the PCA fit), {bank} demo test images as queries.",
        "",
        "## Pilot: does this scale learn?",
        "",
        f"| run | k-NN at init (dim {width}) | k-NN after (dim {width}) | gain |",
        "|---|---|---|---|",
    ]
    gains = []
    for name, summary in pilot.items():
        before, after = summary["knn_at_init"][dims[-1]], summary["knn_final"][dims[-1]]
        gains.append(after - before)
        lines.append(f"| {name} | {before:.1f} | {after:.1f} | {after - before:+.1f} |")
    learns = min(gains) >= 10
    lines += [
        "",
        "Both runs gain at least 10 points: learning is real at this scale."
        if learns
        else "At least one run gains less than 10 points: this scale does not show learning, and the comparison "
        "below is not evidence either way.",
    ]
    stats = {
        (mode, truncation, dim): mean_std([run[key][dim] for run in runs])
        for mode, runs in results.items()
        for truncation, key in TRUNCATIONS.items()
        for dim in dims
    }
    lines += [
        "",
        "## Teacher k-NN top-1 (%) per Matryoshka dim, mean ± std over seeds",
        "",
        "| mode | truncation | " + " | ".join(f"dim {d}" for d in dims) + " | s / step | images / s |",
        "|---|---|" + "---|" * (len(dims) + 2),
    ]
    for mode, runs in results.items():
        speed = statistics.mean(run["images_per_second"] for run in runs)
        for truncation in TRUNCATIONS:
            cells = ["{:.1f} ± {:.1f}".format(*stats[mode, truncation, dim]) for dim in dims]
            timing = f" {batch / speed:.2f} | {speed:.0f} |" if truncation == "prefix" else " | |"
            lines.append(f"| {mode} | {truncation} | " + " | ".join(cells) + " |" + timing)
    lines += [
        "",
        "Differences in points, with the seed noise: a difference counts as real when it exceeds twice its standard "
        "error sqrt(s1²/n + s2²/n).",
        "",
        "Against `project` (the official layout), prefixes:",
        "",
        *difference_table(stats, [(mode, "prefix") for mode in results], ("project", "prefix"), dims, seeds, False),
        "",
        "Against `single` + PCA (an un-nested model cut in a fitted basis):",
        "",
        *difference_table(stats, [(m, t) for m in results for t in TRUNCATIONS], ("single", "PCA"), dims, seeds, True),
        "",
        "Training speed (s / step, images / s) is measured by the trainer over its logging windows, one thread "
        "per run with two runs side by side; the PCA rows are the same runs.",
        "",
        "![k-NN accuracy per Matryoshka dim, head layout and truncation](ablation_heads.png)",
        "",
        "## Answer",
        "",
        answer(stats, dims, seeds, parameters) if learns else "No answer: the pilot shows no learning.",
        "",
        "## Limits",
        "",
        f"One small scale: a {backbone_parameters / 1e6:.1f} M-parameter ViT, {config.crops.global_size}-px synthetic "
        f"shapes with 10 classes, {steps} steps; "
        "the real question is about ViT-B/L/g on ImageNet-21K or LAION over 625K steps with 131K prototypes. "
        "The demo recipe itself departs from Franca's at this scale (see docs/pretraining.md). k-NN on "
        "10 balanced classes saturates near the top, which compresses differences at large dims. The PCA basis is "
        "fitted on the same images that form the k-NN memory bank (as a user fits it on their own collection); the "
        "queries are other images.",
        "",
    ]
    write_file_atomically(path, lambda staging: staging.write_text("\n".join(lines)))


def resumed_note(results: dict, steps: int) -> str:
    """A sentence naming the runs this invocation resumed from an interrupted one's checkpoints (none: empty)."""
    resumed = [
        f"{mode} seed {seed} from step {run['resumed_from_step']}"
        for mode, runs in results.items()
        for seed, run in enumerate(runs)
        if run.get("resumed_from_step")
    ]
    if not resumed:
        return ""
    complete = sum(run.get("resumed_from_step") == steps for runs in results.values() for run in runs)
    return (
        f" It resumed {len(resumed)} runs from the checkpoints of an interrupted invocation ({', '.join(resumed)};"
        f" {complete} of them were complete and only exported and evaluated their teachers again), so its time"
        " counts what this invocation ran."
    )


def difference_table(
    stats: dict, rows: list[tuple[str, str]], baseline: tuple[str, str], dims: list[str], seeds: int, truncations: bool
) -> list[str]:
    """Markdown rows of each (mode, truncation) minus `baseline` per dim, with the seed noise; the baseline's own row
    is left out, the truncation column only with `truncations`."""
    head = "| mode | truncation | " if truncations else "| mode | "
    lines = [head + " | ".join(f"dim {d}" for d in dims) + " |", "|---|" + "---|" * (len(dims) + truncations)]
    for mode, truncation in rows:
        if (mode, truncation) != baseline:
            cells = [said(stats, (mode, truncation), baseline, dim, seeds, short=True) for dim in dims]
            label = f"| {mode} | {truncation} | " if truncations else f"| {mode} | "
            lines.append(label + " | ".join(cells) + " |")
    return lines


def compare(stats: dict, first: tuple[str, str], second: tuple[str, str], dim: str, seeds: int) -> tuple[float, bool]:
    """(mean difference first - second, whether it exceeds twice its standard error); first and second are
    (mode, truncation) pairs."""
    (m1, s1), (m2, s2) = stats[(*first, dim)], stats[(*second, dim)]
    return m1 - m2, seeds > 1 and abs(m1 - m2) > 2 * math.sqrt((s1**2 + s2**2) / seeds)


def said(stats: dict, first: tuple[str, str], second: tuple[str, str], dim: str, seeds: int, short=False) -> str:
    """A difference in words: "+1.2 points (beyond seed noise)", or "+1.2 (real)" for tables."""
    difference, real = compare(stats, first, second, dim, seeds)
    if short:
        return f"{difference:+.1f} ({'real' if real else 'noise'})"
    return f"{difference:+.1f} points ({'beyond' if real else 'within'} seed noise)"


def answer(stats: dict, dims: list[str], seeds: int, parameters: dict) -> str:
    """Plain words, derived from the measured means, spreads and parameter counts only."""
    if seeds < 2:
        return "One seed only: no conclusion (rerun with --seeds 3 or more)."

    def cut(mode: str, dim: str, truncation: str = "prefix") -> str:
        return said(stats, (mode, truncation), ("project", truncation), dim, seeds)

    small, full = dims[0], dims[-1]
    lines = [
        f"*Small prefixes.* At dim {small}, dedicated heads on prefixes (`slice`) differ from the official projections "
        f"(`project`) by {cut('slice', small)} and one shared MRL head by {cut('shared', small)}."
        " Only the prefix-fed layouts train the backbone's first channels as an embedding of their own.",
        f"*Full width.* The un-nested single head differs from `project` by {cut('single', full)} at dim {full}: "
        + (
            "at this scale nesting costs full-width accuracy."
            if compare(stats, ("single", "prefix"), ("project", "prefix"), full, seeds)[1]
            and compare(stats, ("single", "prefix"), ("project", "prefix"), full, seeds)[0] > 0
            else "at this scale nesting costs no measurable full-width accuracy."
        ),
        "*Dedicated vs shared heads on nested prefixes.* `shared` minus `slice`: "
        + ", ".join(f"dim {d}: {said(stats, ('shared', 'prefix'), ('slice', 'prefix'), d, seeds)}" for d in dims)
        + f". `shared` has {parameters['shared']:,} head parameters against {parameters['slice']:,} for `slice` "
        f"({parameters['slice'] / parameters['shared']:.1f}x).",
    ]
    versus_slice = {d: compare(stats, ("shared", "prefix"), ("slice", "prefix"), d, seeds) for d in dims}
    worse = [d for d, (difference, real) in versus_slice.items() if real and difference < 0]
    better = [d for d, (difference, real) in versus_slice.items() if real and difference > 0]
    if not worse and not better:
        lines.append(
            "So here one shared head is as good as dedicated heads at every dim, within seed noise, for a "
            "fraction of the head parameters."
        )
    else:
        found = [f"worse at dims {', '.join(worse)}"] * bool(worse) + [f"better at dims {', '.join(better)}"] * bool(
            better
        )
        lines.append(
            f"So here one shared head is {' and '.join(found)} than dedicated heads, within seed noise elsewhere."
        )
    lines.append(pca_answer(stats, dims, seeds))
    return "\n\n".join(lines)


def pca_answer(stats: dict, dims: list[str], seeds: int) -> str:
    """Do nested heads buy anything at small dims (D/16, D/8) over `single` + PCA? Each nested layout is taken with
    its better truncation at each dim."""
    baseline = ("single", "PCA")
    small = dims[:2]
    text = ["*Nested heads vs PCA of an un-nested model.*"]
    gains, losses = [], []
    for mode in ("slice", "shared", "project"):
        parts = []
        for dim in small:
            best = max(TRUNCATIONS, key=lambda truncation: stats[mode, truncation, dim][0])
            difference, real = compare(stats, (mode, best), baseline, dim, seeds)
            parts.append(f"dim {dim} ({best}): {said(stats, (mode, best), baseline, dim, seeds)}")
            if real:
                (gains if difference > 0 else losses).append(f"`{mode}` at dim {dim}")
        text.append(f"`{mode}` minus `single` + PCA, " + ", ".join(parts) + ".")
    pca_gain = [f"dim {d}: {said(stats, ('single', 'PCA'), ('single', 'prefix'), d, seeds)}" for d in dims[:-1]]
    text.append("For `single`, PCA minus prefix: " + ", ".join(pca_gain) + ".")
    if gains:
        verdict = (
            f"So yes, here nested heads buy something at small dims over `single` + PCA: {', '.join(gains)} beat it "
            "beyond seed noise" + (f" (while {', '.join(losses)} fall below it)" if losses else "") + "."
        )
    elif losses:
        verdict = (
            f"So no: here nested heads buy nothing at small dims over `single` + PCA; {', '.join(losses)} are worse "
            "beyond seed noise, and the rest are within it."
        )
    else:
        verdict = (
            "So no: here nested heads buy nothing measurable at small dims over `single` + PCA; every difference is "
            "within seed noise."
        )
    return " ".join(text) + "\n\n" + verdict


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for index, (mode, runs) in enumerate(results.items()):
        dims = [int(d) for d in runs[0]["knn_final"]]
        for truncation, key in TRUNCATIONS.items():
            values = [[run[key][str(d)] for run in runs] for d in dims]
            means = [statistics.mean(v) for v in values]
            spread = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
            axis.errorbar(
                dims,
                means,
                yerr=spread,
                marker="o" if truncation == "prefix" else "s",
                linestyle="-" if truncation == "prefix" else "--",
                color=f"C{index}",
                capsize=3,
                label=f"{mode}, {truncation}",
            )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("Matryoshka dim m")
    axis.set_ylabel("teacher k-NN top-1 (%)")
    axis.legend(fontsize=8, ncol=2)
    axis.grid(alpha=0.3)
    fig.tight_layout()
    write_file_atomically(path, lambda staging: fig.savefig(staging, dpi=120, format="png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=list(SCALES), default="default")
    parser.add_argument("--seeds", type=int, help="seeds per mode (default: the scale's)")
    parser.add_argument("--steps", type=int, help="steps per run (default: the scale's)")
    parser.add_argument("--out", default="runs/ablation_heads", help="where the runs go")
    parser.add_argument(
        "--docs", help=f"report to write (default: {DOCS_PAGE} at the default scale, none at the others; '' for none)"
    )
    parser.add_argument("--parallel", type=int, help="runs at a time (default: 2, or 4 at the gpu scale)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from <out>/ablation.json")
    args = parser.parse_args()
    if args.report_only:
        summary = json.loads((Path(args.out) / "ablation.json").read_text())
        docs = report_path(args.docs, summary["scale"])
        if docs is None:
            parser.error(f"--report-only of a {summary['scale']!r} run needs --docs PATH")
        write_outputs(
            docs,
            summary,
            summary.get("command", "python benchmarks/ablation_heads.py"),
            summary.get("machine", ""),
        )
        return
    steps, seeds, bank, extra = SCALES[args.scale]
    steps, seeds = args.steps or steps, args.seeds or seeds
    out = Path(args.out)
    common = [f"optim.total_steps={steps}", f"eval.knn_max_images={bank}", *extra]
    args.parallel = args.parallel or (4 if args.scale == "gpu" else 2)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    compared = modes(scale_config(args.scale).model.hidden_size)
    jobs = [(mode, seed) for seed in range(seeds) for mode in compared]
    started, load_at_start = time.time(), os.getloadavg()[0]
    with ThreadPoolExecutor(args.parallel) as pool:
        pilot_future = pool.submit(supervised_pilot, common, steps, bank, threads)
        futures = {
            job: pool.submit(
                run_pretraining,
                f"{job[0]}_seed{job[1]}",
                [*common, *compared[job[0]], f"run.seed={job[1]}"],
                out,
                threads,
            )
            for job in jobs
        }
        results = {mode: [futures[mode, seed].result() for seed in range(seeds)] for mode in compared}
        pilot = {
            "supervised (labels, same backbone and steps)": pilot_future.result(),
            "DINO (project heads, seed 0)": results["project"][0],
        }
    parameters = {mode: head_parameters([*common, *overrides]) for mode, overrides in compared.items()}
    shown = [portable_path(part, "<runs folder>") if os.path.isabs(part) else part for part in sys.argv[1:]]
    command = " ".join(["python benchmarks/ablation_heads.py", *shown])
    minutes = (time.time() - started) / 60
    machine = (
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {minutes:.0f} minutes, {args.parallel} runs at a time; "
        f"load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs share the cores)"
    )
    summary = {
        "scale": args.scale,
        "steps": steps,
        "seeds": seeds,
        "minutes": minutes,
        "command": command,
        "machine": machine,
        "pilot": pilot,
        "results": results,
        "head_parameters": parameters,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out / "ablation.json", lambda staging: staging.write_text(json.dumps(summary, indent=2)))
    means = {
        f"{mode}, {truncation}": {d: round(statistics.mean(r[key][d] for r in runs), 1) for d in runs[0][key]}
        for mode, runs in results.items()
        for truncation, key in TRUNCATIONS.items()
    }
    print(json.dumps(means, indent=1))
    docs = report_path(args.docs, args.scale)
    if docs is not None:
        write_outputs(docs, summary, command, machine)


def report_path(docs: str | None, scale: str) -> Path | None:
    """Where the report goes: `--docs` when given ('' for nowhere), else the docs page for the default scale only
    (a smoke or GPU run must not replace its numbers)."""
    if docs is None:
        return Path(DOCS_PAGE) if scale == "default" else None
    return Path(docs) if docs else None


def write_outputs(docs: Path, summary: dict, command: str, machine: str) -> None:
    write_report(
        docs,
        summary["scale"],
        summary["steps"],
        summary["seeds"],
        summary["pilot"],
        summary["results"],
        summary["head_parameters"],
        command,
        machine,
    )
    plot(docs.with_suffix(".png"), summary["results"])
    print(f"wrote {docs}")


if __name__ == "__main__":
    main()

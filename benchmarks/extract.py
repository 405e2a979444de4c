"""`franca-hf extract` vs a `pipeline("image-feature-extraction")` loop: images/s and peak memory, fp32 and int8;
and what int8 costs on real features.

Speed (default): the same model and the same JPEG files, in ONE process, interleaved over `--rounds` rounds
(these machines are noisy); medians. `franca-hf extract` is `extract_to_folder` (DataLoader workers decode and
preprocess, shards written as it goes); the baseline is what a transformers user writes:
`pipeline("image-feature-extraction", model=model, image_processor=processor)(paths, batch_size=B, pool=True,
return_tensors=True)`, given as many DataLoader workers (`--workers`) so that the ratio is not only about decoding.
int8 is `franca_hf.features.quantize_int8` (PyTorch dynamic quantisation of the Linear layers) for both. Peak
memory: the highest resident set of this process (plus the unique set of its DataLoader workers) during a run,
minus before it.
The model is a random-weight ViT-B/14 at 224 px unless `--model` names a folder.

Quality (`--quality TEACHER`): k-NN accuracy (k = 20, T = 0.07) of the teacher's CLS features on the demo data at
every Matryoshka dim, fp32 vs int8, and the cosine between each image's int8 and fp32 full-width embeddings.

Run (about 5 minutes on 2 CPU cores):
    python benchmarks/extract.py --images 32 --rounds 3
    python benchmarks/extract.py --quality runs/demo/teacher --max-images 2000
    python benchmarks/extract.py --torchao --rounds 5     # why --int8 uses torch's quantisation (pip install torchao)
"""

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from PIL import Image
from recording import add_docs_flag, recorded
from transformers import AutoImageProcessor, AutoModel, pipeline

from franca_hf import FrancaConfig, FrancaModel
from franca_hf.data import files_source, open_source, subsample
from franca_hf.evaluation.nearest_neighbours import embed_source, format_knn_table, knn_accuracy_by_dim
from franca_hf.features import (
    ExtractionRecord,
    default_num_workers,
    extract_to_folder,
    load_model_and_processor,
    quantize_int8,
)
from franca_hf.io import portable_path
from franca_hf.modeling.image_processing_franca import make_image_processor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


class PeakMemory:
    """Samples the resident set of this process plus the unique set of its children (a forked DataLoader worker
    shares most of its pages with this process) every 10 ms; `growth` is the peak minus the start, in MiB."""

    def __init__(self):
        self.process = psutil.Process()

    def _rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_full_info().uss
            except psutil.NoSuchProcess:
                pass
        return total

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.growth = (self.peak - self.start) / 2**20


def write_images(folder: Path, count: int) -> list[str]:
    """`count` JPEG files (640 x 480 crops of the example photos, quality 90): real decoding work."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*.jpg"))]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)].resize((800, 600))
        left, top = (i * 7) % 160, (i * 5) % 120
        path = folder / f"{i:05d}.jpg"
        photo.crop((left, top, left + 640, top + 480)).save(path, quality=90)
        paths.append(str(path))
    return paths


def run_extract(model, processor, paths, work: Path, batch: int, workers: int, record) -> None:
    out = work / "extract_out"
    extract_to_folder(
        model, processor, files_source(paths), out, record, batch_size=batch, num_workers=workers, progress=False
    )
    shutil.rmtree(out)


def run_pipeline(model, processor, paths, batch: int, workers: int) -> torch.Tensor:
    extractor = pipeline("image-feature-extraction", model=model, image_processor=processor, device="cpu")
    outputs = extractor(paths, batch_size=batch, num_workers=workers, pool=True, return_tensors=True)
    return torch.cat(list(outputs))


def speed(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    try:
        if args.model:
            model = AutoModel.from_pretrained(args.model).eval()
            processor = AutoImageProcessor.from_pretrained(args.model)
            name = args.model
        else:
            (model, name), processor = random_vit_b(), make_image_processor(224)
        models = {"fp32": model, "int8": quantize_int8(model)}
        paths = write_images(work / "images", args.images)
        record = ExtractionRecord(
            model=name,
            sources=[str(work / "images")],
            split="train",
            kind="cls",
            dim=model.config.hidden_size,
            normalized=True,
            dtype="float32",
            matryoshka_dims=model.config.matryoshka_dims,
        )
        workers = default_num_workers() if args.workers is None else args.workers
        methods = {
            "franca-hf extract": lambda m, p=paths: run_extract(m, processor, p, work, args.batch, workers, record),
            "pipeline loop": lambda m, p=paths: run_pipeline(m, processor, p, args.batch, workers),
        }
        print(
            f"{portable_path(name, '<model folder>')}; {args.images} JPEGs of 640x480; batch {args.batch}; {workers} DataLoader workers; torch "
            f"{torch.__version__} on {torch.get_num_threads()} threads, {psutil.cpu_count()} CPU cores, load average "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for method in methods.values():  # warm-up on one batch: first-call costs (thread pools, kernels)
            for variant in models.values():
                method(variant, paths[: args.batch])
        times = {(m, d): [] for m in methods for d in models}
        memory = {(m, d): [] for m in methods for d in models}
        for round_index in range(args.rounds):
            for method_name, method in methods.items():
                for dtype, variant in models.items():
                    with PeakMemory() as peak:
                        started = time.perf_counter()
                        method(variant)
                        times[method_name, dtype].append(time.perf_counter() - started)
                    memory[method_name, dtype].append(peak.growth)
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {key: args.images / statistics.median(values) for key, values in times.items()}
    ratio = {  # per round, then the median: both sides of a ratio ran in the same round
        key: statistics.median(a / b for a, b in zip(times[key[0]], times[key[1]], strict=True))
        for key in [
            (("pipeline loop", "fp32"), ("franca-hf extract", "fp32")),
            (("pipeline loop", "int8"), ("franca-hf extract", "int8")),
            (("franca-hf extract", "fp32"), ("franca-hf extract", "int8")),
            (("pipeline loop", "fp32"), ("pipeline loop", "int8")),
        ]
    }
    lines = [
        "| | fp32 images/s | int8 images/s | int8 speed-up | peak memory growth fp32 / int8 (MiB) |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        lines.append(
            f"| {method} | {rate[method, 'fp32']:.2f} | {rate[method, 'int8']:.2f} | "
            f"{ratio[(method, 'fp32'), (method, 'int8')]:.2f}x | "
            f"{statistics.median(memory[method, 'fp32']):.0f} / {statistics.median(memory[method, 'int8']):.0f} |"
        )
    lines.append(
        f"| **extract / pipeline** | **{ratio[('pipeline loop', 'fp32'), ('franca-hf extract', 'fp32')]:.2f}x** | "
        f"**{ratio[('pipeline loop', 'int8'), ('franca-hf extract', 'int8')]:.2f}x** | | |"
    )
    print(f"median over {args.rounds} interleaved rounds:")
    print("\n".join(lines))


def quality(args) -> None:
    model, processor = load_model_and_processor(args.quality, device="cpu")
    int8 = quantize_int8(model)
    features, splits = {}, ("train", "test")
    for split in splits:
        source = subsample(open_source("demo", split), args.max_images)
        for dtype, variant in (("fp32", model), ("int8", int8)):
            features[dtype, split] = embed_source(variant, source, processor, batch_size=args.batch * 8, num_workers=0)
    dims = model.config.matryoshka_dims
    print(
        f"k-NN (k=20, T=0.07) of {portable_path(args.quality, '<model folder>')}: {len(features['fp32', 'train'][0])} demo train / "
        f"{len(features['fp32', 'test'][0])} demo test images"
    )
    for dtype in ("fp32", "int8"):
        (train_x, train_y), (test_x, test_y) = features[dtype, "train"], features[dtype, "test"]
        print(format_knn_table(knn_accuracy_by_dim(train_x, train_y, test_x, test_y, dims), f"{dtype} k-NN"))
    for width in (dims[-1], dims[0]):
        cosines = torch.cat(
            [F.cosine_similarity(features["fp32", s][0][:, :width], features["int8", s][0][:, :width]) for s in splits]
        )
        print(
            f"cosine(int8, fp32) of the {width}-dim embeddings of {len(cosines)} images: min {cosines.min():.4f}, "
            f"mean {cosines.mean():.4f}"
        )


def random_vit_b() -> tuple[FrancaModel, str]:
    torch.manual_seed(0)
    config = FrancaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224)
    return FrancaModel(config).eval(), "random ViT-B/14, 224 px"


def torchao_forward(args) -> None:
    """Forward of the model alone: fp32 vs torch's dynamic int8 (what --int8 uses) vs torchao's int8 in eager mode."""
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model, name = random_vit_b()
    torchao_model = copy.deepcopy(model)
    quantize_(torchao_model, Int8DynamicActivationInt8WeightConfig())
    variants = {"fp32": model, "torch quantize_dynamic int8": quantize_int8(model), "torchao int8": torchao_model}
    pixels = torch.randn(args.batch, 3, 224, 224)
    times = {label: [] for label in variants}
    with torch.inference_mode():
        reference = model.get_image_features(pixels)
        cosine = {
            label: F.cosine_similarity(v.get_image_features(pixels), reference).min() for label, v in variants.items()
        }
        for _ in range(args.rounds):
            for label, variant in variants.items():
                started = time.perf_counter()
                variant.get_image_features(pixels)
                times[label].append(time.perf_counter() - started)
    print(f"{name}, batch {args.batch}, forward only, median over {args.rounds} interleaved rounds:")
    print("| | images/s | speed vs fp32 | min cosine to fp32 |\n|---|---|---|---|")
    for label in variants:
        speedup = statistics.median(a / b for a, b in zip(times["fp32"], times[label], strict=True))
        rate = args.batch / statistics.median(times[label])
        print(f"| {label} | {rate:.2f} | {speedup:.2f}x | {cosine[label]:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an HF folder to time (default: a random ViT-B/14)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, help="DataLoader workers for both (default: extract's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality", metavar="TEACHER", help="instead: int8 vs fp32 k-NN and cosine of this model")
    parser.add_argument("--max-images", type=int, default=2000, help="with --quality: demo images per split")
    parser.add_argument(
        "--torchao",
        action="store_true",
        help="instead: model forward, torch dynamic int8 vs torchao int8 (needs torchao)",
    )
    add_docs_flag(parser, "docs/extraction.md", "extract-benchmark")
    args = parser.parse_args()
    with recorded(args.docs, "extract-benchmark"):
        if args.torchao:
            torchao_forward(args)
        elif args.quality:
            quality(args)
        else:
            speed(args)


if __name__ == "__main__":
    main()

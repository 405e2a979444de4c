"""Multi-crop augmentation throughput per CPU core: `MultiCropAugmentation` vs the official `DataAugmentationDINO`.

Both run in this process, pinned to one core (`os.sched_setaffinity`) with one torch thread; Pillow's decoder and
filters are single-threaded, so nothing else runs in parallel. One image = JPEG decode from bytes + `.convert("RGB")`
+ 2 global crops + L local crops (the Franca recipe: 224 / 98 px, 8 local crops), the official blur probabilities
(0, 0.9, 0.5) in both. Rounds alternate the pipelines (these machines are noisy); the report is the median images/s
of each and the median of the per-round ratios. The outputs of both for the same seeds are compared as well: the
random choices are the official ones, so the crops can be compared value by value.

    python benchmarks/augment.py --official /path/to/valeoai/Franca       # or FRANCA_OFFICIAL_DIR=...
    python benchmarks/augment.py --device cuda                            # + the device photometric path

Without the official checkout the baseline is missing: the script says so and reports our figures alone.
`--device` adds the device path: the per-core rate of the worker part (decode + uint8 crops + parameters) and the
images/s of `finish_on_device` on batches of `--batch` images.
"""

import argparse
import importlib.util
import io
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from PIL import Image
from recording import add_docs_flag, recorded
from torch.utils.benchmark import Timer

from franca_hf.training.augment import OFFICIAL_BLUR_PROBABILITIES, MultiCropAugmentation

REPO = Path(__file__).resolve().parents[1]


def load_official(root: Path):
    """`DataAugmentationDINO` from a valeoai/Franca checkout, imported by file path: the package's `__init__` pulls
    in training dependencies (torchdata, xformers) that the augmentations do not need."""
    package = root / "franca"
    if not (package / "data" / "augmentations.py").is_file():
        raise FileNotFoundError(f"{root} is not a valeoai/Franca checkout (no franca/data/augmentations.py).")
    for name, path in (("franca", package), ("franca.data", package / "data")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules.setdefault(name, module)

    def load(name: str, path: Path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    load("franca.data.transforms", package / "data" / "transforms.py")
    return load("franca.data.augmentations", package / "data" / "augmentations.py").DataAugmentationDINO


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def images_per_second(pipeline, images: list[bytes], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        pipeline(decode(images[i % len(images)]))
    return count / (time.perf_counter() - start)


def compare_outputs(official, ours: MultiCropAugmentation, images: list[bytes], seeds: int) -> str:
    """Same seeds through both: the largest difference and the share of differing values, in 0-255 levels."""
    std = torch.tensor(ours.std).view(3, 1, 1)
    largest, differing, total = 0.0, 0, 0
    for seed in range(seeds):
        image = decode(images[seed % len(images)])
        torch.manual_seed(seed)
        reference = official(image)
        torch.manual_seed(seed)
        result = ours(image)
        for key in ("global_crops", "local_crops"):
            for a, b in zip(reference[key], result[key], strict=True):
                levels = ((a - b) * std * 255).abs()
                largest = max(largest, float(levels.max()))
                differing += int((levels > 0.5).sum())
                total += levels.numel()
    return (
        f"same seeds, {seeds} images: outputs differ by at most {largest:.0f} levels (of 255); "
        f"{100 * differing / total:.2f} % of values differ"
    )


def device_rate(
    augmentation: MultiCropAugmentation,
    cpu_path: MultiCropAugmentation,
    images: list[bytes],
    batch: int,
    device: torch.device,
    rounds: int,
) -> tuple[float, bool]:
    """Images/s of `finish_on_device` on `batch` images (global and local crops), mean of `rounds` calls, and
    whether its crops on `device` are bit-identical to those of `cpu_path` (the same settings, photometric
    augmentation in the worker on PIL images) for the same seeds."""
    samples, references = [], []
    for seed in range(batch):
        image = decode(images[seed % len(images)])
        torch.manual_seed(seed)
        samples.append(augmentation(image))
        torch.manual_seed(seed)
        references.append(cpu_path(image))

    def stacked(key: str, rows: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        crops = torch.stack([c for s in samples for c in s[key]]).to(device)
        expected = torch.stack([c for s in references for c in s[key]])
        return crops, torch.stack([r for s in samples for r in s[rows]]), expected

    groups = [stacked("global_crops", "global_photometric")]
    if augmentation.num_local_crops:
        groups.append(stacked("local_crops", "local_photometric"))

    def run() -> list[torch.Tensor]:
        return [augmentation.finish_on_device(crops, rows) for crops, rows, _ in groups]

    identical = all(
        torch.equal(finished.cpu(), expected) for finished, (_, _, expected) in zip(run(), groups, strict=True)
    )
    seconds = Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads()).timeit(rounds).mean
    return batch / seconds, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--official",
        type=Path,
        default=os.environ.get("FRANCA_OFFICIAL_DIR"),
        help="a valeoai/Franca checkout (default: $FRANCA_OFFICIAL_DIR)",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        type=Path,
        default=[REPO / "examples/images/coffee.jpg", REPO / "examples/images/astronaut.jpg"],
    )
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=40, help="images per pipeline per round")
    parser.add_argument("--compare-seeds", type=int, default=20)
    parser.add_argument("--device", help="also time the device photometric path there (e.g. cuda)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch on the device")
    parser.add_argument("--core", type=int, help="the CPU core to pin to (default: the first one allowed)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_docs_flag(parser, "docs/pretraining.md", "augment-benchmark")
    args = parser.parse_args()
    with recorded(args.docs, "augment-benchmark"):
        core = args.core if args.core is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        images = [path.read_bytes() for path in args.images]
        sizes = ", ".join(
            f"{p.name} {decode(d).size[0]}x{decode(d).size[1]}" for p, d in zip(args.images, images, strict=True)
        )
        recipe = dict(num_local_crops=args.local_crops, blur_probabilities=OFFICIAL_BLUR_PROBABILITIES)
        ours = MultiCropAugmentation(args.global_size, args.local_size, **recipe)
        pipelines = {"franca_hf MultiCropAugmentation": ours}
        official = None
        if args.official is None:
            print(
                "official baseline missing: pass --official PATH or set FRANCA_OFFICIAL_DIR to a valeoai/Franca "
                "checkout; reporting franca_hf alone (no ratio)"
            )
        else:
            official = load_official(Path(args.official))(
                (0.32, 1.0), (0.05, 0.32), args.local_crops, args.global_size, args.local_size
            )
            pipelines = {"official DataAugmentationDINO": official, **pipelines}
        worker = None
        if args.device:
            worker = MultiCropAugmentation(args.global_size, args.local_size, photometric_on_device=True, **recipe)
            pipelines["franca_hf worker part (device mode)"] = worker

        print(
            f"core {core}, torch {torch.__version__} ({torch.get_num_threads()} thread), images: {sizes}; "
            f"2 x {args.global_size} px + {args.local_crops} x {args.local_size} px crops, decode included"
        )
        rates = {name: [] for name in pipelines}
        for pipeline in pipelines.values():  # warm-up
            images_per_second(pipeline, images, 4)
        for _ in range(args.rounds):
            for name, pipeline in pipelines.items():
                rates[name].append(images_per_second(pipeline, images, args.per_round))
        results = {"images_per_second_per_core": {name: statistics.median(values) for name, values in rates.items()}}
        for name, values in rates.items():
            print(
                f"{name:38s} {statistics.median(values):7.1f} images/s per core "
                f"(rounds: {min(values):.1f}-{max(values):.1f})"
            )
        if official is not None:
            ratios = [
                a / b
                for a, b in zip(
                    rates["franca_hf MultiCropAugmentation"], rates["official DataAugmentationDINO"], strict=True
                )
            ]
            results["speed_ratio"] = statistics.median(ratios)
            print(
                f"speed ratio franca_hf / official: {statistics.median(ratios):.2f} "
                f"(rounds: {min(ratios):.2f}-{max(ratios):.2f})"
            )
            print(compare_outputs(official, ours, images, args.compare_seeds))
        if args.device:
            device = torch.device(args.device)
            rate, identical = device_rate(worker, ours, images, args.batch, device, args.rounds)
            results.update(device=str(device), device_images_per_second=rate, device_identical_to_cpu=identical)
            print(
                f"device photometric path ({device}, batch {args.batch} images): {rate:.0f} images/s; "
                f"crops {'bit-identical to' if identical else 'DIFFERENT from'} the CPU (PIL) path's for the same seeds"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Time the project's Sinkhorn-Knopp against the plain (unshifted, official-arithmetic) one on the same logits.

Both run in this process on the same random logits, all nesting levels (K/16 ... K prototypes); the report is the
median wall time of each and their ratio (project / plain). The plain version holds one level's matrix at a time,
the project's holds all levels (one all-reduce per iteration for all of them).

    python benchmarks/sinkhorn.py                                          # CPU: B=1024, K=65536
    python benchmarks/sinkhorn.py --device cuda --batch 4096 --prototypes 131072 --per-level

`--per-level` also times each nesting level alone (the project's version) with its peak memory (CUDA: peak
allocated during the call, beyond its input).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from recording import add_docs_flag, recorded

from franca_hf.training import plain_sinkhorn_knopp, sinkhorn_knopp


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_memory_mib(fn, device: torch.device) -> float | None:
    """CUDA: the memory allocated at the peak of one call, beyond what was allocated before it. None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1024, help="samples B")
    parser.add_argument("--prototypes", type=int, default=65536, help="K of the largest level")
    parser.add_argument("--levels", type=int, default=5, help="nesting levels K/2^(levels-1) ... K")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-level", action="store_true", help="also time each level alone, with its peak memory")
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_docs_flag(parser, "docs/objective.md", "sinkhorn-benchmark")
    args = parser.parse_args()
    with recorded(args.docs, "sinkhorn-benchmark"):
        device = torch.device(args.device)
        generator = torch.Generator(device=device).manual_seed(0)
        sizes = [args.prototypes >> (args.levels - 1 - level) for level in range(args.levels)]
        # Logits of the scale of the official heads (|logit| ~ 1), so that the plain version stays finite.
        logits = [torch.randn(args.batch, size, device=device, generator=generator) * 0.3 for size in sizes]

        def project():
            return sinkhorn_knopp(logits, args.temperature)

        def plain():
            return plain_sinkhorn_knopp(logits, args.temperature)

        max_error = max(
            float((a - b).abs().max() / b.abs().max()) for a, b in zip(project(), plain(), strict=True)
        )  # also warms up
        plain_s = _median_seconds(plain, device, args.repeats)
        project_s = _median_seconds(project, device, args.repeats)
        print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
        print(f"B={args.batch} prototypes per level={sizes} T={args.temperature} repeats={args.repeats}")
        print(f"plain   (baseline): {plain_s * 1e3:9.1f} ms")
        print(f"project           : {project_s * 1e3:9.1f} ms")
        print(f"ratio project/plain: {project_s / plain_s:.2f}  (max relative difference {max_error:.1e})")
        results = {"batch": args.batch, "project_ms": project_s * 1e3, "plain_ms": plain_s * 1e3, "levels": []}
        for level in logits if args.per_level else []:
            seconds = _median_seconds(
                lambda level=level: sinkhorn_knopp([level], args.temperature), device, args.repeats
            )
            peak = _peak_memory_mib(lambda level=level: sinkhorn_knopp([level], args.temperature), device)
            results["levels"].append({"prototypes": level.shape[1], "ms": seconds * 1e3, "peak_mib": peak})
            memory = f"{peak:8.0f} MiB peak" if peak is not None else "(peak memory: CUDA only)"
            print(f"level K={level.shape[1]:7d}: {seconds * 1e3:9.1f} ms  {memory}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

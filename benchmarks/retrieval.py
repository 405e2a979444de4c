"""Matryoshka prefix search and funnel search vs full-dimension exact search: queries/s and recall@10.

Every method runs in ONE process, round-robin over `--rounds` rounds (these machines are noisy); a method's speed-up
is the median over rounds of (full-D exact time / its time) in the same round. Recall@10 is measured against
full-D exact search. Without `--embeddings` or `--model` the data are SYNTHETIC (see `synthetic_embeddings`); with
`--embeddings`, real embeddings are read from a `franca-hf extract` folder or a safetensors file; with `--model M
[M ...]`, each model embeds `--images` images of `--data` (its Matryoshka embeddings: prefixes, or cut in its fitted
PCA basis) and is benchmarked in turn. Real embeddings hold `--queries` rows (at most a quarter) out of the database
as queries.

torch runs on `--threads` threads (default 1): on a CPU shared with other jobs, a second OpenMP thread that is not
scheduled stalls every parallel op, which distorts the many small ops of a funnel far more than one big matmul.

Run (about 2-3 minutes on 2 CPU cores each):
    python benchmarks/retrieval.py --plot docs/retrieval_benchmark.png --docs docs/retrieval.md
    python benchmarks/retrieval.py --model runs/demo_prefix/teacher runs/matryoshka_pca/pca --data demo \
        --images 50000 --docs docs/retrieval.md --docs-block retrieval-benchmark-demo
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open

from franca_hf.io import portable_path, replace_marked_block, write_file_atomically
from franca_hf.matryoshka import describe_data
from franca_hf.modeling.configuration_franca import default_matryoshka_dims
from franca_hf.retrieval import EmbeddingIndex, index_from_features

K = 10


def synthetic_embeddings(
    size: int, queries: int, width: int, clusters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(size, width) database and (queries, width) queries with a nested, PCA-like, clustered structure.

    Channel i has standard deviation (i + 1) ** -0.5 (variance ~ 1 / (i + 1), so the first width/16 channels carry
    about 60% of it, as in a PCA-ordered spectrum). Cluster centres are drawn with that spectrum; cluster sizes follow
    Zipf's law (cluster c gets a share ~ 1 / (c + 1)); a point is its centre plus 0.5x-spread noise of the same
    spectrum. A query is a random database point plus half that noise (0.25x spread): near its source point, inside
    a cluster of look-alikes.
    """
    gen = torch.Generator().manual_seed(seed)
    spectrum = (torch.arange(width) + 1.0) ** -0.5
    share = 1.0 / (torch.arange(clusters) + 1.0)
    centres = torch.randn(clusters, width, generator=gen) * spectrum
    members = torch.multinomial(share, size, replacement=True, generator=gen)
    database = centres[members] + 0.5 * torch.randn(size, width, generator=gen) * spectrum
    sources = torch.randint(size, (queries,), generator=gen)
    query_vectors = database[sources] + 0.25 * torch.randn(queries, width, generator=gen) * spectrum
    return database, query_vectors


def real_embeddings(path: str, key: str | None, queries: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real embeddings: the CLS rows of a `franca-hf extract` folder, or the 2-D tensor `key` of a safetensors file
    (its only 2-D tensor when None), with `queries` rows held out (`hold_out`)."""
    if Path(path).is_dir():
        vectors = index_from_features(path).vectors
    else:
        with safe_open(path, framework="pt") as handle:
            names = [key] if key else [n for n in handle.keys() if len(handle.get_slice(n).get_shape()) == 2]
            if len(names) != 1:
                raise SystemExit(f"{path}: pass --key, one of the 2-D tensors {names}.")
            vectors = handle.get_tensor(names[0]).float()
    return hold_out(vectors, queries, seed, path)


def model_embeddings(
    model_name: str, data: str, split: str, images: int, queries: int, seed: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width Matryoshka embeddings (`franca_hf.features.extract_features`) of `images` images of `data` by a
    model, with `queries` rows held out (`hold_out`). The demo source is generated with `images` images."""
    from franca_hf.data import open_source, subsample
    from franca_hf.features import extract_features, load_model_and_processor

    model, processor = load_model_and_processor(model_name, device=device)
    source = open_source(data, split, demo_num_images=images)
    source = subsample(source, images)
    vectors = extract_features(model, processor, source, batch_size=256, num_workers=None, desc="embed").features
    return hold_out(vectors, queries, seed, model_name)


def hold_out(vectors: torch.Tensor, queries: int, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(database, queries): `queries` random rows held out of `vectors`, at most a quarter of them (with a note)."""
    if vectors.shape[0] < 2 * K:
        raise SystemExit(f"{name} holds {vectors.shape[0]} embeddings; the benchmark (top-{K}) needs at least {2 * K}.")
    if queries > vectors.shape[0] // 4:
        print(
            f"note: {vectors.shape[0]} embeddings cannot spare {queries} queries; holding out "
            f"{vectors.shape[0] // 4} (a quarter) as queries (--queries sets the number)."
        )
        queries = vectors.shape[0] // 4
    order = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(seed))
    return vectors[order[queries:]], vectors[order[:queries]]


def funnel_settings(dims: list[int]) -> list[list[tuple[int, int]]]:
    """MRL-style cascades for top-10 over Franca's nested dims [D/16, D/8, D/4, D/2, D]."""
    if len(dims) != 5:
        raise SystemExit(f"The funnel settings need Franca's five nested dims [D/16, …, D]; D gives {dims}.")
    d16, d8, d4, d2, full = dims
    return [
        [(d16, 200), (full, K)],
        [(d16, 100), (d4, 30), (full, K)],
        [(d16, 200), (d4, 50), (full, K)],
        [(d16, 400), (d4, 100), (full, K)],
        [(d16, 200), (d8, 100), (d4, 50), (d2, 25), (full, K)],
        [(d8, 100), (d2, 30), (full, K)],
    ]


def timed(fn, queries: torch.Tensor, batch: int, device: torch.device) -> float:
    """Seconds to run `fn` over all queries in batches of `batch`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, queries.shape[0], batch):
        fn(queries[i : i + batch])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    hits = (found.unsqueeze(2) == truth.unsqueeze(1)).any(dim=2).float().sum(dim=1)
    return (hits / truth.shape[1]).mean().item()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} on {torch.get_num_threads()} thread(s), "
        f"Python {platform.python_version()}"
    )


def plot(rows: list[dict], batches: list[int], path: Path) -> None:
    """Speed-up vs recall@10, one panel per batch size; funnels are labelled F1… as in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for kind, marker, colour in (("prefix", "o", "tab:blue"), ("funnel", "^", "tab:orange")):
            chosen = [r for r in rows if r["kind"] == kind]
            ax.scatter(
                [r["recall"] for r in chosen],
                [r["speedup"][batch] for r in chosen],
                marker=marker,
                color=colour,
                label=f"{kind} search",
            )
            for r in chosen:
                ax.annotate(
                    r["short"],
                    (r["recall"], r["speedup"][batch]),
                    fontsize=7,
                    xytext=(4, 2),
                    textcoords="offset points",
                )
        ax.axhline(5, color="grey", linestyle="--", linewidth=0.8, label="5x target")
        ax.axvline(0.99, color="grey", linestyle=":", linewidth=0.8, label="recall 0.99")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("recall@10 vs full-dimension exact search")
        ax.set_ylabel("speed-up over full-dimension exact search")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    write_file_atomically(path, lambda staging: fig.savefig(staging, dpi=120, format="png"))


def benchmark(database: torch.Tensor, queries: torch.Tensor, source: str, args, device: torch.device):
    """Time and score every method on one database; returns the results block (Markdown) and the methods."""
    dims = default_matryoshka_dims(database.shape[1])
    started = time.perf_counter()
    index = EmbeddingIndex(database.to(device), dims=dims)
    built = time.perf_counter() - started
    queries = queries.to(device)
    variance = database.var(dim=0)
    share = ", ".join(f"{d}: {variance[:d].sum() / variance.sum():.0%}" for d in dims[:-1])
    header = [
        f"Data: {source}.",
        f"Database {len(index)} x {index.width} float32, {len(queries)} queries, k = {K}; variance held by the first d "
        f"channels: {share}. Index built in {built:.2f} s.",
        f"Machine: {machine()}; device {device}; load average {os.getloadavg()[0]:.1f} at the start.",
    ]
    print("\n".join(header), flush=True)

    truth = index.search(queries, K)[1]
    methods = [dict(kind="exact", name=f"exact, dim {index.width}", short="exact", fn=lambda q: index.search(q, K))]
    methods += [
        dict(kind="prefix", name=f"prefix, dim {d}", short=str(d), fn=lambda q, d=d: index.search(q, K, d))
        for d in dims[:-1]
    ]
    methods += [
        dict(
            kind="funnel",
            name=f"funnel F{i}: " + " > ".join(f"{d}:{s}" for d, s in stages),
            short=f"F{i}",
            fn=lambda q, stages=stages: index.funnel_search(q, K, stages),
        )
        for i, stages in enumerate(funnel_settings(dims), start=1)
    ]
    for m in methods:
        m["recall"] = recall(m["fn"](queries)[1], truth)
        m["times"] = {b: [] for b in args.batches}
    for r in range(args.rounds):
        for batch in args.batches:
            subset = queries[: args.single_queries] if batch == 1 else queries
            for m in methods:
                m["times"][batch].append(timed(m["fn"], subset, batch, device) / subset.shape[0])
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", flush=True)
    base = methods[0]["times"]
    for m in methods:
        m["qps"] = {b: 1 / statistics.median(t) for b, t in m["times"].items()}
        m["speedup"] = {
            b: statistics.median(x / y for x, y in zip(base[b], t, strict=True)) for b, t in m["times"].items()
        }

    columns = "".join(f" q/s (batch {b}) | speed-up (batch {b}) |" for b in args.batches)
    lines = [f"| method | recall@{K} |{columns}", "|---|---|" + "---|---|" * len(args.batches)]
    for m in methods:
        cells = "".join(f" {m['qps'][b]:,.0f} | {m['speedup'][b]:.2f}x |" for b in args.batches)
        lines.append(f"| {m['name']} | {m['recall']:.4f} |{cells}")
    accurate = [m for m in methods if m["kind"] == "funnel" and m["recall"] >= 0.99]
    verdicts = []
    for b in args.batches:
        best = max(accurate, key=lambda m: m["speedup"][b], default=None)
        verdicts.append(
            f"Batch {b}: no funnel reached recall@{K} >= 0.99."
            if best is None
            else f"Batch {b}: fastest funnel at recall@{K} >= 0.99 is {best['name']} (recall "
            f"{best['recall']:.4f}), {best['speedup'][b]:.2f}x full-dimension exact search: 5x target "
            f"{'met' if best['speedup'][b] >= 5 else 'NOT met'}."
        )
    footer = [
        f"Timings: median over {args.rounds} round-robin rounds; batch 1 timed on the first "
        f"{args.single_queries} queries, larger batches on all {len(queries)}; load average "
        f"{os.getloadavg()[0]:.1f} at the end.",
        *verdicts,
    ]
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(footer))
    block = "\n\n".join(["\n".join(header), "\n".join(lines), "\n".join(footer)])
    return block, methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000, help="synthetic database size")
    parser.add_argument("--width", type=int, default=768, help="synthetic embedding width D")
    parser.add_argument("--clusters", type=int, default=1000, help="synthetic cluster count")
    parser.add_argument("--queries", type=int, default=1024, help="queries timed at the largest batch size")
    parser.add_argument("--single-queries", type=int, default=64, help="queries timed one at a time (batch 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="query batch sizes to time")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--embeddings",
        help="real embeddings instead of synthetic ones: a `franca-hf extract` folder or a safetensors file",
    )
    parser.add_argument("--key", help="tensor name in --embeddings (default: its only 2-D tensor)")
    parser.add_argument(
        "--model",
        nargs="+",
        help="benchmark the embeddings of these models (folders, Hub ids or release names) of --data, one by one",
    )
    parser.add_argument("--data", default="demo", help="with --model: 'demo', an image folder or hf:<dataset>")
    parser.add_argument("--split", default="train", help="with --model: the split of --data")
    parser.add_argument("--images", type=int, default=50_000, help="with --model: images embedded (queries included)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see above)")
    parser.add_argument("--plot", type=Path, help="write the speed-up vs recall plot here (PNG; one data source)")
    parser.add_argument("--docs", type=Path, help="replace the results block of this markdown page")
    parser.add_argument(
        "--docs-block", default="retrieval-benchmark", help="with --docs: the block's marker name in the page"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.plot and args.model and len(args.model) > 1:
        raise SystemExit("--plot draws one data source; give one --model.")

    if args.model:
        sources = []
        for name in args.model:
            torch.set_num_threads(os.cpu_count() or 1)  # embedding is not timed
            database, queries = model_embeddings(
                name, args.data, args.split, args.images, args.queries, args.seed, args.device
            )
            described = describe_data(args.data, args.split)
            sources.append(
                (
                    database,
                    queries,
                    f"REAL embeddings of {len(database) + len(queries)} images of {described} by "
                    f"{portable_path(name, '<model folder>')} "
                    f"(Matryoshka truncation: {truncation_of(name)}): {len(queries)} random rows held out as queries",
                )
            )
    elif args.embeddings:
        database, queries = real_embeddings(args.embeddings, args.key, args.queries, args.seed)
        sources = [
            (
                database,
                queries,
                f"REAL embeddings from {portable_path(args.embeddings, '<features folder>')}: {len(queries)} random "
                "rows held out as queries",
            )
        ]
    else:
        database, queries = synthetic_embeddings(args.size, args.queries, args.width, args.clusters, args.seed)
        source = (
            f"SYNTHETIC embeddings (seed {args.seed}): channel i has std (i+1)^-0.5, {args.clusters} Zipf-sized "
            "clusters, points = centre + 0.5x-spread noise, queries = a random database point + 0.25x noise"
        )
        sources = [(database, queries, source)]
    torch.set_num_threads(args.threads)
    blocks = []
    for database, queries, source in sources:
        block, methods = benchmark(database, queries, source, args, device)
        blocks.append(block)
    if args.plot:
        plot(methods[1:], args.batches, args.plot)
        print(f"wrote {args.plot}")
    if args.docs:
        replace_marked_block(args.docs, args.docs_block, "\n\n".join(blocks))
        print(f"wrote {args.docs}")


def truncation_of(name: str) -> str:
    """How a model cuts its Matryoshka embeddings: "prefix" or "fitted PCA basis"."""
    from transformers import AutoConfig

    from franca_hf.conversion.convert import resolve_model

    basis = getattr(AutoConfig.from_pretrained(resolve_model(name)), "matryoshka_basis", "prefix")
    return "fitted PCA basis" if basis == "pca" else "prefix"


if __name__ == "__main__":
    main()

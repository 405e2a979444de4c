"""Matryoshka retrieval with franca_hf.retrieval vs plain FAISS, side by side: queries/s, recall@10, build, memory.

Each operating point of ours runs beside its plain-FAISS equivalent in ONE process, round-robin over `--rounds`
rounds (these machines are noisy; medians are reported; single queries of ours and plain take turns query by query):

* exact full width: `EmbeddingIndex.search` vs `faiss.IndexFlatIP(D)`;
* exact at D/16: `EmbeddingIndex.search(dim=D/16)` vs `faiss.IndexFlatIP(D/16)`;
* funnel: `funnel_search` with an exact first stage vs `IndexFlatIP(D/16)` shortlist + numpy rerank at D;
* HNSW: our funnel over an HNSW first stage at D/16 vs the same FAISS graph searched directly + numpy rerank
  (one graph serves both: the build is the same FAISS call), and a plain HNSW32 over all D channels (efSearch 64)
  for collections up to `--full-hnsw-max` rows;
* IVF-PQ: our funnel over an IVF-PQ first stage at D/16 vs the same FAISS index searched directly + numpy rerank.

Recall@10 is measured against exact full-width search. Without `--embeddings` or `--model` the data are SYNTHETIC
(see `synthetic_embeddings`), L2-normalised like real embeddings; with `--embeddings`, real embeddings are read from
a `franca-hf extract` folder or a safetensors file; with `--model M [M ...]`, each model embeds `--images` images of
`--data` (its Matryoshka embeddings cut as prefixes and, for a model with a fitted basis, in that basis: two
tables). Real embeddings hold `--queries` rows (at most a quarter) out of the database as queries.

Queries run on `--threads` threads (default 1, FAISS and torch); indexes are built on all cores.

Run (on 2 quiet CPU cores, 100k: about 1.5 minutes; 1M: about 3.5; the demo: about 1; 100k on 2 threads: 1.5):
    python benchmarks/retrieval.py --docs docs/retrieval.md
    python benchmarks/retrieval.py --size 1000000 --queries 256 --single-queries 32 --rounds 3 \
        --docs docs/retrieval.md --docs-block retrieval-benchmark-1m
    python benchmarks/retrieval.py --model runs/demo/teacher --data demo --images 20000 \
        --docs docs/retrieval.md --docs-block retrieval-benchmark-demo
    python benchmarks/retrieval.py --threads 2 --docs docs/retrieval.md --docs-block retrieval-benchmark-2-threads
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from recording import machine
from safetensors import safe_open

from franca_hf.io import portable_path, replace_marked_block
from franca_hf.matryoshka import describe_data
from franca_hf.modeling.configuration_franca import default_matryoshka_dims
from franca_hf.retrieval import HALF_SCAN_MIN_BYTES, EmbeddingIndex, huge_page_array, index_from_features

K = 10
# IVF-PQ is for large collections; below this many rows its training has too few points per cell and code
IVFPQ_MIN_ROWS = 10_000


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
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(truncation, database, queries) for each way a model cuts its Matryoshka embeddings: as prefixes and, for a
    model with a fitted basis (`fit-pca`, or the trainer's export), in that basis. Full-width embeddings
    (`franca_hf.features.extract_features`) of `images` images of `data`, the same `queries` rows held out of each
    (`hold_out`). The demo source is generated with `images` images."""
    from franca_hf.data import open_source, subsample
    from franca_hf.features import extract_features, load_model_and_processor
    from franca_hf.matryoshka import without_matryoshka_basis

    model, processor = load_model_and_processor(model_name, device=device)
    source = subsample(open_source(data, split, demo_num_images=images), images)
    variants = [("prefix", without_matryoshka_basis(model))]
    if model.config.matryoshka_basis == "pca":
        variants.append(("fitted PCA basis", model))
    embedded = []
    for truncation, variant in variants:
        vectors = extract_features(variant, processor, source, batch_size=256, num_workers=None, desc="embed").features
        embedded.append((truncation, *hold_out(vectors, queries, seed, model_name)))
    return embedded


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


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    hits = (found.unsqueeze(2) == truth.unsqueeze(1)).any(dim=2).float().sum(dim=1)
    return (hits / truth.shape[1]).mean().item()


def rerank(database: np.ndarray, queries: np.ndarray, shortlist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy: scores and rows (Q, k) of the top-k of each query's shortlisted rows (Q, S) of a unit database,
    by inner product: gather the rows, one batched matrix-vector product, sort."""
    scores = np.matmul(database[shortlist], queries[:, :, None])[:, :, 0]
    best = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, best, axis=1), np.take_along_axis(shortlist, best, axis=1)


def index_bytes(index) -> int:
    import faiss

    return faiss.serialize_index(index).nbytes


def build(label: str, make):
    """(object, seconds) of `make()`, built on all cores."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    made = make()
    seconds = time.perf_counter() - started
    print(f"built {label} in {seconds:.1f} s", flush=True)
    return made, seconds


def benchmark(database: torch.Tensor, queries: torch.Tensor, source: str, args) -> str:
    """Time and score every operating point, ours beside plain FAISS, on one database; returns a Markdown block."""
    import faiss

    from franca_hf.retrieval_settings import AnnSettings

    # the buffer an EmbeddingIndex holds its vectors in (it would copy anything else into one): our three indexes
    # share it, as they would a saved index's memory map, and FAISS's flat index copies it into memory of its own
    unit = huge_page_array(*database.shape)
    unit[:] = torch.nn.functional.normalize(database.float(), dim=1).numpy()
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    size, width = unit.shape
    dims = default_matryoshka_dims(width)
    small = dims[0]
    unit_queries = queries.numpy()
    small_unit = np.ascontiguousarray(unit[:, :small]) / np.linalg.norm(unit[:, :small], axis=1, keepdims=True)
    header = [
        f"Data: {source}.",
        f"Database {size:,} x {width} float32 (unit norm), {len(queries)} queries, k = {K}, first stage at "
        f"D/16 = {small}; HNSW M = {args.hnsw_m}, efSearch = max({args.ef_search}, shortlist); IVF nprobe = "
        f"{args.nprobe}.",
        f"Machine: {machine()}; queries on {args.threads} thread(s), builds on all cores; load average "
        f"{os.getloadavg()[0]:.1f} at the start.",
    ]
    print("\n".join(header), flush=True)

    exact, exact_build = build(
        "ours, exact", lambda: prepared(EmbeddingIndex(unit, dims=dims, settings=AnnSettings("none")), [small, width])
    )
    flat_full, flat_full_build = build("IndexFlatIP(D)", lambda: flat(unit))
    flat_small, flat_small_build = build("IndexFlatIP(D/16)", lambda: flat(small_unit))
    hnsw_settings = AnnSettings("hnsw", hnsw_m=args.hnsw_m, ef_search=args.ef_search)
    hnsw, hnsw_build = build(
        "ours, HNSW at D/16", lambda: warmed(EmbeddingIndex(unit, dims=dims, settings=hnsw_settings))
    )
    if size >= IVFPQ_MIN_ROWS:
        ivf_settings = AnnSettings("ivfpq", nprobe=args.nprobe)
        ivfpq, ivfpq_build = build(
            "ours, IVF-PQ at D/16", lambda: warmed(EmbeddingIndex(unit, dims=dims, settings=ivf_settings))
        )
        inverted = ivfpq.first_stage()
    graph = hnsw.first_stage()
    inverted_params = faiss.SearchParametersIVF(nprobe=args.nprobe)

    def plain_funnel(first, shortlist: int, params=None):
        def run(q: np.ndarray):
            cut = np.ascontiguousarray(q[:, :small] / np.linalg.norm(q[:, :small], axis=1, keepdims=True))
            return rerank(unit, q, first.search(cut, shortlist, params=params)[1], K)[1]

        return run

    def ours(index: EmbeddingIndex, stages):
        return lambda q: index.funnel_search(q, K, stages)[1]

    def plain_small(q: np.ndarray):
        return flat_small.search(np.ascontiguousarray(q[:, :small]) / np.linalg.norm(q[:, :small], axis=1)[:, None], K)

    flat_bytes, small_bytes = size * width * 4, size * small * 4
    full = ("exact full width", flat_full_build, flat_bytes)
    methods = [
        (*full[:1], "ours: `search`", lambda q: exact.search(q, K)[1], exact_build, lambda: exact.copy_bytes(width)),
        (*full[:1], "FAISS `IndexFlatIP(D)`", lambda q: flat_full.search(q, K)[1], *full[1:]),
        (
            "exact at D/16",
            f"ours: `search(dim={small})`",
            lambda q: exact.search(q, K, small)[1],
            0,
            lambda: exact.copy_bytes(small),
        ),
        ("exact at D/16", "FAISS `IndexFlatIP(D/16)`", lambda q: plain_small(q)[1], flat_small_build, small_bytes),
    ]
    for shortlist in sorted({min(s, size) for s in args.shortlist}):
        stages = [(small, shortlist), (width, K)]
        graph_params = faiss.SearchParametersHNSW(efSearch=max(args.ef_search, shortlist))
        point = f"shortlist {shortlist} at {small}, rerank at {width}"
        methods += [
            (
                f"funnel, exact, {point}",
                "ours: `funnel_search`",
                ours(exact, stages),
                0,
                lambda: exact.copy_bytes(small),
            ),
            (
                f"funnel, exact, {point}",
                "FAISS `IndexFlatIP(D/16)` + numpy rerank",
                plain_funnel(flat_small, shortlist),
                flat_small_build,
                small_bytes,
            ),
            (f"HNSW, {point}", f"ours: HNSW{args.hnsw_m} + rerank", ours(hnsw, stages), hnsw_build, index_bytes(graph)),
            (
                f"HNSW, {point}",
                "FAISS: the same graph + numpy rerank",
                plain_funnel(graph, shortlist, graph_params),
                hnsw_build,
                index_bytes(graph),
            ),
        ]
        if size >= IVFPQ_MIN_ROWS:
            name = f"ours: IVF{ivfpq.settings.nlist},PQ{ivfpq.settings.pq_bytes} + rerank"
            methods += [
                (f"IVF-PQ, {point}", name, ours(ivfpq, stages), ivfpq_build, index_bytes(inverted)),
                (
                    f"IVF-PQ, {point}",
                    "FAISS: the same index + numpy rerank",
                    plain_funnel(inverted, shortlist, inverted_params),
                    ivfpq_build,
                    index_bytes(inverted),
                ),
            ]
    if size <= args.full_hnsw_max:

        def make_full():
            index = faiss.IndexHNSWFlat(width, 32, faiss.METRIC_INNER_PRODUCT)
            index.add(unit)
            return index

        full_graph, full_build = build("FAISS HNSW32 at D", make_full)
        full_params = faiss.SearchParametersHNSW(efSearch=64)
        methods.append(
            (
                "HNSW",
                "FAISS: HNSW32 at D (efSearch 64), no rerank",
                lambda q: full_graph.search(q, K, params=full_params)[1],
                full_build,
                index_bytes(full_graph),
            )
        )
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    truth = torch.from_numpy(np.asarray(flat_full.search(unit_queries, K)[1]))
    rows = [
        dict(point=p, name=n, fn=f, build=b, memory=m, times={x: [] for x in args.batches}) for p, n, f, b, m in methods
    ]
    for row in rows:
        row["recall"] = recall(torch.as_tensor(np.asarray(row["fn"](unit_queries))), truth)
    started = time.perf_counter()
    points = {row["point"]: [other for other in rows if other["point"] == row["point"]] for row in rows}
    singles = unit_queries[: args.single_queries]
    for r in range(args.rounds):
        for batch in args.batches:
            if batch == 1:  # the methods of an operating point take turns query by query
                for group in points.values():
                    seconds = timed_singles([row["fn"] for row in group], singles)
                    for row, total in zip(group, seconds, strict=True):
                        row["times"][1].append(total / len(singles))
                continue
            for row in rows:
                row["times"][batch].append(timed_numpy(row["fn"], unit_queries, batch) / len(unit_queries))
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", flush=True)
    base = rows[0]["times"]
    columns = "".join(f" q/s batch {b} | x exact |" for b in args.batches)
    lines = [
        f"| operating point | method | recall@{K} |{columns} build s | RAM beyond the vectors |",
        "|---|---|---|" + "---|---|" * len(args.batches) + "---|---|",
    ]
    for row in rows:
        cells = "".join(
            f" {1 / statistics.median(row['times'][b]):,.0f} | "
            f"{statistics.median(x / y for x, y in zip(base[b], row['times'][b], strict=True)):.1f}x |"
            for b in args.batches
        )
        held = row["memory"]() if callable(row["memory"]) else row["memory"]  # ours: the copies it holds after the runs
        memory = f"{held / 2**20:,.0f} MiB" if held else "none"
        build_time = f"{row['build']:.1f}" if row["build"] else "-"
        lines.append(f"| {row['point']} | {row['name']} | {row['recall']:.4f} |{cells} {build_time} | {memory} |")
    footer = [
        f"Timings: median over {args.rounds} round-robin rounds; batch 1 timed on the first {args.single_queries} "
        "queries, the methods of an operating point taking turns query by query (so that load that comes and goes "
        "weighs on them alike), which goes first rotating from turn to turn (so that none always runs right after "
        f'the others), larger batches on all {len(queries)}; "x exact": speed over ours, exact full width, '
        f"in the same round. RAM beyond the vectors: what the method keeps besides the {size:,} x {width} float32 vectors "
        f"({flat_bytes / 2**20:,.0f} MiB, which ours holds in its huge-page buffer, `huge_page_array`, as "
        "`index_from_features` gives them, or memory-maps from a saved index, and which FAISS's flat index copies; "
        "ours, given vectors in other memory, copies them once too); ours' exact scans read copies made "
        "in its build (`prepare`): a unit D/16 copy and, over tables of "
        f"{HALF_SCAN_MIN_BYTES >> 20} MiB or more, `HalfPrecisionScan`'s half-precision copies of D/16 and D, under "
        "that, where the rows' principal axes allow, `PrincipalBoundScan`'s table of bounds. Load average "
        f"{os.getloadavg()[0]:.1f} at the end.",
    ]
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(footer))
    return "\n\n".join(["\n".join(header), "\n".join(lines), "\n".join(footer)])


def flat(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def warmed(index: EmbeddingIndex) -> EmbeddingIndex:
    """The index with its first stage built now (so that building is what is timed)."""
    index.first_stage()
    return index


def prepared(index: EmbeddingIndex, dims: list[int]) -> EmbeddingIndex:
    """The index with the copies its exact scans at `dims` read made now (so that making them is what is timed)."""
    index.prepare(dims)
    return index


def timed_singles(fns, queries: np.ndarray) -> list[float]:
    """Seconds each of `fns` takes over all `queries` one at a time, the functions taking turns query by query. Each
    starts at its own share of the queries (function i of n at query i·Q/n), so that every query is met by each
    function at the same distance in turns from the others: none runs more often on rows another just read. The
    order within a turn rotates, so that each function runs first in as many turns as the others (two equal scans
    timed in a fixed order measured alike here, 0.997, so this only rules out an order effect elsewhere)."""
    totals, count = [0.0] * len(fns), len(fns)
    for turn in range(len(queries)):
        for step in range(count):
            position = (turn + step) % count
            query = (turn + position * len(queries) // count) % len(queries)
            start = time.perf_counter()
            fns[position](queries[query : query + 1])
            totals[position] += time.perf_counter() - start
    return totals


def timed_numpy(fn, queries: np.ndarray, batch: int) -> float:
    """Seconds to run `fn` over all queries in batches of `batch`."""
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        fn(queries[i : i + batch])
    return time.perf_counter() - start


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
    parser.add_argument("--threads", type=int, default=1, help="FAISS and torch threads for queries (see above)")
    parser.add_argument(
        "--shortlist", type=int, nargs="+", default=[100, 200], help="first-stage shortlists reranked at full width"
    )
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW search list (at least the shortlist is used)")
    parser.add_argument("--nprobe", type=int, default=64, help="IVF cells visited per query")
    parser.add_argument(
        "--full-hnsw-max", type=int, default=200_000, help="build the plain full-width HNSW up to this many rows"
    )
    parser.add_argument("--docs", type=Path, help="replace the results block of this markdown page")
    parser.add_argument(
        "--docs-block", default="retrieval-benchmark", help="with --docs: the block's marker name in the page"
    )
    args = parser.parse_args()

    if args.model:
        sources = []
        for name in args.model:
            torch.set_num_threads(os.cpu_count() or 1)  # embedding is not timed
            # a folder is named relative to the repository (or by a placeholder), as pages written by scripts do
            described = describe_data(args.data, args.split).replace(
                args.data, portable_path(args.data, "<image folder>")
            )
            for truncation, database, queries in model_embeddings(
                name, args.data, args.split, args.images, args.queries, args.seed, args.device
            ):
                sources.append(
                    (
                        database,
                        queries,
                        f"REAL embeddings of {len(database) + len(queries)} images of {described} by "
                        f"{portable_path(name, '<model folder>')} (Matryoshka truncation: {truncation}): "
                        f"{len(queries)} random rows held out as queries",
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
    blocks = [benchmark(database, queries, source, args) for database, queries, source in sources]
    if args.docs:
        replace_marked_block(args.docs, args.docs_block, "\n\n".join(blocks))
        print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()

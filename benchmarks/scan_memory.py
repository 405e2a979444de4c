"""One FAISS exact scan over the same vectors held in different memory: why an `EmbeddingIndex` keeps its vectors in a
`huge_page_array`.

For each (rows, width), the same unit float32 vectors are copied into: a `franca_hf.retrieval.huge_page_array` (a
private anonymous memory map advised for transparent huge pages: what an index holds), a numpy array, a torch
tensor, the storage of a `faiss.IndexFlatIP` (what plain FAISS holds), and a saved file opened as a memory map (what a
saved index scans; its pages read into the page cache first), once as allocated and once after the process has
allocated and freed temporaries of that size (`churn`), as a program building an index has. Each is scanned with
the same call,
`faiss.knn_inner_product` for one query and k = 10, on one thread; the memories take turns query by query, and
medians over `--rounds` rounds are reported with the ratio to the huge-page buffer's time in the same round, and,
on Linux, how much of each memory the kernel backs with 2 MiB pages (AnonHugePages in /proc/self/smaps).

Run (about a minute on 2 CPU cores):
    python benchmarks/scan_memory.py --docs docs/retrieval.md
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from recording import add_docs_flag, recorded

from franca_hf.retrieval import huge_page_array

K = 10


def huge_page_mib(array: np.ndarray) -> str:
    """MiB of the mapping holding `array` that the kernel backs with huge pages ("-" where /proc/self/smaps is not)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        return "-"
    address, inside = array.ctypes.data, False
    for line in smaps.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return f"{int(line.split()[1]) // 1024}"
    return "-"


def memories(unit: np.ndarray, folder: Path) -> dict[str, tuple[np.ndarray, object]]:
    """The same vectors in each memory: name -> (array to scan, object that owns it)."""
    buffer = huge_page_array(*unit.shape)
    buffer[:] = unit
    flat = faiss.IndexFlatIP(unit.shape[1])
    flat.add(unit)
    in_flat = faiss.rev_swig_ptr(flat.get_xb(), unit.size).reshape(unit.shape)
    path = folder / f"vectors_{unit.shape[0]}x{unit.shape[1]}.f32"
    unit.tofile(path)
    mapped = np.memmap(path, np.float32, "r", shape=unit.shape)
    float(mapped.sum())  # read the file into the page cache
    tensor = torch.from_numpy(unit.copy())
    return {
        "huge_page_array (an index's buffer)": (buffer, buffer),
        "numpy array": (np.array(unit), None),
        "torch tensor": (tensor.numpy(), tensor),
        "IndexFlatIP storage (plain FAISS)": (in_flat, flat),
        "memory map of a file (a saved index)": (mapped, mapped),
    }


def scan(array: np.ndarray, query: np.ndarray) -> None:
    scores, rows = np.empty((1, K), np.float32), np.empty((1, K), np.int64)
    pointer = faiss.swig_ptr
    faiss.knn_inner_product(
        pointer(query), pointer(array), array.shape[1], 1, len(array), K, pointer(scores), pointer(rows)
    )


def churn(rows: int, width: int) -> None:
    """Allocate and free what a program allocates and frees around an index (a batch of embeddings, its
    normalised copy, a numpy copy), three times: later allocations of that size then reuse freed memory."""
    for _ in range(3):
        batch = torch.randn(rows, width)
        copy = np.array(torch.nn.functional.normalize(batch, dim=1).numpy())
        del batch, copy


def measure(rows: int, width: int, queries: int, rounds: int, folder: Path, churned: bool) -> list[str]:
    """Markdown table rows for one shape (after `churn` when `churned`)."""
    generator = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(rows, width, generator=generator), dim=1).numpy()
    if churned:
        churn(rows, width)
    held = memories(unit, folder)
    names = list(held)
    query_rows = unit[:queries].copy()
    times = {name: [] for name in names}
    for _ in range(rounds):
        totals = dict.fromkeys(names, 0.0)
        for turn in range(queries):
            for position, name in enumerate(names):  # each memory starts at its own share of the queries
                query = query_rows[(turn + position * queries // len(names)) % queries][None]
                started = time.perf_counter()
                scan(held[name][0], query)
                totals[name] += time.perf_counter() - started
        for name in names:
            times[name].append(totals[name] / queries)
    base = times[names[0]]
    lines = []
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base, strict=True))
        median = statistics.median(times[name]) * 1e6
        state = "after churn" if churned else "as allocated"
        huge = huge_page_mib(held[name][0])
        lines.append(f"| {rows:,} x {width} | {state} | {name} | {median:,.0f} | {ratio:.2f}x | {huge} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["100000x768", "100000x48", "18976x128", "18976x8"],
        help="ROWSxWIDTH shapes to scan (the retrieval tables' full widths and D/16 prefixes)",
    )
    parser.add_argument("--queries", type=int, default=32, help="single queries per round")
    parser.add_argument("--rounds", type=int, default=3)
    add_docs_flag(parser, "docs/retrieval.md", "scan-memory")
    args = parser.parse_args()
    shapes = []
    for shape in args.shapes:
        try:
            rows, width = (int(part) for part in shape.lower().split("x"))
        except ValueError:
            parser.error(f"--shapes takes ROWSxWIDTH, like 100000x768; got {shape!r}.")
        shapes.append((rows, width))
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    with recorded(args.docs, "scan-memory"), tempfile.TemporaryDirectory() as folder:
        print(f"transparent huge pages: {setting.read_text().strip() if setting.is_file() else 'not on this system'}")
        print(
            f"one query, k = {K}, faiss.knn_inner_product on 1 thread; median over {args.rounds} rounds of "
            f"{args.queries} queries, the memories taking turns query by query\n"
        )
        print("| vectors | process | memory | µs per query | time / huge_page_array's | huge pages, MiB |")
        print("|---|---|---|---|---|---|")
        for rows, width in shapes:
            for churned in (False, True):
                for line in measure(rows, width, args.queries, args.rounds, Path(folder), churned):
                    print(line, flush=True)


if __name__ == "__main__":
    main()

"""EmbeddingIndex on FAISS: prefix search vs brute force, funnels (exact, HNSW, IVF-PQ first stages) vs full-width
exact search, index folders (lazy loading, streaming from extract shards, append = rebuild), model fingerprints,
every documented way of embedding a query, errors."""

import copy
import gc
import json
import logging
import runpy
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from franca_hf import FrancaModel, retrieval, retrieval_settings
from franca_hf.cli import main
from franca_hf.errors import OutputExistsError, UsageError
from franca_hf.fingerprint import ModelMismatchError
from franca_hf.modeling.image_processing_franca import make_image_processor
from franca_hf.retrieval import (
    EmbeddingIndex,
    build_index,
    default_funnel,
    index_from_features,
    index_images,
)
from franca_hf.retrieval_settings import AnnSettings

from .conftest import EXAMPLE_IMAGES, tiny_config

WIDTH, DIMS = 128, [8, 16, 32, 64, 128]


def gaussian(size: int, queries: int, decay: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Database and queries (noisy copies of database rows) whose channel i has std (i + 1) ** -decay; database rows
    are scaled by random factors in [0.5, 5), which cosine similarity must ignore.

    decay = 0 is isotropic: a prefix says little about the full vector. decay = 1.5 is nested: the first 8 of 128
    channels carry 99% of the variance, so a short prefix already ranks well, as in a Matryoshka embedding; the
    remaining 1% still reorders neighbours (8-channel prefix search finds only about 80% of the true top-10).
    """
    gen = torch.Generator().manual_seed(seed)
    spectrum = (torch.arange(WIDTH) + 1.0) ** -decay
    database = torch.randn(size, WIDTH, generator=gen) * spectrum
    sources = torch.randint(size, (queries,), generator=gen)
    queries = database[sources] + 0.3 * torch.randn(queries, WIDTH, generator=gen) * spectrum
    return database * (0.5 + 4.5 * torch.rand(size, 1, generator=gen)), queries


def assert_exact_top_k(scores: torch.Tensor, found: torch.Tensor, database, queries, dim: int) -> None:
    """`found` is a true top-k at prefix `dim`, best first, and `scores` are its cosines; computed independently in
    float64 (truncate, L2-normalise, one dense product). Near-ties (< 1e-6) may come in either order."""
    similarity = F.normalize(queries[:, :dim].double(), dim=1) @ F.normalize(database[:, :dim].double(), dim=1).T
    best = similarity.topk(found.shape[1], dim=1).values
    torch.testing.assert_close(similarity.gather(1, found), best, atol=1e-6, rtol=0)
    torch.testing.assert_close(scores.double(), best, atol=1e-6, rtol=0)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (found.unsqueeze(2) == truth.unsqueeze(1)).any(dim=2).float().mean().item()


EXACT = AnnSettings(ann="none")


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS on one thread: a second OpenMP thread on a shared CPU makes k-means (IVF-PQ training) 4x slower, and
    HNSW insertion with one thread is deterministic (an append then equals a rebuild byte for byte)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(params=["one block", "many blocks"])
def tiles(request, monkeypatch):
    """Run with the default fill block (one block here) and with a tiny one (several blocks and a ragged last one
    when prefix copies and first stages are filled from the vectors)."""
    if request.param == "many blocks":
        monkeypatch.setattr(retrieval, "FILL_BLOCK", 700)
    return request.param


def test_prefix_search_equals_brute_force(tiles):
    database, queries = gaussian(3000, 40, decay=0.5)
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    for dim in DIMS:
        for cut in (queries, queries[:, :dim]):  # full-width queries, or already truncated to the prefix
            assert_exact_top_k(*index.search(cut, k=7, dim=dim), database, queries, dim)


@pytest.mark.parametrize(
    "stages",
    [None, [(8, 200), (128, 10)], [(8, 100), (32, 30), (128, 10)], [(8, 60), (16, 40), (32, 20), (64, 15), (128, 10)]],
    ids=["default", "adaptive", "funnel-3", "funnel-5"],
)
def test_funnel_returns_exact_top_k_on_nested_embeddings(tiles, stages):
    database, queries = gaussian(3000, 40, decay=1.5)
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    scores, found = index.funnel_search(queries, k=10, stages=stages)
    measured = recall(found, index.search(queries, k=10)[1])
    print(f"funnel {stages or default_funnel(DIMS, 10)}: recall@10 = {measured:.4f} vs full-dimension exact search")
    assert measured == 1.0  # the 10th and 11th true neighbours differ by > 1e-5 here: no rounding ties
    assert_exact_top_k(scores, found, database, queries, WIDTH)


def test_funnel_recall_drops_when_prefixes_carry_no_information():
    """The control for the test above: on isotropic data an 8-of-128 prefix shortlist misses most true neighbours,
    so exact funnel results on nested data come from the nesting, not from the shortlist covering everything."""
    stages, recalls = [(8, 30), (32, 15), (128, 10)], {}
    for name, decay in (("nested", 1.5), ("isotropic", 0.0)):
        database, queries = gaussian(3000, 40, decay)
        index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
        recalls[name] = recall(index.funnel_search(queries, 10, stages)[1], index.search(queries, 10)[1])
    print(f"funnel {stages}: recall@10 {recalls}")
    assert recalls["nested"] >= 0.95 and recalls["isotropic"] < 0.5


def float64_cascade(database, queries, stages) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and rows (Q, size) of the last of `stages` [(dim, size), ...], each keeping the best `size` of the
    previous shortlist by cosine at its prefix, in float64."""
    shortlist = torch.arange(len(database)).expand(len(queries), -1)
    for dim, size in stages:
        unit_db = F.normalize(database[:, :dim].double(), dim=1)[shortlist]  # (Q, shortlist, dim)
        similarity = (unit_db @ F.normalize(queries[:, :dim].double(), dim=1).unsqueeze(2)).squeeze(2)
        best, pick = similarity.topk(size, dim=1)
        shortlist = shortlist.gather(1, pick)
    return best, shortlist


def test_funnel_follows_its_cascade_on_isotropic_embeddings(tiles):
    """Each stage keeps exactly the best `size` of the previous shortlist at its prefix: a float64 re-derivation."""
    database, queries = gaussian(2000, 30, decay=0.0)
    stages = [(8, 40), (32, 20), (128, 10)]
    best, shortlist = float64_cascade(database, queries, stages)
    scores, found = EmbeddingIndex(database, dims=DIMS, settings=EXACT).funnel_search(queries, 10, stages)
    assert torch.equal(found, shortlist)
    torch.testing.assert_close(scores.double(), best, atol=1e-6, rtol=0)


def test_funnel_of_unit_embeddings_follows_its_cascade_in_memory_and_memory_mapped(tmp_path):
    """An index of unit-norm embeddings (what `get_image_embeddings` makes) reranks at full width in FAISS, reading
    the shortlisted rows in place: the cascade of a float64 re-derivation for a batch of queries, from RAM and from
    the memory map. Shortlists longer than the index rerank every row: exact search."""
    database, queries = gaussian(2000, 30, decay=0.5)
    database, queries = F.normalize(database, dim=1), F.normalize(queries, dim=1)
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.manifest.unit and isinstance(loaded._array, np.memmap)
    for stages in ([(8, 40), (32, 20), (128, 10)], [(16, 60), (128, 10)]):
        best, shortlist = float64_cascade(database, queries, stages)
        for searched in (index, loaded):
            scores, found = searched.funnel_search(queries, 10, stages)
            assert torch.equal(found, shortlist)
            torch.testing.assert_close(scores.double(), best, atol=1e-6, rtol=0)
    exact = index.search(queries, 10)
    for searched in (index, loaded):
        scores, found = searched.funnel_search(queries, 10, [(8, 5000), (128, 3000)])
        assert torch.equal(found, exact[1])
        torch.testing.assert_close(scores, exact[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("ann", ["none", "hnsw", "ivfpq"])
def test_searches_ignore_the_query_scale_and_take_numpy_arrays(ann):
    """Cosine rankings do not depend on the query's scale, so every stage ranks with the raw query prefix and only
    the returned scores are divided by its norm: a power-of-two scale (exact in float) gives identical results, any
    other scale the same rows; numpy queries give what tensors give, as numpy arrays."""
    database, queries = gaussian(3000, 8, decay=1.0)
    index = EmbeddingIndex(database, dims=DIMS, settings=ANN[ann])
    searches = {
        "search": lambda q: index.search(q, 10),
        "search at 16": lambda q: index.search(q, 10, 16),
        "default funnel": lambda q: index.funnel_search(q, 10),
        "funnel to 64": lambda q: index.funnel_search(q, 10, [(8, 100), (32, 30), (64, 10)]),
    }
    for name, search in searches.items():
        scores, found = search(queries)
        arrays = search(queries.numpy())
        assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays), name
        for same in (tuple(map(torch.from_numpy, arrays)), search(8 * queries), search(queries.double() / 4)):
            assert torch.equal(same[1], found) and torch.equal(same[0], scores), name
        scaled = search(3.3 * queries)
        assert torch.equal(scaled[1], found), name
        torch.testing.assert_close(scaled[0], scores, atol=1e-6, rtol=0)


def test_the_three_exact_kernels_agree(tiles, monkeypatch):
    """One query (FAISS's scan, or at a width of `TRANSPOSED_WIDTHS` its transposed kernel, checked by FAISS's norms),
    a few (FAISS's scan) and a batch (`blocked_top_k`'s matrix products) find the same rows with the same cosines, each
    a true top-k; the blocked kernels over several blocks of queries and rows, a ragged last one of each, find what
    FAISS's own scan finds."""
    database, queries = gaussian(3000, 2 * retrieval.BLOCKED_MIN_QUERIES, decay=0.5)
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    blocked_calls = []  # (queries, width) of each call to the blocked kernels: which searches take them

    def blocked_top_k(cut, database, k):
        blocked_calls.append(cut.shape)
        return real_blocked_top_k(cut, database, k)

    real_blocked_top_k = retrieval.blocked_top_k
    monkeypatch.setattr(retrieval, "blocked_top_k", blocked_top_k)
    searches = lambda q: index.search(q, 7, 16), lambda q: index.funnel_search(q, 7, [(8, 60), (64, 7)])
    for search, width in zip(searches, (16, 8), strict=True):
        blocked_calls.clear()
        batch = search(queries)
        assert blocked_calls == [(len(queries), width)]
        few = [search(queries[start : start + 3]) for start in range(0, len(queries), 3)]
        assert blocked_calls == [(len(queries), width)]  # a few queries: FAISS's scan
        alone = [search(query[None]) for query in queries]
        one_blocked = width in retrieval.TRANSPOSED_WIDTHS  # one query at width 8: the transposed kernel
        assert blocked_calls == [(len(queries), width)] + [(1, width)] * len(queries) * one_blocked
        for results in (few, alone):
            assert torch.equal(torch.cat([found for _, found in results]), batch[1])
            torch.testing.assert_close(torch.cat([scores for scores, _ in results]), batch[0], atol=1e-6, rtol=0)
    assert_exact_top_k(*index.search(queries, 7, 16), database, queries, 16)

    import faiss

    monkeypatch.setattr(retrieval, "BLOCKED_ROWS", 700)
    monkeypatch.setattr(retrieval, "BLOCKED_PRODUCTS", 800)
    monkeypatch.setattr(retrieval, "BLOCKED_QUERIES", 13)
    for dim, count in ((32, len(queries)), (8, 1)):
        unit = index.prefix(dim).numpy()
        cut = np.ascontiguousarray(queries[:count, :dim].numpy())
        scores, rows = real_blocked_top_k(cut, unit, 9)
        want_scores, want_rows = faiss.knn(cut, unit, 9, metric=faiss.METRIC_INNER_PRODUCT)
        assert np.array_equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, atol=1e-6, rtol=0)


def test_the_half_precision_scan_gives_the_float_scans_answer(tiles, monkeypatch):
    """A few queries over a table of HALF_SCAN_MIN_BYTES read its half-precision copy: the shortlist, rescored and
    settled by the bound, is FAISS's float scan's answer bit for bit (scores and rows, duplicate rows among the
    results and at the k-th place), in search and as a funnel's first stage (at width 32, the size limit lifted); a query the bound cannot settle (a shortlist of equal rows) is
    scanned again in float32. `prepare` makes the copies before any search. The copy is made at widths that are multiples of 8, for tables this large, short lists,
    one thread per query, and only with half_scan on."""
    import faiss

    rows = retrieval.HALF_SCAN_MIN_BYTES // (4 * WIDTH)
    database, queries = gaussian(rows, 6, decay=0.5)
    database[100:150] = database[5000:5050]  # duplicates, found by the queries below in pairs of equal scores
    queries[:3] = database[120:123] + 0.01 * torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))
    database[7000:7030] = database[7030]  # 31 equal rows: the shortlist of a query equal to them is all ties
    queries[5] = database[7030]
    centre, gen = database[9000], torch.Generator().manual_seed(2)  # 9 rows close to query 4, then two equal rows
    database[9001:9009] = centre + 0.01 * centre.norm() * torch.randn(8, WIDTH, generator=gen) / WIDTH**0.5
    database[300] = database[9100] = centre + 0.03 * centre.norm() * torch.randn(WIDTH, generator=gen)
    queries[4] = centre
    dims = [12, 32, WIDTH]
    index = EmbeddingIndex(database, dims=dims, settings=EXACT)
    floats = EmbeddingIndex(database, dims=dims, settings=AnnSettings("none", half_scan=False))
    calls = []  # ("half" | "float", queries) of each scan

    real_half, real_float = retrieval.HalfPrecisionScan.top_k, retrieval.float_top_k

    def half_top_k(scan, cut, *args, **kwargs):
        calls.append(("half", len(cut)))
        return real_half(scan, cut, *args, **kwargs)

    def float_top_k(cut, *args):
        calls.append(("float", len(cut)))
        return real_float(cut, *args)

    monkeypatch.setattr(retrieval.HalfPrecisionScan, "top_k", half_top_k)
    monkeypatch.setattr(retrieval, "float_top_k", float_top_k)
    for k in (10, 100):
        for batch in (queries[:1], queries[4:5], queries[:5]):
            calls.clear()
            got, want = index.search(batch, k), floats.search(batch, k)
            assert calls[0] == ("half", len(batch)) and len(calls) == 2  # the float calls: `floats`'s own scan
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(set(index.search(queries[:3], 10)[0][0].tolist())) < 10  # ties among the results
    assert index.search(queries[4:5], 10)[1][0, -1] == 300  # of two equal rows at the k-th place, the first one
    calls.clear()
    got, want = index.search(queries[5:], 10), floats.search(queries[5:], 10)
    assert calls == [("half", 1), ("float", 1), ("float", 1)]  # unsettled: scanned again in float32
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert index.copy_bytes(WIDTH) == rows * WIDTH * (4 + 2)  # the unit copy and the half copy of scaled rows
    assert floats.copy_bytes(WIDTH) == rows * WIDTH * 4
    ready = EmbeddingIndex(database, dims=dims, settings=EXACT)
    assert ready.prepare([32, WIDTH]) == rows * (32 * 4 + WIDTH * 6)  # made before any search (no half copy at 32)
    calls.clear()
    assert torch.equal(ready.search(queries[:1], 10)[1], floats.search(queries[:1], 10)[1])
    assert calls[0] == ("half", 1) and ready.copy_bytes(WIDTH) == rows * WIDTH * 6

    calls.clear()
    index.search(queries[:3], 10, 12)  # width 12: FAISS's fp16 kernel is not SIMD there
    index.search(queries[:3], 10, 32)  # a table of 4 MiB at width 32: in the caches, the float scan is faster
    index.search(queries[:1], rows // retrieval.HALF_SCAN_MAX_SHARE, WIDTH)  # a long list
    faiss.omp_set_num_threads(2)  # FAISS would share out one query's rows among threads
    index.search(queries[:1], 10, WIDTH)
    faiss.omp_set_num_threads(1)
    assert [name for name, _ in calls] == ["float"] * 4
    assert index._half_scans[12] is None and index._half_scans[32] is None
    monkeypatch.setattr(retrieval, "HALF_SCAN_MIN_BYTES", 0)  # a funnel's first stage at width 32
    stages = [(32, 50), (WIDTH, 10)]
    calls.clear()
    got = EmbeddingIndex(database, dims=dims, settings=EXACT).funnel_search(queries[:2], 10, stages)
    want = floats.funnel_search(queries[:2], 10, stages)
    assert calls[0] == ("half", 2) and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.setattr(retrieval, "physical_memory", lambda: rows * 8 * 4 - 1)  # no more than a quarter of RAM
    assert EmbeddingIndex(database, dims=dims, settings=EXACT)._half_scan(WIDTH, 10) is None


def test_a_sharded_half_precision_copy_searched_in_parallel_answers_as_the_float_scan_on_one_thread(monkeypatch):
    """A copy made while FAISS runs 2 threads is made in 2 shards (consecutive row ranges). One query, which FAISS would share out among its threads, searches the shards in
    parallel; several queries search them one after another. Either way the answer is the float scan's on one thread,
    bit for bit: duplicate rows in both shards, equal rows on either side of the boundary at the k-th place (the
    first one kept), and a query the bound cannot settle (equal rows across the boundary) is scanned again by FAISS."""
    import faiss

    rows = retrieval.HALF_SCAN_MIN_BYTES // (4 * WIDTH)
    middle = rows // 2  # the first row of the second shard
    database, queries = gaussian(rows, 4, decay=0.5)
    database[middle + 100 : middle + 150] = database[100:150]
    queries[0] = database[120] + 0.01 * torch.randn(WIDTH, generator=torch.Generator().manual_seed(1))
    centre, gen = database[9000], torch.Generator().manual_seed(2)  # 9 rows close to query 1, then two equal rows
    database[9001:9009] = centre + 0.01 * centre.norm() * torch.randn(8, WIDTH, generator=gen) / WIDTH**0.5
    database[300] = database[middle + 300] = centre + 0.03 * centre.norm() * torch.randn(WIDTH, generator=gen)
    queries[1] = centre
    database[middle - 15 : middle + 16] = database[2000]  # 32 equal rows, 31 across the boundary
    queries[2] = database[2000]
    floats = EmbeddingIndex(database, dims=DIMS, settings=AnnSettings("none", half_scan=False))
    want = [floats.search(queries[i : i + 1], 10) for i in range(4)]
    calls = []
    real_half, real_float = retrieval.HalfPrecisionScan.top_k, retrieval.float_top_k
    monkeypatch.setattr(
        retrieval.HalfPrecisionScan,
        "top_k",
        lambda scan, cut, *args, **kwargs: (
            calls.append(("half", len(cut), kwargs["parallel"])) or real_half(scan, cut, *args, **kwargs)
        ),
    )
    monkeypatch.setattr(
        retrieval, "float_top_k", lambda cut, *args: calls.append(("float", len(cut))) or real_float(cut, *args)
    )
    faiss.omp_set_num_threads(2)
    try:
        index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
        index.prepare([WIDTH])
        assert index._half_scans[WIDTH].shards == 2 and index.copy_bytes(WIDTH) == rows * WIDTH * (4 + 2)
        for query in (0, 1, 3):
            calls.clear()
            got = index.search(queries[query : query + 1], 10)
            assert calls == [("half", 1, True)]  # settled by the bound
            assert torch.equal(got[0], want[query][0]) and torch.equal(got[1], want[query][1])
        assert len(set(index.search(queries[:1], 10)[0][0].tolist())) < 10  # ties among the results
        assert index.search(queries[1:2], 10)[1][0, -1] == 300  # of two equal rows at the k-th place, the first
        equal_rows = {2000, *range(middle - 15, middle + 16)}
        calls.clear()
        got = index.search(queries[2:3], 10)  # rescanned by FAISS, its rows shared out among threads
        assert calls == [("half", 1, True), ("float", 1)] and set(got[1][0].tolist()) <= equal_rows
        calls.clear()
        got = index.search(queries, 10)  # four queries: each on a thread of FAISS's, shard after shard
        assert calls[0] == ("half", 4, False) and set(got[1][2].tolist()) <= equal_rows
        # (a batch's query norms come from one matrix product, one query's from FAISS's norm: the float scan of the
        # same batch is the answer to compare with)
        want = floats.search(queries, 10)
        for query in (0, 1, 3):
            assert torch.equal(got[0][query], want[0][query]) and torch.equal(got[1][query], want[1][query])
    finally:
        faiss.omp_set_num_threads(1)


def test_the_principal_bound_scan_gives_the_float_scans_answer(tiles, monkeypatch):
    """A few queries over a table in the caches whose principal axes hold the rows' energy read a narrow table of
    bounds (`PrincipalBoundScan`): every bound, slack included, is at least the float scan's score of its row; the
    answer is FAISS's float scan's bit for bit (duplicate rows among the results, equal rows at the k-th place, a
    query equal to 31 rows), in one pass or, from a first floor left with too few rows, in two; a query whose bounds
    leave too many rows is scanned in float32. Made on first use or by `prepare`, counted by `copy_bytes`; not made for
    isotropic rows, a table past HALF_SCAN_MIN_BYTES, a k above N / BOUND_SCAN_MAX_SHARE, or bound_scan off."""
    import faiss

    rows = 4000
    database, queries = gaussian(rows, 6, decay=1.0)  # beyond the first 16 of 128 channels: 6 % of the energy
    database[100:150] = database[2000:2050]
    queries[:3] = database[120:123] + 0.01 * torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))
    database[3000:3030] = database[3030]  # 31 equal rows
    queries[5] = database[3030]
    centre, gen = database[1000], torch.Generator().manual_seed(2)  # 9 rows close to query 4, then two equal rows
    database[1001:1009] = centre + 0.01 * centre.norm() * torch.randn(8, WIDTH, generator=gen) / WIDTH**0.5
    database[300] = database[1100] = centre + 0.03 * centre.norm() * torch.randn(WIDTH, generator=gen)
    queries[4] = centre
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    floats = EmbeddingIndex(database, dims=DIMS, settings=AnnSettings("none", bound_scan=False))
    calls = []  # "bound" | "float" | "rescore" for each call
    real_bound, real_float = retrieval.PrincipalBoundScan.top_k, retrieval.float_top_k
    real_rescore = faiss.knn_inner_products_by_idx

    def rescore(*args):
        calls.append("rescore")
        return real_rescore(*args)

    monkeypatch.setattr(
        retrieval.PrincipalBoundScan, "top_k", lambda *a: calls.append(("bound", len(a[1]))) or real_bound(*a)
    )
    monkeypatch.setattr(
        retrieval, "float_top_k", lambda cut, *a: calls.append(("float", len(cut))) or real_float(cut, *a)
    )
    monkeypatch.setattr(faiss, "knn_inner_products_by_idx", rescore)
    for k in (1, 10, rows // retrieval.BOUND_SCAN_MAX_SHARE):
        for batch in (queries[:1], queries[4:5], queries[5:6], queries):
            calls.clear()
            got, want = index.search(batch, k), floats.search(batch, k)
            assert calls[0] == ("bound", len(batch)) and calls[-1] == ("float", len(batch))  # floats' own scan
            assert set(calls[1:-1]) == {"rescore"} and len(batch) <= len(calls) - 2 <= 2 * len(batch)  # 1 or 2 passes
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(set(index.search(queries[:3], 10)[0][0].tolist())) < 10  # ties among the results
    assert index.search(queries[4:5], 10)[1][0, -1] == 300  # of two equal rows at the k-th place, the first one
    assert set(index.search(queries[5:6], 10)[1][0].tolist()) <= {3030, *range(3000, 3030)}
    scan = index._bound_scans[WIDTH]
    channels = scan.kept + retrieval.BOUND_SCAN_SEGMENTS  # the first coordinates, then the segment norms
    assert scan.table.shape == (channels, rows) and channels <= WIDTH // 4
    assert index.copy_bytes(WIDTH) == rows * (WIDTH + channels) * 4  # the unit copy of scaled rows, the table

    # every bound, with its slack, is at least the float scan's score (FAISS's kernel), for queries of any scale
    unit = index.prefix(WIDTH).numpy()
    scaled = np.ascontiguousarray(queries.numpy() * np.array([[1e-30], [1], [1], [7], [1], [300]], np.float32))
    bounds = torch.mm(torch.from_numpy(scan.bound_rows(scaled)), scan.table).numpy()
    scores = np.empty((len(scaled), rows), np.float32)
    for query, row in zip(scaled, scores, strict=True):
        faiss.fvec_inner_products_ny(faiss.swig_ptr(row), faiss.swig_ptr(query), faiss.swig_ptr(unit), WIDTH, rows)
    norms = np.linalg.norm(scaled.astype(np.float64), axis=1, keepdims=True)  # the first one's squares underflow
    assert (bounds + norms * scan.slack >= scores).all()
    got, want = index.search(scaled[:1], 10), floats.search(scaled[:1], 10)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert ((bounds - scores) / norms).mean() < 0.1  # and tight: 0.06 of the query's norm on average here

    monkeypatch.setattr(retrieval, "BOUND_SCAN_SPARE", 1)  # a first floor with about k rows above it: two passes
    for query in queries[:5]:
        calls.clear()
        got, want = index.search(query[None], 10), floats.search(query[None], 10)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert calls.count("rescore") == 2  # the second pass, whose floor is the k-th score less the slack, settles
    monkeypatch.setattr(retrieval, "BOUND_SCAN_SPARE", 4)
    monkeypatch.setattr(retrieval, "BOUND_SCAN_SHORTLIST_SHARE", rows // 2)  # shortlists of 2 rows at most
    calls.clear()
    got, want = index.search(queries[1:3], 1), floats.search(queries[1:3], 1)
    assert calls == [("bound", 2), ("float", 1), ("float", 1), ("float", 2)] and torch.equal(got[1], want[1])

    ready = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    assert ready.prepare([WIDTH]) == rows * (WIDTH + channels) * 4  # made before any search
    calls.clear()
    ready.search(queries[:1], rows // 64 + 1)  # a long list
    assert calls == [("float", 1)]
    isotropic, _ = gaussian(rows, 1, decay=0.0)
    assert EmbeddingIndex(isotropic, dims=DIMS, settings=EXACT)._bound_scan(WIDTH, 10) is None
    assert (
        EmbeddingIndex(database, dims=DIMS, settings=AnnSettings("none", bound_scan=False))._bound_scan(WIDTH, 10)
        is None
    )
    monkeypatch.setattr(retrieval, "HALF_SCAN_MIN_BYTES", rows * WIDTH * 4)  # a table past the caches
    assert (
        EmbeddingIndex(database, dims=DIMS, settings=AnnSettings("none", half_scan=False))._bound_scan(WIDTH, 10)
        is None
    )


def test_the_principal_bound_scan_answers_as_the_float_scan_on_one_thread_whatever_faiss_threads(monkeypatch):
    """With FAISS on 2 threads, one query over 10,000 rows or more is a query FAISS shares out among its threads: the
    table of bounds still answers as the float scan on one thread, bit for bit, and as FAISS's shared-out scan up to
    the last bits of its scores; its products run on torch's threads."""
    import faiss

    rows = 12_000
    database, queries = gaussian(rows, 8, decay=1.0, seed=3)
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    floats = EmbeddingIndex(database, dims=DIMS, settings=AnnSettings("none", bound_scan=False))
    one_thread = [floats.search(query[None], 10) for query in queries]
    calls = []
    real_bound = retrieval.PrincipalBoundScan.top_k
    monkeypatch.setattr(retrieval.PrincipalBoundScan, "top_k", lambda *a: calls.append(len(a[1])) or real_bound(*a))
    faiss.omp_set_num_threads(2)
    try:
        assert retrieval.faiss_splits_rows(1, rows)
        for query, want in zip(queries, one_thread, strict=True):
            got, shared = index.search(query[None], 10), floats.search(query[None], 10)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            torch.testing.assert_close(got[0], shared[0], atol=1e-6, rtol=0)
    finally:
        faiss.omp_set_num_threads(1)
    assert calls == [1] * len(queries)


def test_exact_kernels_keep_to_faiss_when_torch_may_multiply_float32_in_bfloat16(monkeypatch):
    """`torch.set_float32_matmul_precision("medium")` lets oneDNN multiply float32 in bfloat16 on CPUs that have it:
    then neither the table of bounds nor the blocked matrix products (torch's) serve exact scans, FAISS's own kernels
    do, with the same answers."""
    database, queries = gaussian(4000, 20, decay=1.0)
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    want = [index.search(queries[:1], 10), index.search(queries, 10)]
    calls = []
    monkeypatch.setattr(retrieval.PrincipalBoundScan, "top_k", lambda *a: calls.append("bound"))
    monkeypatch.setattr(retrieval, "blocked_top_k", lambda *a: calls.append("blocked"))
    torch.set_float32_matmul_precision("medium")
    try:
        assert not retrieval.torch_products_in_float32()
        got = [index.search(queries[:1], 10), index.search(queries, 10)]
    finally:
        torch.set_float32_matmul_precision("highest")
    assert calls == [] and retrieval.torch_products_in_float32()
    for (got_scores, got_rows), (want_scores, want_rows) in zip(got, want, strict=True):
        assert torch.equal(got_rows, want_rows)
        torch.testing.assert_close(got_scores, want_scores, atol=1e-6, rtol=0)


def test_float32_below_is_the_largest_float32_at_most_its_value():
    values = np.random.default_rng(0).normal(size=2000) * np.logspace(-30, 30, 2000)
    for value in [*values.tolist(), 0.0, 1.0, -1.0, float(np.float32(0.1))]:
        below = retrieval.float32_below(value)
        assert below == float(np.float32(below)) and below <= value
        assert float(np.nextafter(np.float32(below), np.float32(np.inf))) > value


def test_single_stage_funnel_is_prefix_search():
    database, queries = gaussian(500, 5, decay=1.0)
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    for got, want in zip(index.funnel_search(queries, 5, [(16, 5)]), index.search(queries, 5, 16), strict=True):
        assert torch.equal(got, want)


def test_no_queries_give_empty_results():
    index = EmbeddingIndex(gaussian(100, 1, decay=1.0)[0], dims=DIMS)
    for scores, indices in (index.search(torch.empty(0, WIDTH), 5), index.funnel_search(torch.empty(0, WIDTH), 5)):
        assert scores.shape == indices.shape == (0, 5)


def test_prefix_vectors_are_truncated_then_normalised():
    database, _ = gaussian(50, 1, decay=1.0)
    torch.testing.assert_close(
        EmbeddingIndex(database, dims=DIMS, settings=EXACT).prefix(16), F.normalize(database[:, :16], dim=1)
    )


def test_the_index_copies_what_it_is_given_into_a_huge_page_buffer_and_keeps_memory_maps_in_place(tmp_path):
    database, queries = gaussian(200, 4, decay=1.0)
    array = database.numpy().copy()
    database.numpy().tofile(tmp_path / "vectors.f32")
    buffer = retrieval.huge_page_array(*array.shape)
    buffer[:] = array
    kept = {
        "memory map": np.memmap(tmp_path / "vectors.f32", np.float32, "r", shape=array.shape),
        "huge-page buffer": buffer,
        "a view of one": buffer[50:],
    }
    for name, vectors in kept.items():
        assert np.shares_memory(EmbeddingIndex(vectors, dims=DIMS)._array, vectors), name
    copied = {
        "numpy array": array,
        "torch tensor": database,
        "float64 array": array.astype(np.float64),
        "strided view": array[::2],
        "bytes": np.frombuffer(array.tobytes(), np.float32).reshape(array.shape),
    }
    want = EmbeddingIndex(buffer, dims=DIMS).search(queries, 5)
    for name, vectors in copied.items():
        index = EmbeddingIndex(vectors, dims=DIMS)
        held = np.asarray(vectors)
        assert retrieval.on_memory_map(index._array) and not np.shares_memory(index._array, held), name
        np.testing.assert_array_equal(index._array, held.astype(np.float32), err_msg=name)
        if len(vectors) == len(array):
            for got, expected in zip(index.search(queries, 5), want, strict=True):
                torch.testing.assert_close(got, expected)
    assert retrieval.on_memory_map(index._unit_prefix(16))  # the prefix copies too


def test_huge_page_buffers_are_advised_for_transparent_huge_pages():
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not setting.is_file() or "[never]" in setting.read_text():
        pytest.skip("this kernel has no transparent huge pages to ask for")
    buffer = retrieval.huge_page_array(1024, 1024)  # 4 MiB: holds at least one aligned 2 MiB page
    buffer[:] = 1.0
    address, eligible = buffer.ctypes.data, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "THPeligible:":
            eligible = line.split()[1]
    assert eligible == "1"


ANN = {
    "none": EXACT,
    "hnsw": AnnSettings(ann="hnsw", hnsw_m=16),
    "ivfpq": AnnSettings(ann="ivfpq", nlist=16, nprobe=8, pq_bytes=4, half_scan=False, bound_scan=False),
}


@pytest.mark.parametrize("ann", ANN)
def test_save_load_round_trip_is_exact_and_lazy(tmp_path, ann):
    database, queries = gaussian(3000, 8, decay=1.0)
    ids = [f"photos/été/{i:04d}.jpg" for i in range(3000)]
    index = EmbeddingIndex(database, ids, dims=DIMS, settings=ANN[ann])
    path = tmp_path / "index"
    index.save(path)
    EmbeddingIndex(database[:100], dims=DIMS).save(path)  # overwriting works …
    index.save(path)  # … and the last write wins
    loaded = EmbeddingIndex.load(path)
    # opening reads the manifest only: the vectors are memory-mapped, ids and the FAISS first stage wait for use
    assert isinstance(loaded._array, np.memmap) and loaded._ids is None and loaded._first is None
    assert len(loaded) == 3000 and loaded.dims == DIMS and loaded.settings == index.settings
    assert torch.equal(loaded.vectors, index.vectors) and loaded.ids == ids
    for got, want in zip(loaded.funnel_search(queries, 5), index.funnel_search(queries, 5), strict=True):
        assert torch.equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    (tmp_path / "plain").write_bytes(b"")  # the index gets the permissions of any new file (umask), not 0600
    assert (path / "vectors.f32").stat().st_mode == (tmp_path / "plain").stat().st_mode
    manifest = json.loads((path / "index.json").read_text())
    assert manifest["settings"].pop("half_scan") is ANN[ann].half_scan
    assert manifest["settings"].pop("bound_scan") is ANN[ann].bound_scan
    (path / "index.json").write_text(json.dumps(manifest))  # an index saved before the settings: the defaults, on
    assert EmbeddingIndex.load(path).settings == replace(index.settings, half_scan=True, bound_scan=True)
    # an index saved before settings kept to their kind's knobs (an HNSW graph's nlist and pq_bytes resolved too)
    # shows its own kind's knobs, and its settings build a new index as they are
    if ann != "ivfpq":
        manifest["settings"].update(nlist=128, pq_bytes=24, exact_below=5)
    (path / "index.json").write_text(json.dumps(manifest))
    older = EmbeddingIndex.load(path).settings
    assert older == replace(index.settings, half_scan=True, bound_scan=True)
    assert EmbeddingIndex(database[:500], dims=DIMS, settings=older).settings == older


@pytest.mark.parametrize("ann", ["hnsw", "ivfpq"])
def test_ann_first_stages_find_the_exact_top_k_after_the_rerank(ann):
    """An approximate shortlist at D/16 reranked exactly at D: nearly all of the exact top-10 on nested data, with
    exact scores for what it returns."""
    database, queries = gaussian(3000, 40, decay=1.5)
    index = EmbeddingIndex(database, dims=DIMS, settings=ANN[ann])
    scores, found = index.funnel_search(queries, k=10)
    measured = recall(found, index.search(queries, k=10)[1])
    print(f"{ann}: recall@10 = {measured:.4f}")
    assert measured >= 0.97
    similarity = F.normalize(queries.double(), dim=1) @ F.normalize(database.double(), dim=1).T
    torch.testing.assert_close(scores.double(), similarity.gather(1, found), atol=1e-5, rtol=0)


def test_ivfpq_trained_on_too_few_rows_says_so_once_in_words(caplog, capfd):
    """FAISS's k-means prints a line of its own per byte of code under 39 training rows a centroid (256 x 39 = 9,984
    for 8-bit codes); the build logs one warning instead, with the fix, and the index is the one FAISS alone builds."""
    database, queries = gaussian(3000, 4, decay=1.0)
    settings = AnnSettings(ann="ivfpq", nlist=16, pq_bytes=4)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="franca_hf"):
        index = EmbeddingIndex(database, dims=DIMS, settings=settings)
        index.first_stage()
    assert "WARNING clustering" not in capfd.readouterr().err
    assert caplog.text.count("ann='ivfpq' trains 16 cells and a code of 256 centroids per byte on 3000 rows") == 1
    assert "fewer than the 9984 (39 a centroid) FAISS's k-means asks for" in caplog.text
    plain = retrieval.new_first_stage(index.settings, 8)
    rows = retrieval.unit_rows(database.numpy(), 8)
    plain.train(rows)  # FAISS's own training, its warnings and all
    plain.add(rows)
    unit_queries = F.normalize(queries[:, :8], dim=1).numpy()
    ours = index.first_stage()
    plain.nprobe = ours.nprobe = 4
    assert np.array_equal(ours.search(unit_queries, 50)[1], plain.search(unit_queries, 50)[1])


@pytest.mark.parametrize("unit", [False, True], ids=["any norm", "unit norm"])
def test_a_first_stage_finding_fewer_rows_than_asked_shortlists_those(unit):
    """IVF-PQ probing 1 of 16 cells finds 100-330 rows where the funnel asks for 400: the reranks rank what it found
    (the exact top-k among those rows, no row twice), and results beyond it are index -1 with score -inf."""
    database, queries = gaussian(3000, 4, decay=1.0)
    queries = database[:4] + 0.01 * queries
    if unit:
        database, queries = F.normalize(database, dim=1), F.normalize(queries, dim=1)
    settings = AnnSettings(ann="ivfpq", nlist=16, nprobe=1, pq_bytes=4)
    index = EmbeddingIndex(database, dims=DIMS, settings=settings)
    found_first = index.first_stage().search(F.normalize(queries[:, :8], dim=1).numpy(), 400)[1]
    counts = (found_first >= 0).sum(axis=1)
    assert 10 < counts.min() and counts.max() < 400
    similarity = F.normalize(queries.double(), dim=1) @ F.normalize(database.double(), dim=1).T
    for k in (10, 400):
        scores, found = index.funnel_search(queries, k, [(8, 400), (32, 400), (128, k)])
        for query, count in enumerate(counts.tolist()):
            rows = torch.from_numpy(found_first[query, :count])
            best = similarity[query, rows].topk(min(k, count))
            assert torch.equal(found[query, : min(k, count)], rows[best.indices])
            torch.testing.assert_close(scores[query, : min(k, count)].double(), best.values, atol=1e-6, rtol=0)
            assert (found[query, count:] == -1).all() and (scores[query, count:] == -torch.inf).all()


def test_a_cuda_device_without_faiss_gpu_searches_on_the_cpu(tmp_path, caplog, monkeypatch):
    """faiss-cpu (installed here) has `knn_gpu` but no GPU resources: an index opened for a CUDA device (`franca-hf
    search --device cuda`) searches on the CPU with the CPU's results and one warning, instead of failing."""
    monkeypatch.setattr(retrieval, "_WARNED_NO_FAISS_GPU", False)
    database, queries = gaussian(3000, 8, decay=1.0)
    for ann in ("none", "ivfpq"):
        EmbeddingIndex(database, dims=DIMS, settings=ANN[ann]).save(tmp_path / ann)
        cpu, cuda = retrieval.load_index(tmp_path / ann), retrieval.load_index(tmp_path / ann, device="cuda")
        with caplog.at_level(logging.WARNING):
            for got, want in zip(
                [*cuda.search(queries, 5), *cuda.funnel_search(queries, 5)],
                [*cpu.search(queries, 5), *cpu.funnel_search(queries, 5)],
                strict=True,
            ):
                assert torch.equal(got, want)
    assert caplog.text.count("has no GPU support or sees no GPU, so FAISS searches on the CPU") == 1


class GpuIndexStandIn:
    """What `faiss.index_cpu_to_gpu` returns, standing in: searches the CPU index it holds."""

    def __init__(self, index, device: int):
        self.index, self.device = index, device

    def search(self, queries, k, params=None):
        return self.index.search(queries, k, params=params)


@pytest.mark.parametrize("gpus", [0, 2])
def test_faiss_on_gpu_decides_by_device_build_and_gpus_seen(gpus, tmp_path, monkeypatch):
    """The GPU route, with a stand-in for the functions faiss-gpu adds (there is no GPU here; each records its call
    and runs on the CPU): with GPUs seen, exact search goes to `knn_gpu` (inner product, one resources object per
    process), an IVF-PQ first stage to the device's GPU, HNSW stays on the CPU, and saving brings the first stage
    back to the CPU; with none seen, nothing goes to the GPU. Results are the CPU's either way."""
    import faiss

    calls = []
    stand_ins = {
        "StandardGpuResources": lambda: calls.append("resources") or object(),
        "get_num_gpus": lambda: gpus,
        "knn_gpu": lambda res, xq, xb, k, metric, device: (
            calls.append(("knn_gpu", res, device, xb.shape, metric)) or faiss.knn(xq, xb, k, metric=metric)
        ),
        "index_cpu_to_gpu": lambda res, device, index: (
            calls.append(("to_gpu", res, device, type(index).__name__)) or GpuIndexStandIn(index, device)
        ),
        "index_gpu_to_cpu": lambda index: calls.append("to_cpu") or index.index,
    }
    for name, stand_in in stand_ins.items():
        monkeypatch.setattr(faiss, name, stand_in, raising=False)
    monkeypatch.setattr(retrieval, "_GPU_RESOURCES", None)
    monkeypatch.setattr(retrieval, "_WARNED_NO_FAISS_GPU", False)
    assert not retrieval.faiss_on_gpu(torch.device("cpu")) and not calls
    assert retrieval.faiss_on_gpu(torch.device("cuda:1")) == (gpus > 0)

    database, queries = gaussian(3000, 8, decay=1.0)
    for ann in ("none", "hnsw", "ivfpq"):
        cpu = EmbeddingIndex(database, dims=DIMS, settings=ANN[ann])
        cpu.save(tmp_path / ann)
        cuda = retrieval.load_index(tmp_path / ann, device="cuda:1")
        for got, want in zip(
            [*cuda.search(queries, 5), *cuda.funnel_search(queries, 5)],
            [*cpu.search(queries, 5), *cpu.funnel_search(queries, 5)],
            strict=True,
        ):
            assert torch.equal(got, want)
        if ann == "ivfpq":
            cuda.save(tmp_path / "saved")
            saved = EmbeddingIndex.load(tmp_path / "saved")
            assert torch.equal(saved.funnel_search(queries, 5)[1], cpu.funnel_search(queries, 5)[1])
    if not gpus:
        assert not calls
        return
    resources = calls[1][1]
    assert calls == [
        "resources",
        ("knn_gpu", resources, 1, (3000, 128), faiss.METRIC_INNER_PRODUCT),  # ann none: search
        ("knn_gpu", resources, 1, (3000, 8), faiss.METRIC_INNER_PRODUCT),  # ann none: the funnel's first stage
        ("knn_gpu", resources, 1, (3000, 128), faiss.METRIC_INNER_PRODUCT),  # hnsw: search (the graph stays on CPU)
        ("knn_gpu", resources, 1, (3000, 128), faiss.METRIC_INNER_PRODUCT),  # ivfpq: search
        ("to_gpu", resources, 1, "IndexIVFPQ"),  # ivfpq: the first stage, once, on cuda:1
        "to_cpu",  # ivfpq: save
    ]


def test_auto_settings_choose_by_size(monkeypatch):
    assert AnnSettings().resolve(1000, 48).ann == "none"
    assert AnnSettings().resolve(1_000_000, 48).ann == "hnsw"
    monkeypatch.setattr(retrieval_settings, "physical_memory", lambda: 2**30)  # 1 GiB: a 1M-row graph does not fit
    resolved = AnnSettings().resolve(1_000_000, 48)
    assert (resolved.ann, resolved.nlist, resolved.pq_bytes) == ("ivfpq", 4096, 24)
    with pytest.raises(ValueError, match="ann='flat' is not an index kind; choose one of auto, none, hnsw, ivfpq"):
        AnnSettings(ann="flat")
    with pytest.raises(ValueError, match="pq_bytes=5 must divide the first-stage width 48"):
        AnnSettings(ann="ivfpq", pq_bytes=5).resolve(10, 48)
    # "auto" may pick any kind, so it takes any knob, and keeps those of the kind it picks
    assert AnnSettings(nprobe=8, hnsw_m=16).resolve(1_000_000, 48) == replace(resolved, nprobe=8)
    assert AnnSettings(nprobe=8, hnsw_m=16).resolve(1000, 48) == AnnSettings(ann="none")
    # a knob of another kind would be ignored: refused where the settings are resolved (an index built from Python)
    with pytest.raises(ValueError, match="nprobe=8 applies to ann='ivfpq' only; with ann='hnsw' it would be ignored"):
        EmbeddingIndex(torch.randn(4, 48), settings=AnnSettings("hnsw", nprobe=8))


def test_failed_save_keeps_the_previous_index(tmp_path, monkeypatch):
    database, _ = gaussian(20, 1, decay=1.0)
    path = tmp_path / "index"
    EmbeddingIndex(database, dims=DIMS, settings=ANN["hnsw"]).save(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(folder, index, rows):
        raise OSError("disk full")

    monkeypatch.setattr(retrieval, "write_first_stage", crash)
    with pytest.raises(OSError, match="disk full"):
        EmbeddingIndex(database[:5], dims=DIMS, settings=ANN["hnsw"]).save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before and [p.name for p in tmp_path.iterdir()] == [
        "index"
    ]


def test_a_first_stage_two_threads_ask_for_is_built_once_and_handed_out_whole(monkeypatch):
    database, queries = gaussian(600, 4, decay=1.0)
    index = EmbeddingIndex(database, dims=DIMS, settings=ANN["hnsw"])
    builds, others, seen = [], [], []
    making, adding = retrieval.new_first_stage, retrieval.add_to_first_stage

    def ask():
        first_stage = index.first_stage()
        seen.append((first_stage, first_stage.ntotal))

    def slow_add(first, unit, first_row):
        if not others:  # while the first thread builds, a second one asks for the first stage
            others.append(threading.Thread(target=ask))
            others[0].start()
            others[0].join(0.3)  # it must wait for the finished stage, not take this empty one or build its own
        adding(first, unit, first_row)

    monkeypatch.setattr(retrieval, "new_first_stage", lambda *args: builds.append(1) or making(*args))
    monkeypatch.setattr(retrieval, "add_to_first_stage", slow_add)
    built = index.first_stage()
    others[0].join(10)
    assert len(builds) == 1 and seen == [(built, 600)]
    exact = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    assert torch.equal(index.funnel_search(queries, 5)[1], exact.funnel_search(queries, 5)[1])


@pytest.mark.parametrize("replace_by", ["save", "build_index"])
def test_an_index_loaded_before_its_folder_is_replaced_or_appended_to_keeps_its_own_ids_and_first_stage(
    tmp_path, replace_by
):
    database, queries = gaussian(900, 4, decay=1.0)
    features, path = tmp_path / "features", tmp_path / "index"
    write_features(features, [database[:500]])
    build_index(features, path, ANN["hnsw"], progress=False)
    reader = EmbeddingIndex.load(path)  # lazy: neither its ids nor its first stage is read yet
    expected = EmbeddingIndex(database[:500], ids=[f"row-{i}" for i in range(500)], dims=DIMS, settings=ANN["hnsw"])
    if replace_by == "save":  # another collection saved over it
        EmbeddingIndex(database[500:], ids=[f"other-{i}" for i in range(400)], dims=DIMS, settings=ANN["hnsw"]).save(
            path
        )
    else:  # the same folder appended to: its first stage file is replaced by a larger one
        write_features(features, [database[500:]])
        assert build_index(features, path, append=True, progress=False).added == 400
    assert reader.ids == expected.ids
    scores, found = reader.funnel_search(queries, 5)
    expected_scores, expected_found = expected.funnel_search(queries, 5)
    assert torch.equal(found, expected_found) and torch.equal(scores, expected_scores)


def test_a_failed_rebuild_over_an_index_keeps_it_whole_for_new_and_earlier_readers(tmp_path):
    database, queries = gaussian(900, 4, decay=1.0)
    features, path = tmp_path / "features", tmp_path / "index"
    write_features(features, [database[:500]])
    build_index(features, path, ANN["hnsw"], progress=False)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    reader = EmbeddingIndex.load(path)
    broken = tmp_path / "broken"
    write_features(broken, [database[500:], torch.zeros(3, WIDTH)])  # its second shard holds zero rows
    with pytest.raises(ValueError, match="zero or non-finite"):
        build_index(broken, path, ANN["hnsw"], overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "features", "index"]  # no staging left behind
    reloaded = EmbeddingIndex.load(path)
    for index in (reader, reloaded):
        assert torch.equal(index.funnel_search(queries, 5)[1], reloaded.funnel_search(queries, 5)[1])
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds files that are not an index"):
        build_index(features, tmp_path / "stray", progress=False)
    assert (tmp_path / "stray" / "notes.txt").read_text() == "mine"


def test_a_damaged_or_foreign_extract_shard_is_named_and_leaves_the_index_whole(tmp_path):
    from franca_hf.features.store import ExtractionIndex, write_shard

    database, _ = gaussian(600, 1, decay=1.0)
    features, path = tmp_path / "features", tmp_path / "index"
    write_features(features, list(database.split(200)))
    build_index(features, path, EXACT, progress=False)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    extraction = ExtractionIndex.load(features)
    second = features / extraction.shards[1]["file"]
    good = second.read_bytes()
    ids = [f"row-{i}" for i in range(200, 400)]
    damages = {
        "narrower rows": lambda: write_shard(
            second, extraction.settings, ids, database[200:400, :64].numpy(), None, None
        ),
        "fewer rows": lambda: write_shard(second, extraction.settings, ids[:5], database[200:205].numpy(), None, None),
        "truncated": lambda: second.write_bytes(good[:300]),
    }
    messages = {
        "narrower rows": "holds 200 rows of shape (64,), where 200 of (128,) were committed",
        "fewer rows": "holds 5 rows of shape (128,), where 200 of (128,) were committed",
        "truncated": "cannot be read (ArrowInvalid: ",
    }
    for damage, make in damages.items():
        make()
        for build in (
            lambda: build_index(features, path, EXACT, overwrite=True, progress=False),
            lambda: index_from_features(features),
        ):
            with pytest.raises(UsageError) as error:
                build()
            assert str(error.value).startswith(f"The extract shard {second} {messages[damage]}"), damage
            assert "Run `franca-hf extract` on its folder again" in str(error.value)
        assert {p.name: p.read_bytes() for p in path.iterdir()} == before, damage
        second.write_bytes(good)


def test_bfloat16_vectors_and_queries_search_as_their_float32_values():
    database, queries = gaussian(300, 3, decay=1.0)
    rounded, rounded_queries = database.bfloat16().float(), queries.bfloat16().float()
    index = EmbeddingIndex(database.bfloat16(), dims=DIMS, settings=EXACT)
    assert index.vectors.dtype == torch.float32 and torch.equal(index.vectors, rounded)
    scores, found = index.search(queries.bfloat16(), 5, dim=32)
    expected = EmbeddingIndex(rounded, dims=DIMS, settings=EXACT).search(rounded_queries, 5, dim=32)
    assert torch.equal(found, expected[1]) and torch.equal(scores, expected[0])


def test_a_saved_index_reads_each_id_when_asked_for_and_copies_them_as_stored(tmp_path, monkeypatch):
    database, queries = gaussian(300, 2, decay=1.0)
    names = [f"photo {i}.jpg" for i in range(297)] + ['quote " and \\ slash', "ünïcödé 🚀", "new\nline"]
    EmbeddingIndex(database, ids=names, dims=DIMS, settings=EXACT).save(tmp_path / "index")
    index = EmbeddingIndex.load(tmp_path / "index")
    assert isinstance(index.ids, retrieval.StoredIds)  # no list of every id: each is read from the mapped file
    assert len(index.ids) == 300 and index.ids == names and names == index.ids and index.ids != names[:-1]
    assert index.ids[0] == "photo 0.jpg" and index.ids[-1] == "new\nline" and index.ids[-3:] == names[-3:]
    assert index.ids[::100] == names[::100] and list(index.ids) == names and index.ids[np.int64(297)] == names[297]
    with pytest.raises(IndexError, match="id 300 is out of range for 300 ids"):
        index.ids[300]
    assert [index.ids[i] for i in index.search(queries, 3)[1][0].tolist()] == [
        names[i] for i in EmbeddingIndex(database, dims=DIMS, settings=EXACT).search(queries, 3)[1][0].tolist()
    ]
    fresh = EmbeddingIndex.load(tmp_path / "index")
    copied = copy.copy(fresh)  # shares the files the index opened, which stay open while either lives
    del fresh
    gc.collect()
    assert copied.ids[-2] == "ünïcödé 🚀"
    monkeypatch.setattr(retrieval.StoredIds, "__getitem__", lambda *args: pytest.fail("an id was decoded"))
    index.save(tmp_path / "copy")  # the stored ids are copied as they are, not read id by id
    for name in ("ids.jsonl", "ids.starts", "vectors.f32"):
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "index" / name).read_bytes(), name


def test_a_folder_saved_before_the_id_starts_were_reads_and_appends_its_ids(tmp_path, monkeypatch):
    database, queries = gaussian(1000, 2, decay=1.0)
    features = tmp_path / "features"
    write_features(features, list(database[:600].split(300)))
    build_index(features, tmp_path / "index", EXACT, progress=False)
    build_index(features, tmp_path / "expected", EXACT, progress=False)
    (tmp_path / "index" / "ids.starts").unlink()  # as an earlier version saved it
    old = EmbeddingIndex.load(tmp_path / "index")
    assert old.ids == [f"row-{i}" for i in range(600)] and old.ids[-1] == "row-599"
    ids = write_features(features, [database[600:]])
    starts = retrieval.line_starts

    class HalfWritten(np.ndarray):  # starts that an append is killed while writing
        def astype(self, dtype):
            return self

        def tofile(self, path):
            Path(path).write_bytes(self.view(np.ndarray).tobytes()[:1000])
            raise KeyboardInterrupt

    monkeypatch.setattr(retrieval, "line_starts", lambda *args: starts(*args).view(HalfWritten))
    with pytest.raises(KeyboardInterrupt):
        build_index(features, tmp_path / "index", append=True, progress=False)
    monkeypatch.setattr(retrieval, "line_starts", starts)
    assert EmbeddingIndex.load(tmp_path / "index").ids == old.ids  # as it was: no half-written starts
    build_index(features, tmp_path / "index", append=True, progress=False)
    build_index(features, tmp_path / "expected", append=True, progress=False)
    for name in ("ids.jsonl", "ids.starts"):
        assert (tmp_path / "index" / name).read_bytes() == (tmp_path / "expected" / name).read_bytes(), name
    assert EmbeddingIndex.load(tmp_path / "index").ids == ids


def test_a_damaged_index_folder_is_named_with_what_is_wrong_and_how_to_mend_it(tmp_path):
    database, queries = gaussian(300, 2, decay=1.0)
    saved = tmp_path / "saved"
    EmbeddingIndex(database, dims=DIMS, settings=ANN["hnsw"]).save(saved)
    stage = next(saved.glob("first_stage.*.faiss")).name
    damages = {
        "vectors.f32": ("truncate", f"vectors.f32 holds 100 bytes, where {300 * WIDTH * 4} are committed"),
        "ids.jsonl": ("delete", "ids.jsonl is missing"),
        "ids.starts": ("truncate", "ids.starts holds 100 bytes, where 2400 are committed"),
        "index.json": ("truncate", "index.json cannot be read ("),
        stage: ("garble", f"{stage} cannot be read ("),
    }
    for name, (how, problem) in damages.items():
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        if how == "delete":
            (folder / name).unlink()
        elif how == "truncate":
            (folder / name).write_bytes((folder / name).read_bytes()[:100])
        else:
            (folder / name).write_bytes(bytes(len((folder / name).read_bytes())))
        with pytest.raises(UsageError) as error:
            EmbeddingIndex.load(folder).funnel_search(queries, 3)  # the first stage is read on first use
        assert str(error.value).startswith(f"The index {folder} is damaged: {problem}"), str(error.value)
        assert str(error.value).endswith(f"(`franca-hf index ... --out {folder} --overwrite`, or save it again).")


def test_load_rejects_folders_that_are_not_an_index(tmp_path):
    (tmp_path / "features.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"is not a franca_hf retrieval index \(no index.json\)"):
        EmbeddingIndex.load(tmp_path)
    with pytest.raises(FileExistsError, match="holds files that are not an index"):
        EmbeddingIndex(torch.randn(4, 128)).save(tmp_path)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda index, q: index.search(q, 5, dim=50),
            r"This index: dim=50 is not allowed; choose one of \[8, 16, 32, 64, 128\]\.",
        ),
        (lambda index, q: index.search(q, 101), r"k=101 is out of range.*\(100\)"),
        (lambda index, q: index.search(q, 0), r"k=0 is out of range"),
        (lambda index, q: index.search(q, 2.0), r"k=2.0 is not an integer"),
        (lambda index, q: index.funnel_search(q, 5, [(8, 50.7), (128, 5)]), r"sizes must be integers; got \[50.7, 5\]"),
        (lambda index, q: index.search(q[:, :100], 5), r"queries must have shape.*\[128\].*\(3, 100\)"),
        (lambda index, q: index.search(q[:, :16], 5, dim=32), r"width in \[32, 128\].*\(3, 16\)"),
        (lambda index, q: index.search(q[0], 5), r"queries\[None\] for a single query"),
        (lambda index, q: index.search(torch.cat([q, torch.zeros(1, 128)]), 5), r"Query 3 has a zero"),
        (lambda index, q: index.funnel_search(q, 5, []), r"stages is empty"),
        (
            lambda index, q: index.funnel_search(q, 5, [(10, 50), (128, 5)]),
            r"This index: dim=10 is not allowed; choose one of",
        ),
        (lambda index, q: index.funnel_search(q, 5, [(32, 50), (16, 20), (128, 5)]), r"strictly increasing.*\[32, 16"),
        (lambda index, q: index.funnel_search(q, 5, [(8, 20), (32, 50), (128, 5)]), r"non-increasing.*\[20, 50, 5\]"),
        (lambda index, q: index.funnel_search(q, 5, [(8, 50), (128, 3)]), r">= k=5; got \[50, 3\]"),
        (lambda index, q: index.funnel_search(q, 101), r"k=101 is out of range"),
        (lambda index, q: index.funnel_search(q[:, :32], 5), r"width in \[128\]"),
    ],
)
def test_bad_search_inputs_raise_clear_errors(call, message):
    database, queries = gaussian(100, 3, decay=1.0)
    with pytest.raises(ValueError, match=message):
        call(EmbeddingIndex(database, dims=DIMS, settings=EXACT), queries)


def test_queries_of_another_type_than_a_tensor_or_an_array_are_named():
    database, queries = gaussian(100, 3, decay=1.0)
    with pytest.raises(TypeError, match=r"queries must be a torch tensor or a numpy array .* got a list"):
        EmbeddingIndex(database, dims=DIMS, settings=EXACT).search(queries.tolist(), 2)


@pytest.mark.parametrize("rows", [slice(None), slice(1, 2)], ids=["batch", "one query"])
def test_query_checks_name_the_first_bad_stage_and_ignore_channels_no_stage_reads(rows):
    """A zero or non-finite query prefix is named at the first stage it spoils; a non-finite channel past the last
    stage's prefix is never read, so it does not matter (the checks screen every prefix norm with one product, where
    inf x 0 is NaN, or, for one query, with FAISS's norm of each prefix, then look again channel by channel)."""
    database, queries = gaussian(100, 3, decay=1.0)
    index = EmbeddingIndex(database, dims=DIMS, settings=EXACT)
    stages = [(8, 50), (32, 20), (64, 5)]
    bad = 1 if rows == slice(None) else 0  # the spoiled query's number in what is searched
    for channel, value, stage in ((20, float("nan"), 32), (3, float("inf"), 8), (40, float("-inf"), 64), (5, 0, 8)):
        spoiled = queries.clone()
        spoiled[1, channel] = value
        if value == 0:
            spoiled[1, :8] = 0
        with pytest.raises(ValueError, match=rf"Query {bad} has a zero or non-finite prefix of length {stage};"):
            index.funnel_search(spoiled[rows], 5, stages)
    spoiled = queries.clone()
    spoiled[1, 100] = float("inf")
    searches = index.funnel_search(spoiled[rows], 5, stages), index.funnel_search(queries[rows], 5, stages)
    for got, want in zip(*searches, strict=True):
        assert torch.equal(got, want)
    huge = queries.clone()
    huge[1] *= 2.0**80  # finite, but its squares are not: the second look, in float64, finds the norm
    (scores, found), (want_scores, want_found) = (index.funnel_search(q[rows], 5, stages) for q in (huge, queries))
    assert torch.equal(found, want_found)
    torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=0)


def test_bad_index_inputs_raise_clear_errors():
    database, _ = gaussian(10, 1, decay=1.0)
    with pytest.raises(ValueError, match=r"non-empty \(N, D\) float tensor; got shape \(0, 128\)"):
        EmbeddingIndex(torch.empty(0, WIDTH))
    with pytest.raises(ValueError, match="non-empty"):
        EmbeddingIndex(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="Got 3 ids for 10 vectors"):
        EmbeddingIndex(database, ids=["a", "b", "c"])
    with pytest.raises(
        ValueError, match=r"dims must be strictly increasing positive integers ending at 128, got \[8, 64\]"
    ):
        EmbeddingIndex(database, dims=[8, 64])
    database[4, :8] = 0
    with pytest.raises(ValueError, match=r"Row 4 \('e'\) has a zero or non-finite prefix of length 8"):
        EmbeddingIndex(database, ids="abcdefghij", dims=DIMS)
    database[4, 0] = float("nan")
    with pytest.raises(ValueError, match="Row 4"):
        EmbeddingIndex(database, dims=DIMS, settings=EXACT)


def test_index_refuses_mixed_inputs_and_a_bad_out_before_loading_a_model(tmp_path):
    from franca_hf.features import ModelSpec
    from franca_hf.retrieval_settings import IndexSettings

    database, _ = gaussian(10, 1, decay=1.0)
    features = tmp_path / "features"
    write_features(features, [database])
    missing = ModelSpec(str(tmp_path / "no_model"))  # loading it would fail: every refusal below comes first
    with pytest.raises(UsageError, match=rf"{features} is an extract folder: index one extract folder alone") as error:
        retrieval.index(IndexSettings([str(features), str(EXAMPLE_IMAGES)], str(tmp_path / "o"), missing))
    assert error.value.setting == "images"
    (tmp_path / "a_file").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("")
    EmbeddingIndex(database, dims=DIMS, settings=EXACT).save(tmp_path / "index")
    for out, overwrite, message in (
        ("a_file", True, "is a file; an index is saved as a folder"),
        ("notes", True, "holds files that are not an index; choose an empty or new folder"),
        ("index", False, "already holds an index; pass overwrite=True to replace it"),
    ):
        with pytest.raises(OutputExistsError, match=message):
            retrieval.index(IndexSettings([str(EXAMPLE_IMAGES)], str(tmp_path / out), missing, overwrite=overwrite))
    assert (tmp_path / "notes" / "mine.txt").exists()


def test_a_killed_writes_leftovers_are_reported_not_deleted_and_a_symlinked_out_keeps_its_link(tmp_path, caplog):
    database, _ = gaussian(20, 1, decay=1.0)
    features, out = tmp_path / "features", tmp_path / "run[1]"  # a name that is a glob pattern too
    write_features(features, [database])
    left = [tmp_path / ".run[1].staging-x1y2", tmp_path / ".run[1].old-z3"]  # what a kill -9 mid-write leaves
    other = tmp_path / ".run1.staging-live"  # another index's write, running: "run[1]" as a pattern would match it
    for path in [*left, other]:
        path.mkdir()
    with caplog.at_level(logging.WARNING, "franca_hf"):
        build_index(features, out, EXACT, progress=False)
    # another write of the same index may own a staging folder: said, not deleted
    assert [r.getMessage().split(" was left by an interrupted write of ")[0] for r in caplog.records] == [
        str(path) for path in left
    ]
    assert all(path.is_dir() for path in [*left, other]) and len(EmbeddingIndex.load(out)) == 20

    target, link = tmp_path / "disk2" / "index", tmp_path / "linked"
    target.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    build_index(features, link, EXACT, progress=False)  # written where the link points, the link kept
    assert link.is_symlink() and (target / "index.json").is_file() and len(EmbeddingIndex.load(link)) == 20
    EmbeddingIndex(database[:5], dims=DIMS, settings=EXACT).save(link)
    assert link.is_symlink() and len(EmbeddingIndex.load(target)) == 5


def test_default_funnel_follows_mrl():
    assert default_funnel([48, 96, 192, 384, 768], 10) == [(48, 200), (192, 50), (768, 10)]
    assert default_funnel([32, 64], 5) == [(32, 100), (64, 5)]
    assert default_funnel([768], 10) == [(768, 10)]


def test_index_images_embeds_readable_files_and_skips_broken_ones(tmp_path, caplog):
    folder = tmp_path / "photos"
    shutil.copytree(EXAMPLE_IMAGES, folder, ignore=shutil.ignore_patterns("*.md"))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    model = FrancaModel(tiny_config()).eval()
    processor = make_image_processor(56)
    with caplog.at_level(logging.WARNING):
        index = index_images(model, processor, [folder], batch_size=2, progress=False)
    assert "broken.jpg" in caplog.text
    assert [p.split("/")[-1] for p in index.ids] == ["astronaut.jpg", "chelsea_cat.jpg", "coffee.jpg", "rocket.jpg"]
    assert index.dims == model.config.matryoshka_dims == [4, 8, 16, 32, 64]

    images = [Image.open(p).convert("RGB") for p in index.ids]
    with torch.no_grad():
        expected = model.get_image_embeddings(processor(images, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(index.vectors, expected, atol=1e-5, rtol=1e-5)


def test_index_images_shows_its_progress_as_index(tmp_path, capsys):
    torch.manual_seed(0)
    index_images(FrancaModel(tiny_config()).eval(), make_image_processor(56), [EXAMPLE_IMAGES], progress=True)
    assert "index: 100%" in capsys.readouterr().err


def test_index_images_of_a_model_without_matryoshka_dims_serves_its_full_width():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14))
    index = index_images(dinov2.eval(), make_image_processor(56), [EXAMPLE_IMAGES], progress=False)
    assert index.dims == [32] and index.vectors.shape == (4, 32)


def test_index_and_search_cli(tiny_folder, tmp_path, capsys):
    index = tmp_path / "photos"
    assert main(["index", str(EXAMPLE_IMAGES), "--model", str(tiny_folder), "--out", str(index)]) == 0
    assert (
        "indexed 4 images (4 x 128, nested [8, 16, 32, 64, 128], first stage exact at 8 dims) with "
        in capsys.readouterr().out
    )
    search = ["search", str(EXAMPLE_IMAGES / "rocket.jpg"), "--index", str(index), "--model", str(tiny_folder)]
    for extra in (["--dim", "32"], ["--funnel"]):
        assert main([*search, "--k", "2", *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[2].strip().startswith("1. 1.0000") and lines[2].endswith("rocket.jpg")  # itself, first

    # k larger than the index: what exists, with a note (the default k is 10)
    assert main([*search, "--funnel"]) == 0
    captured = capsys.readouterr()
    assert "the index holds 4 images, fewer than --k 10; showing all of them" in captured.err
    assert (
        "top-4 of 4 images (funnel 8:4 > 32:4 > 128:4, first stage exact at 8 dims)"
    )  # no shortlist past the index in captured.out
    # the funnel stops at --dim
    assert main([*search, "--funnel", "--dim", "32", "--k", "3"]) == 0
    assert "top-3 of 4 images (funnel 8:4 > 16:4 > 32:3, first stage exact at 8 dims)" in capsys.readouterr().out
    # an index with an ANN first stage searches with the funnel unless told --exact
    assert (
        main(
            [
                "index",
                str(EXAMPLE_IMAGES),
                "--model",
                str(tiny_folder),
                "--out",
                str(index),
                "--ann",
                "hnsw",
                "--overwrite",
            ]
        )
        == 0
    )
    assert "first stage hnsw M=32 efSearch=64 at 8 dims" in capsys.readouterr().out
    assert main([*search, "--k", "2"]) == 0
    assert (
        "top-2 of 4 images (funnel 8:4 > 32:4 > 128:2, first stage hnsw M=32 efSearch=64 at 8 dims)"
        in capsys.readouterr().out
    )
    assert main([*search, "--k", "2", "--exact"]) == 0
    assert "top-2 of 4 images (exact, dim 128, cut in the model's basis)" in capsys.readouterr().out

    assert main([*search, "--dim", "10"]) == 2
    assert "This index: dim=10 is not allowed; choose one of [8, 16, 32, 64, 128]. (--dim)" in capsys.readouterr().err
    assert main([*search, "--k", "0"]) == 2
    assert "k must be at least 1; got 0. (--k)" in capsys.readouterr().err
    assert main(["index", str(EXAMPLE_IMAGES), "--out", str(index)]) == 2
    error = capsys.readouterr().err
    assert "model is required to embed images" in error and error.rstrip().endswith("(--model)")


def test_index_from_extracted_shards_without_embedding_again(tiny_folder, tmp_path, capsys):
    features = tmp_path / "features"
    assert main(["extract", str(EXAMPLE_IMAGES), "--model", str(tiny_folder), "--out", str(features)]) == 0
    assert (
        main(
            ["extract", str(EXAMPLE_IMAGES), "--model", str(tiny_folder), "--out", str(tmp_path / "f32"), "--dim", "32"]
        )
        == 0
    )
    from_images = tmp_path / "images"
    assert main(["index", str(EXAMPLE_IMAGES), "--model", str(tiny_folder), "--out", str(from_images)]) == 0
    capsys.readouterr()
    # images into a folder that already holds an index: refused before the model loads, replaced with --overwrite
    photo = EXAMPLE_IMAGES / "coffee.jpg"
    assert main(["index", str(photo), "--model", str(tmp_path / "no-model"), "--out", str(from_images)]) == 2
    assert "already holds an index; pass overwrite=True to replace it. (--overwrite)" in capsys.readouterr().err
    assert len(EmbeddingIndex.load(from_images)) == 4
    replaced = ["index", str(photo), "--model", str(tiny_folder), "--out", str(from_images), "--overwrite"]
    assert main(replaced) == 0 and len(EmbeddingIndex.load(from_images)) == 1
    assert (
        main(["index", str(EXAMPLE_IMAGES), "--model", str(tiny_folder), "--out", str(from_images), "--overwrite"]) == 0
    )
    capsys.readouterr()

    built = index_from_features(features)
    direct = EmbeddingIndex.load(from_images)
    assert built.ids == direct.ids and built.dims == direct.dims
    torch.testing.assert_close(built.vectors, direct.vectors)
    assert index_from_features(tmp_path / "f32").dims == [8, 16, 32]  # nested dims up to the stored width

    # the CLI, with no model loaded: the folder is the only input
    out = tmp_path / "from_shards"
    assert main(["index", str(features), "--out", str(out)]) == 0
    assert (
        f"indexed 4 images (4 x 128, nested [8, 16, 32, 64, 128], first stage exact at 8 dims) from the features in {features}"
        in capsys.readouterr().out
    )
    assert main(["index", str(features), "--out", str(out)]) == 2
    assert "already holds an index; pass overwrite=True or append=True. (--overwrite)" in capsys.readouterr().err
    torch.testing.assert_close(EmbeddingIndex.load(out).vectors, direct.vectors)
    # search takes the extraction folder or the index file
    for index in (features, out):
        command = ["search", str(EXAMPLE_IMAGES / "coffee.jpg"), "--index", str(index), "--model", str(tiny_folder)]
        assert main([*command, "--k", "1"]) == 0
        assert capsys.readouterr().out.splitlines()[2].endswith("coffee.jpg")


def test_retrieval_benchmark_on_a_small_embeddings_file_holds_out_what_it_can(tmp_path):
    torch.manual_seed(0)
    small = tmp_path / "small.safetensors"
    save_file({"features": torch.randn(40, 128)}, small)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval.py"
    command = [sys.executable, str(script), "--embeddings", str(small), "--rounds", "1", "--single-queries", "2"]
    command += ["--full-hnsw-max", "0"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "note: 40 embeddings cannot spare 1024 queries; holding out 10 (a quarter)" in run.stdout
    assert "Database 30 x 128 float32 (unit norm), 10 queries, k = 10, first stage at D/16 = 8" in run.stdout
    assert "| exact full width | FAISS `IndexFlatIP(D)` | 1.0000 |" in run.stdout


def test_retrieval_benchmark_on_model_embeddings_writes_its_docs_block(fitted_folder, tmp_path):
    """A model with a fitted basis is measured twice: cut as prefixes and in its basis."""
    from .features.conftest import make_images

    make_images(tmp_path / "images", 48)
    page = tmp_path / "page.md"
    page.write_text("before\n<!-- demo-block:start -->\nold\n<!-- demo-block:end -->\nafter\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval.py"
    command = [sys.executable, str(script), "--model", str(fitted_folder), "--data", str(tmp_path / "images")]
    command += ["--images", "48", "--rounds", "1", "--single-queries", "2", "--docs", str(page), "--full-hnsw-max", "0"]
    run = subprocess.run([*command, "--docs-block", "demo-block"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = page.read_text()
    assert text.startswith("before\n<!-- demo-block:start -->\nData: REAL embeddings of 48 images of ")
    tables = text.split("Data: ")[1:]
    assert len(tables) == 2
    assert "by <model folder> (Matryoshka truncation: prefix): 12 random rows held out as queries" in tables[0]
    assert "by <model folder> (Matryoshka truncation: fitted PCA basis): 12 random rows" in tables[1]
    for table in tables:
        assert "| HNSW, shortlist 36 at 8, rerank at 128 | ours: HNSW32 + rerank |" in table
        assert "| funnel, exact, shortlist 36 at 8, rerank at 128 | ours: `funnel_search` |" in table
    assert text.endswith("<!-- demo-block:end -->\nafter\n")


def test_scan_memory_benchmark_scans_each_memory_and_writes_its_docs_block(tmp_path, monkeypatch, capsys):
    page = tmp_path / "page.md"
    page.write_text("<!-- scan-memory:start -->\nold\n<!-- scan-memory:end -->\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scan_memory.py"
    monkeypatch.syspath_prepend(str(script.parent))
    command = [str(script), "--shapes", "3000x16", "500x8", "--queries", "4", "--rounds", "1"]
    monkeypatch.setattr(sys, "argv", [*command, "--docs", str(page)])
    import faiss

    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:  # the script scans on one thread
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    rows = [line.split(" | ") for line in page.read_text().splitlines() if line.startswith("| 3,000 x 16 |")]
    memories = [
        "huge_page_array (an index's buffer)",
        "numpy array",
        "torch tensor",
        "IndexFlatIP storage (plain FAISS)",
        "memory map of a file (a saved index)",
    ]
    states = ("as allocated", "after churn")
    assert [(row[1], row[2]) for row in rows] == [(state, memory) for state in states for memory in memories]
    assert rows[0][4] == rows[5][4] == "1.00x"
    assert sum(line.startswith("| 500 x 8 |") for line in capsys.readouterr().out.splitlines()) == 10
    monkeypatch.setattr(sys, "argv", [str(script), "--shapes", "100by8"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    assert stopped.value.code == 2
    assert "--shapes takes ROWSxWIDTH, like 100000x768; got '100by8'." in capsys.readouterr().err


def write_features(folder: Path, blocks: list[torch.Tensor], first: int = 0) -> list[str]:
    """An extract folder of CLS rows, one shard per block (ids "row-N"), written with the extractor's own shard and
    index writers; shards from an earlier call stay (a resumed extraction). Returns all the ids in order."""
    from franca_hf.features.store import ExtractionIndex, ExtractionRecord, write_shard

    settings = ExtractionRecord("synthetic", ["synthetic"], "", "cls", WIDTH, False, "float32", DIMS)
    extraction = ExtractionIndex.load(folder) if (folder / "extraction.json").exists() else ExtractionIndex(settings)
    row = extraction.rows
    for number, block in enumerate(blocks, start=len(extraction.shards)):
        ids = [f"row-{row + i}" for i in range(len(block))]
        name = f"data/shard-{number:05d}.parquet"
        write_shard(folder / name, settings, ids, block.numpy(), None, None)
        extraction.shards.append({"file": name, "rows": len(block)})
        row += len(block)
    extraction.complete = True
    extraction.save(folder)
    return [f"row-{i}" for i in range(row)]


@pytest.mark.parametrize("ann", ANN)
def test_index_streamed_from_shards_equals_the_in_memory_one_and_append_equals_rebuild(tmp_path, monkeypatch, ann):
    monkeypatch.setattr(retrieval, "training_rows", lambda index: 1000)  # IVF-PQ trains on the first 1000 rows
    database, queries = gaussian(2500, 10, decay=1.0)
    features = tmp_path / "features"
    write_features(features, list(database[:1500].split(500)))
    first = build_index(features, tmp_path / "index", ANN[ann], progress=False)
    assert (first.added, first.appended, len(first.index)) == (1500, False, 1500)
    ids = write_features(features, list(database[1500:].split(500)))  # the extraction goes on: two more shards
    appended = build_index(features, tmp_path / "index", append=True, progress=False)
    assert (appended.added, appended.appended, len(appended.index)) == (1000, True, 2500)
    settings = appended.index.settings  # as resolved at the first build (an automatic nlist is fixed there)
    rebuilt = build_index(features, tmp_path / "rebuilt", settings, progress=False).index

    in_memory = index_from_features(features, settings)
    for index in (appended.index, rebuilt):
        assert index.ids == ids == in_memory.ids and index.settings == in_memory.settings
        assert torch.equal(index.vectors, database)
    for name in [p.name for p in (tmp_path / "rebuilt").iterdir()]:  # vectors, ids, first stage: byte for byte
        if name != "index.json":
            assert (tmp_path / "index" / name).read_bytes() == (tmp_path / "rebuilt" / name).read_bytes(), name
    results = [index.funnel_search(queries, 10) for index in (appended.index, rebuilt, in_memory)]
    for scores, found in results[1:]:
        assert torch.equal(found, results[0][1]) and torch.equal(scores, results[0][0])
    if ann == "none":
        assert torch.equal(results[0][1], EmbeddingIndex(database, dims=DIMS, settings=EXACT).funnel_search(queries)[1])

    again = build_index(features, tmp_path / "index", append=True, progress=False)  # nothing new: nothing added
    assert again.added == 0 and len(again.index) == 2500
    with pytest.raises(ValueError, match="An append keeps the index's own settings"):
        build_index(features, tmp_path / "index", ANN[ann], append=True)


def test_an_append_refuses_an_extraction_that_lost_its_shards_or_is_another_one(tmp_path):
    from franca_hf.features.store import ExtractionIndex, write_shard

    database, _ = gaussian(600, 1, decay=1.0)
    features, path = tmp_path / "features", tmp_path / "index"
    write_features(features, list(database[:400].split(200)))
    build_index(features, path, EXACT, progress=False)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    other = tmp_path / "other"  # another extraction: its shards have the same names, other images
    write_features(other, list(database[200:].split(200)))
    moved = ExtractionIndex.load(other)
    for number, shard in enumerate(moved.shards):
        rows = database[200 * (number + 1) : 200 * (number + 2)].numpy()
        names = [f"elsewhere-{200 * number + i}" for i in range(200)]
        write_shard(other / shard["file"], moved.settings, names, rows, None, None)
    with pytest.raises(UsageError, match=rf"{other}/data/shard-00001.parquet holds other images than the rows"):
        build_index(other, path, append=True, progress=False)

    # a resumed extract set the first shard aside and embedded its images again, in a shard of a new name
    extraction = ExtractionIndex.load(features)
    redone = extraction.shards.pop(0)
    (features / redone["file"]).unlink()
    ids = [f"row-{i}" for i in range(200)]
    write_shard(features / "data/shard-00009.parquet", extraction.settings, ids, database[:200].numpy(), None, None)
    extraction.shards.append({"file": "data/shard-00009.parquet", "rows": 200})
    extraction.save(features)
    with pytest.raises(UsageError, match=r"no longer holds 1 of the shards .* \(data/shard-00000.parquet, ...\)"):
        build_index(features, path, append=True, progress=False)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    rebuilt = build_index(features, path, overwrite=True, progress=False).index  # what the message says to do
    assert len(rebuilt) == 400 and sorted(rebuilt.ids) == sorted(f"row-{i}" for i in range(400))


def test_an_append_refuses_an_index_not_built_from_an_extract_folder(tmp_path):
    database, _ = gaussian(400, 1, decay=1.0)
    features, path = tmp_path / "features", tmp_path / "index"
    write_features(features, list(database.split(200)))
    EmbeddingIndex(database, [f"row-{i}" for i in range(400)]).save(path)  # the same rows, saved from Python
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(UsageError, match=r"was not built from an extract folder .* it would repeat them"):
        build_index(features, path, append=True, progress=False)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_an_interrupted_append_leaves_the_index_as_it_was(tmp_path, monkeypatch):
    database, queries = gaussian(1500, 5, decay=1.0)
    features = tmp_path / "features"
    write_features(features, list(database[:1000].split(500)))
    build_index(features, tmp_path / "index", ANN["hnsw"], progress=False)
    write_features(features, [database[1000:]])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval, "write_first_stage", killed)  # rows and ids are written, the manifest is not
    with pytest.raises(KeyboardInterrupt):
        build_index(features, tmp_path / "index", append=True, progress=False)
    monkeypatch.undo()
    before = EmbeddingIndex.load(tmp_path / "index")
    assert len(before) == 1000 and len(before.ids) == 1000 and before.funnel_search(queries, 3)[0].shape == (5, 3)
    resumed = build_index(features, tmp_path / "index", append=True, progress=False)
    assert resumed.added == 500 and torch.equal(resumed.index.vectors, database)


# one process builds each index in turn; writing 5 to clear_refs resets its peak RSS (VmHWM) before each build
PEAK_RSS = """
import sys
import faiss
from franca_hf.retrieval import build_index, index_from_features
from franca_hf.retrieval_settings import AnnSettings
faiss.omp_set_num_threads(1)
for features, out in zip(sys.argv[1::2], sys.argv[2::2]):
    open("/proc/self/clear_refs", "w").write("5")
    build_index(features, out, AnnSettings(ann="ivfpq", nlist=16, pq_bytes=2), progress=False)
    print("peak_rss_kib", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
open("/proc/self/clear_refs", "w").write("5")
index_from_features(sys.argv[-2])  # the control: the in-memory index of the largest folder holds all its vectors
print("peak_rss_kib", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def test_index_from_shards_keeps_memory_bounded_whatever_the_rows(tmp_path):
    """Building an IVF-PQ index (the kind for collections past RAM) from 20k or 160k rows (10 or 78 MiB of vectors)
    peaks within a few MiB: one shard, the training sample at D/16 and the codes (10 bytes a row) in memory."""
    sizes, command = (20_000, 160_000), [sys.executable, "-c", PEAK_RSS]
    for rows in sizes:
        write_features(tmp_path / f"features-{rows}", list(torch.randn(rows, WIDTH).split(4000)))
        command += [str(tmp_path / f"features-{rows}"), str(tmp_path / f"index-{rows}")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    *built, in_memory = (int(p.split()[0]) / 1024 for p in run.stdout.split("peak_rss_kib")[1:])
    peaks = dict(zip(sizes, built, strict=True))
    for rows in sizes:
        assert len(EmbeddingIndex.load(tmp_path / f"index-{rows}")) == rows
    growth = peaks[160_000] - peaks[20_000]
    print(f"peak RSS (MiB) by rows: {peaks}, in memory {in_memory:.1f}; growth {growth:.1f} MiB for 68 MiB more")
    assert growth < 20, f"peak RSS grew by {growth:.1f} MiB from 20k to 160k rows ({peaks})"
    assert in_memory - peaks[160_000] > 60  # the measurement sees an index that does hold the vectors


@pytest.fixture(scope="module")
def fitted_folder(tiny_folder, tmp_path_factory) -> Path:
    """The tiny reference model with a fitted Matryoshka basis (a random mean and rotation): its embedding is NOT
    the normalised raw CLS token, as in a `franca-hf fit-pca` folder."""
    from transformers import AutoImageProcessor

    reference = FrancaModel.from_pretrained(tiny_folder)
    model = FrancaModel(reference.config.__class__(**{**reference.config.to_dict(), "matryoshka_basis": "pca"}))
    model.load_state_dict(reference.state_dict(), strict=False)
    torch.manual_seed(0)
    width = model.config.hidden_size
    with torch.no_grad():
        model.matryoshka_basis.cls_mean.copy_(0.1 * torch.randn(width))
        model.matryoshka_basis.cls_rotation.copy_(torch.linalg.qr(torch.randn(width, width))[0])
    folder = tmp_path_factory.mktemp("fitted") / "model"
    model.eval().save_pretrained(folder)
    AutoImageProcessor.from_pretrained(tiny_folder).save_pretrained(folder)
    return folder


def test_without_matryoshka_basis_embeds_as_the_model_without_one(tiny_folder, fitted_folder):
    """Dropping a fitted basis gives back prefix truncation: the embeddings of the model the basis was added to."""
    from franca_hf.matryoshka import without_matryoshka_basis

    fitted = FrancaModel.from_pretrained(fitted_folder).eval()
    prefix = without_matryoshka_basis(fitted)
    assert prefix.config.matryoshka_basis == "prefix" and not prefix.training
    size = fitted.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = FrancaModel.from_pretrained(tiny_folder).eval().get_image_embeddings(pixels, dim=8)
        assert torch.equal(prefix.get_image_embeddings(pixels, dim=8), expected)
        assert not torch.allclose(fitted.get_image_embeddings(pixels, dim=8), expected, atol=1e-3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The four example photos and a flipped, a grayscale and a smaller copy of each: 16 images."""
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(EXAMPLE_IMAGES.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        image.save(folder / path.name)
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"{path.stem}_flipped.jpg")
        image.convert("L").save(folder / f"{path.stem}_gray.jpg")
        image.resize((image.width // 2, image.height // 2)).save(folder / f"{path.stem}_small.jpg")
    return folder


def test_every_documented_way_to_embed_a_query_finds_the_same_neighbours_or_says_what_to_use(
    fitted_folder, photos, tmp_path, capsys
):
    """Issue 25: the model's methods, the index's own image search and the CLI give one top-3; the raw CLS of
    `forward().pooler_output` and of the pipeline is refused with an error naming what to use."""
    from transformers import AutoImageProcessor, AutoModel, pipeline

    model = AutoModel.from_pretrained(fitted_folder).eval()
    processor = AutoImageProcessor.from_pretrained(fitted_folder)
    query = photos / "rocket.jpg"
    assert main(["index", str(photos), "--model", str(fitted_folder), "--out", str(tmp_path / "index")]) == 0
    features = tmp_path / "features"
    assert main(["extract", str(photos), "--model", str(fitted_folder), "--out", str(features)]) == 0
    assert main(["index", str(features), "--out", str(tmp_path / "from_features")]) == 0
    index = retrieval.load_index(tmp_path / "index")
    pixels = processor(Image.open(query), return_tensors="pt")["pixel_values"]

    def names(indices) -> list[str]:
        return [Path(index.ids[i]).name for i in indices[0].tolist()]

    tops = {}
    with torch.no_grad():
        tops["model.get_image_embeddings"] = names(index.search(model.get_image_embeddings(pixels), 3)[1])
        tops["model.get_image_features().pooler_output"] = names(
            index.search(model.get_image_features(pixels).pooler_output, 3)[1]
        )
    tops["index.search_images"] = names(index.search_images([query], model, processor, k=3)[2])
    from_features = retrieval.load_index(tmp_path / "from_features")
    tops["extract + index folder"] = names(from_features.search(model.get_image_embeddings(pixels).detach(), 3)[1])
    capsys.readouterr()
    assert (
        main(["search", str(query), "--index", str(tmp_path / "index"), "--model", str(fitted_folder), "--k", "3"]) == 0
    )
    tops["franca-hf search"] = [Path(line.split()[-1]).name for line in capsys.readouterr().out.splitlines()[2:]]
    for way, top in tops.items():
        print(f"{way}: {top}")
    assert tops["model.get_image_embeddings"][0] == "rocket.jpg"
    assert all(top == tops["model.get_image_embeddings"] for top in tops.values()), tops

    with torch.no_grad():
        raw = {
            "model(...).pooler_output": model(pixels).pooler_output,
            'pipeline("image-feature-extraction", pool=True)': pipeline(
                "image-feature-extraction", model=model, image_processor=processor
            )(Image.open(query), pool=True, return_tensors=True),
        }
    for way, vector in raw.items():
        with pytest.raises(ValueError, match=r"Query 0 has norm [0-9.]+, but this index holds unit-norm") as error:
            index.search(vector, 3)
        assert "model.get_image_embeddings(pixel_values)" in str(error.value)
        assert "index.search_images(images, model, processor)" in str(error.value)
        print(f"{way}: {error.value}")


def test_search_refuses_a_model_other_than_the_one_that_made_the_index(fitted_folder, tiny_folder, tmp_path, capsys):
    from franca_hf.features import load_model_and_processor
    from franca_hf.fingerprint import model_fingerprint

    index_folder = tmp_path / "index"
    assert main(["index", str(EXAMPLE_IMAGES), "--model", str(tiny_folder), "--out", str(index_folder)]) == 0
    model, processor = load_model_and_processor(str(tiny_folder))
    other, _ = load_model_and_processor(str(fitted_folder))
    index = EmbeddingIndex.load(index_folder)
    assert index.model == model_fingerprint(model) != model_fingerprint(other)
    with pytest.raises(ModelMismatchError, match=r"holds embeddings of the model .*tiny \(fingerprint v1:\w+\); this"):
        index.search_images([EXAMPLE_IMAGES / "rocket.jpg"], other, processor, k=2)
    bad = index.dims[0] + 1  # refused as `search` refuses it, on the funnel's path too, before anything is embedded
    for funnel in (True, False):
        with pytest.raises(
            UsageError, match=rf"This index: dim={bad} is not allowed; choose one of \[{index.dims[0]}, "
        ):
            index.search_images([EXAMPLE_IMAGES / "rocket.jpg"], model, processor, k=2, dim=bad, funnel=funnel)
        with pytest.raises(UsageError, match=r"k=0 is out of range: it must be between 1 and the index size"):
            index.search_images([EXAMPLE_IMAGES / "rocket.jpg"], model, processor, k=0, funnel=funnel)

    capsys.readouterr()
    search = ["search", str(EXAMPLE_IMAGES / "rocket.jpg"), "--index", str(index_folder), "--k", "2"]
    assert main([*search, "--model", str(fitted_folder)]) == 2
    refusal = capsys.readouterr().err
    print(refusal)
    assert (
        f"franca-hf search: error: The index {index_folder} holds embeddings of the model {tiny_folder} (fingerprint "
        f"{index.model}); this run's model {fitted_folder} has fingerprint {model_fingerprint(other)}"
    ) in refusal
    assert "or set allow_other_model=True to use this one anyway. (--allow-other-model)" in refusal
    assert main([*search, "--model", str(fitted_folder), "--allow-other-model"]) == 0
    assert main([*search, "--model", str(tiny_folder)]) == 0

    # an index built from an extract folder keeps the folder's fingerprint; --model there must be the same model
    features, built = tmp_path / "features", tmp_path / "from_features"
    assert main(["extract", str(EXAMPLE_IMAGES), "--model", str(tiny_folder), "--out", str(features)]) == 0
    capsys.readouterr()
    assert main(["index", str(features), "--out", str(built), "--model", str(fitted_folder)]) == 2
    assert f"The extract folder {features} holds embeddings of the model" in capsys.readouterr().err
    assert main(["index", str(features), "--out", str(built), "--model", str(tiny_folder)]) == 0
    assert EmbeddingIndex.load(built).model == index.model
    capsys.readouterr()
    search = ["search", str(EXAMPLE_IMAGES / "rocket.jpg"), "--index", str(features), "--model", str(fitted_folder)]
    assert main(search) == 2  # an extract folder searched directly (indexed in memory) is named too
    assert f"error: The index of the extract folder {features} holds embeddings of the model" in capsys.readouterr().err

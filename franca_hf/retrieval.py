"""Matryoshka retrieval over Franca embeddings on FAISS: exact and approximate (HNSW, IVF-PQ) first stages, exact
Matryoshka reranks, folders that open lazily and grow by appending extract shards.

Franca embeddings are Matryoshka-nested: the prefix `z[:m]` for `m` in `config.matryoshka_dims` is itself an
embedding. Cosine similarity at prefix `m` truncates query and database to `m` channels and L2-normalises AFTER
truncation, so scores are inner products of unit vectors.

* `EmbeddingIndex.search(queries, k, dim)`: exact top-k at one prefix (FAISS's brute-force inner product).
* `EmbeddingIndex.funnel_search(queries, k, stages)`: the first stage finds a shortlist at the smallest prefix
  (`dims[0]`, D/16 for Franca) with the index's first-stage engine (`ann`: exact "none", "hnsw" graph, or "ivfpq"
  compressed codes); each later stage reranks the shortlist exactly at a larger prefix, reading only the shortlisted
  rows of the full-width vectors (memory-mapped in a saved index). The first stage holds dims[0] / D of the data:
  16x less memory and build time than a full-width ANN index.
* `EmbeddingIndex.search_images(images, model, processor)`: embeds query images the way the index was built, after
  checking that the model is the one that built it (`model_fingerprint`).

A saved index is a folder (`MANIFEST_FILE` + the vectors as raw float32 + the ids as JSON lines, with where each line
starts + the first stage in FAISS's own format). Opening one reads the manifest only; vectors and ids are memory-mapped
(an id is read when asked for), the FAISS index is read on first use. `build_index` streams a `franca-hf extract`
folder's shards into one, with memory bounded by one shard plus the first stage, and `append=True` adds the shards that
are new since the last build.

`index(IndexSettings)` and `search(SearchSettings)` are the `franca-hf index` / `search` commands, one call each
(their settings live in the cheap `franca_hf.retrieval_settings`).
"""

import contextlib
import json
import logging
import math
import mmap
import operator
import os
import platform
import threading
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor

from .errors import InputNotFoundError, UsageError
from .features import ExtractedFeatures, extract_features
from .features.store import INDEX_FILE, SHARD_READ_ERRORS, ExtractionIndex, read_shard
from .fingerprint import check_same_model, model_fingerprint
from .io import FolderKind, check_folder_out, write_file_atomically, write_folder_atomically
from .modeling import (
    FrancaModel,
    check_nested_dims,
    default_matryoshka_dims,
    matryoshka_dim_problem,
    matryoshka_dims_of,
    normalized_prefix,
)
from .retrieval_settings import AnnSettings, IndexSettings, SearchSettings, physical_memory

logger = logging.getLogger(__name__)

FORMAT = "franca_hf.retrieval"
FORMAT_VERSION = 2
MANIFEST_FILE = "index.json"
INDEX_FOLDER = FolderKind("an index", (MANIFEST_FILE,))
VECTORS_FILE = "vectors.f32"
NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # the float tensors numpy can hold
IDS_FILE = "ids.jsonl"
IDS_STARTS_FILE = "ids.starts"  # where each row's line of IDS_FILE starts: little-endian uint64, one per row
STARTS = np.dtype("<u8")
# rows normalised at a time when a first stage or a prefix copy is filled from the full-width vectors
FILL_BLOCK = 65536
# a row of the full-width vectors has norm 1 within this when it is "the embedding" (`get_image_embeddings`)
UNIT_TOLERANCE = 1e-3
UNIT_SQUARES = ((1 - UNIT_TOLERANCE) ** 2, (1 + UNIT_TOLERANCE) ** 2)  # the squared norms within UNIT_TOLERANCE of 1
# Exact batches: from this many queries, matrix products over blocks of rows (`blocked_top_k`) beat FAISS's
# one-scan-per-query kernel, which FAISS runs while queries x width < its `distance_compute_blas_threshold`.
BLOCKED_MIN_QUERIES = 16
BLOCKED_QUERIES = 1024  # queries per block
BLOCKED_ROWS = 4096  # database rows per block, at least: 16 MiB of products at most for 1024 queries
BLOCKED_PRODUCTS = 65536  # products per block, at least: fewer queries take more rows at a time (one query, 65,536)
# Widths for which FAISS's transposed x86 kernels compute one query's inner products with every row 4-24x faster than
# its top-k scan does (`fvec_inner_products_ny`, measured at widths 2 to 12 over 20k rows): there, a single query is
# scanned that way, then heaped (2x the scan end to end at width 8).
ON_X86 = platform.machine().lower() in ("x86_64", "amd64")
TRANSPOSED_WIDTHS = {1, 2, 4, 8, 12} if ON_X86 else set()
# Exact scans of fewer than BLOCKED_MIN_QUERIES queries read a half-precision copy (`HalfPrecisionScan`) at widths that
# are multiples of 8 (FAISS's fp16 kernels are SIMD there; at width 12 they are 4x slower than the float scan), over
# tables of at least HALF_SCAN_MIN_BYTES of float32 and shortlists of at most 1/HALF_SCAN_MAX_SHARE of the rows;
# measured on x86 only. Below the floor the table stays in a 32 MiB L3 cache, where the half kernel (compute-bound)
# gains nothing on the float scan: 0.93-0.99x at 9 MiB (the demo's 19k x 128), against 1.3-1.4x at 18 MiB (100k x 48).
HALF_SCAN_WIDTH_MULTIPLE = 8 if ON_X86 else 0
HALF_SCAN_MIN_BYTES = 16 << 20
HALF_SCAN_MAX_SHARE = 64
HALF_FILL_BLOCK = 8192  # rows rounded to half precision at a time
HALF_SCAN_SPARE = 8  # rows shortlisted beyond k: enough to settle every query measured (docs/retrieval.md)
# A half-precision copy is made in one shard per FAISS thread, of this many bytes at least (and at most
# HALF_SCAN_MAX_SHARE shards, so that each holds k + HALF_SCAN_SPARE rows); a query that FAISS would share out among
# its threads searches them in parallel: on 2 threads here, 1.2x one shard over a 9 MiB copy (shards of 4.6 MiB) to
# 1.9x over 1.5 GiB, where FAISS's shared-out float scan took 2.0-5.6x as long as one shard (docs/retrieval.md).
HALF_SCAN_SHARD_BYTES = 4 << 20
# Exact scans of fewer than BLOCKED_MIN_QUERIES queries that no half-precision copy serves (tables under
# HALF_SCAN_MIN_BYTES, in the caches: the scan is compute-bound there) compute bounds in the rows' principal axes first
# (`PrincipalBoundScan`), when those axes leave at most BOUND_SCAN_TAIL of the rows' energy to the BOUND_SCAN_SEGMENTS
# tail segments of a table at most a quarter of the width, for k at most 1/BOUND_SCAN_MAX_SHARE of the rows. On the demo
# teacher's 19k x 128 embeddings (prefix or fitted basis): a table of 24 channels (docs/retrieval.md).
BOUND_SCAN_SEGMENTS = 8
BOUND_SCAN_TAIL = 0.1
BOUND_SCAN_MAX_SHARE = 64
BOUND_SCAN_SHORTLIST_SHARE = 8  # a query whose bounds leave more than this share of the rows to rescore: a float scan
BOUND_SCAN_SPARE = 4  # a first floor leaves about this many times k rows above it: enough to settle most queries
BOUND_SCAN_GROUP = 16  # rows whose largest bound is taken together for the floor, at most
BOUND_SCAN_FIT_ROWS = 16384  # rows the principal axes are fitted on, at most (evenly spaced)


def default_funnel(dims: Sequence[int], k: int) -> list[tuple[int, int]]:
    """MRL's funnel for nested `dims` and top-k: shortlist 20·k at dims[0], rerank to 5·k at the middle dim, k at D.

    For Franca (dims = [D/16, D/8, D/4, D/2, D]) and k = 10 this is [(D/16, 200), (D/4, 50), (D, 10)].
    """
    # a dict keeps one stage per dim (the later, smaller size) when dims has fewer than three entries
    return list({dims[0]: 20 * k, dims[len(dims) // 2]: 5 * k, dims[-1]: k}.items())


def unit_rows(block: np.ndarray, dim: int, first_row: int = 0, ids: Sequence[str] | None = None) -> np.ndarray:
    """(n, dim) float32 C-contiguous L2-normalised prefixes of `block` (rows `first_row`… of a collection, named by
    `ids`, one per row of the block), cut and normalised by `normalized_prefix`; errors on zero or non-finite ones."""
    cut = np.ascontiguousarray(block[:, :dim], dtype=np.float32)
    if not cut.flags.writeable:  # a memory-mapped block: torch takes writable arrays only
        cut = cut.copy()
    units = normalized_prefix(torch.from_numpy(cut), dim)
    bad = ~(torch.linalg.vector_norm(units, dim=1) > 0.5)  # a zero row normalises to zeros, a non-finite one to NaN
    if bad.any():
        at = int(torch.nonzero(bad)[0, 0])
        row, name = first_row + at, f" ({ids[at]!r})" if ids is not None else ""
        raise UsageError(
            f"Row {row}{name} has a zero or non-finite prefix of length {dim} (norm {np.linalg.norm(cut[at])}), so its "
            "cosine similarity is undefined."
        )
    return units.numpy()


@dataclass
class IndexManifest:
    """`index.json`: what the index holds and how its first stage was built.

    Attributes:
        rows, width: the full-width vectors are (rows, width) float32 in `VECTORS_FILE`.
        dims: allowed prefix lengths.
        settings: the resolved `AnnSettings`.
        first_stage: file of the FAISS first stage (None for "none", which scans the vectors).
        unit: every full-width row has unit norm (the index holds `get_image_embeddings` outputs).
        model: `model_fingerprint` of the model that made the vectors, when known.
        model_name: that model as it was given (a folder, Hub id or release name), when known.
        ids_bytes: length of the committed part of `IDS_FILE` (an interrupted append leaves more).
        sources: extract shards already in the index (`build_index` with `append=True` adds the others).
    """

    rows: int
    width: int
    dims: list[int]
    settings: dict
    first_stage: str | None
    unit: bool
    model: str | None = None
    model_name: str | None = None
    ids_bytes: int = 0
    sources: list[str] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        document = {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}
        write_file_atomically(
            folder / MANIFEST_FILE, lambda staging: staging.write_text(json.dumps(document, indent=1))
        )

    @classmethod
    def load(cls, folder: Path) -> "IndexManifest":
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise InputNotFoundError(
                f"{folder} is not a franca_hf retrieval index (no {MANIFEST_FILE}). Build one with "
                "`franca-hf index` or EmbeddingIndex(vectors, ids).save(folder)."
            )
        try:
            document = json.loads(path.read_bytes())
            version = (document.pop("format", None), document.pop("version", None))
        except (ValueError, AttributeError) as error:  # not JSON, not UTF-8, or not an object
            raise damaged_index(folder, f"{MANIFEST_FILE} cannot be read ({error})") from None
        if version != (FORMAT, FORMAT_VERSION):
            raise UsageError(f"{path} is not a franca_hf retrieval index of version {FORMAT_VERSION}; rebuild it.")
        try:
            return cls(**document)
        except TypeError as error:
            raise damaged_index(folder, f"{MANIFEST_FILE} holds other fields ({error})") from None


class EmbeddingIndex:
    """Full-width embeddings, their ids and allowed nested dims, searched with FAISS at any allowed prefix.

    Args:
        vectors: (N, D) embeddings, any scale (cosine is scale-free at every prefix); a torch tensor or a numpy
            array (a memory map, say). Held in a buffer of the index's own (`huge_page_array`), as FAISS's flat
            index copies what it is given, unless it already lies in a memory map (a saved index's file, or such a
            buffer), which is used in place.
        ids: N names (image paths, say); "0" … "N-1" when None.
        dims: allowed prefix lengths, strictly increasing and ending at D; Franca's [D/16, D/8, D/4, D/2, D] when
            None. Use `model.config.matryoshka_dims` for embeddings of a FrancaModel.
        settings: how the first stage is built (`AnnSettings`; "auto" by size when None).
        model: `model_fingerprint` of the model that made the vectors; `search_images` checks it.
        model_name: that model as given (for messages).
        device: "cuda" runs FAISS on the GPU when faiss-gpu is installed and sees one (`faiss_on_gpu`), on the CPU
            otherwise.
    """

    def __init__(
        self,
        vectors: torch.Tensor | np.ndarray,
        ids: Sequence[str] | None = None,
        dims: Sequence[int] | None = None,
        settings: AnnSettings | None = None,
        model: str | None = None,
        model_name: str | None = None,
        device: str | torch.device = "cpu",
    ):
        array = numpy_of(vectors) if isinstance(vectors, torch.Tensor) else vectors
        if array.ndim != 2 or array.dtype.kind != "f" or not array.size:
            raise ValueError(
                f"vectors must be a non-empty (N, D) float tensor; got shape {tuple(array.shape)}, {array.dtype}."
            )
        if array.dtype == np.float32 and array.flags.c_contiguous and on_memory_map(array):
            self._array = array
        else:
            self._array = huge_page_array(*array.shape)
            self._array[:] = array
        size, width = self._array.shape
        if ids is not None and len(ids) != size:
            raise ValueError(f"Got {len(ids)} ids for {size} vectors; pass one id per row.")
        self._ids = None if ids is None else [str(i) for i in ids]
        dims = default_matryoshka_dims(width) if dims is None else check_nested_dims(dims, width, "dims")
        unit = True
        for start in range(0, size, FILL_BLOCK):
            block = self._array[start : start + FILL_BLOCK]
            for dim in dims:
                unit_rows(
                    block, dim, start, self._ids and self._ids[start : start + FILL_BLOCK]
                )  # raises on a zero or non-finite prefix, naming the row
            unit &= bool(np.all(np.abs(np.linalg.norm(block, axis=1) - 1) < UNIT_TOLERANCE))
        resolved = (settings or AnnSettings()).resolve(size, dims[0])
        manifest = IndexManifest(size, width, dims, asdict(resolved), None, unit, model, model_name)
        self._init(manifest, None, device)

    def _init(self, manifest: IndexManifest, folder: Path | None, device) -> None:
        self.manifest, self.folder, self.device = manifest, folder, torch.device(device)
        self.named = "The index" if folder is None else f"The index {folder}"  # how messages name it
        self._faiss_gpu: bool | None = None  # whether FAISS searches on self.device's GPU: decided on first search
        self.dims: list[int] = manifest.dims
        self.settings = AnnSettings(**manifest.settings).of_own_kind()
        self._first = None  # the FAISS first stage, built or read on first use
        self._lazy_lock = threading.Lock()  # one thread reads the ids or builds the first stage; others wait for it
        self._opened = OpenedFiles()  # a saved index's ids and first-stage files by name: descriptors since `load`
        self._unit_prefixes: dict[int, np.ndarray] = {}  # exact-scan copies, made on first use
        self._half_scans: dict[int, HalfPrecisionScan | None] = {}  # by width, made on first use; None: not worth it
        self._bound_scans: dict[int, PrincipalBoundScan | None] = {}  # likewise
        self._search_parameters: dict[int, object] = {}  # FAISS first-stage parameters by shortlist size
        self._prefix_masks: dict[tuple[int, ...], np.ndarray] = {}  # by cuts: _checked_queries

    def __len__(self) -> int:
        return self.manifest.rows

    @property
    def width(self) -> int:
        """D, the full embedding width."""
        return self.manifest.width

    @property
    def vectors(self) -> torch.Tensor:
        """(N, D) float32 full-width vectors (sharing the index's memory or memory map: do not modify)."""
        return torch.from_numpy(self._array)

    @property
    def ids(self) -> Sequence[str]:
        """The N row names: a list in memory, or for a saved index a `StoredIds`, each id read from its files when
        asked for (indexing, slices, iteration; equal to a list of the same ids)."""
        if self._ids is None:
            if self.folder is None:
                self._ids = [str(i) for i in range(len(self))]
            else:
                with self._lazy_lock:
                    if self._ids is None:
                        self._ids = self._stored_ids()
        return self._ids

    def _stored_ids(self) -> "StoredIds":
        rows, lines = len(self), read_only_map(self._opened[IDS_FILE], self.manifest.ids_bytes)
        if IDS_STARTS_FILE in self._opened:
            starts = np.frombuffer(read_only_map(self._opened[IDS_STARTS_FILE], rows * STARTS.itemsize), STARTS)
        else:  # a folder saved before the starts were
            starts = line_starts(lines, rows)
        return StoredIds(lines, starts, self.manifest.ids_bytes)

    @property
    def model(self) -> str | None:
        """`model_fingerprint` of the model that made the vectors, when known."""
        return self.manifest.model

    def describe(self) -> str:
        """'100000 x 768, nested [48, ..., 768], first stage hnsw M=32 ... at 48 dims', say."""
        return f"{len(self)} x {self.width}, nested {self.dims}, first stage {self.settings.describe(self.dims[0])}"

    def prefix(self, dim: int) -> torch.Tensor:
        """(N, dim) database prefixes, L2-normalised after truncation (for export to another engine, say)."""
        self.check_dim(dim)
        return torch.from_numpy(self._unit_prefix(dim))

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int = 10, dim: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
        """Exact top-k by cosine similarity of the `dim`-channel prefixes (D when None).

        Args:
            queries: (Q, D) full-width queries, or (Q, dim) ones already cut to the prefix; a torch tensor or a
                numpy array.
        Returns:
            scores (Q, k) cosine similarities, descending, and indices (Q, k) into `ids`: torch tensors for a tensor
            of queries, numpy arrays for an array (as FAISS's `faiss.contrib.torch_utils` answers).
        """
        dim = self.width if dim is None else dim
        self.check_dim(dim)  # raises on a dim that is not allowed
        self._check_k(k)
        array, norms = self._checked_queries(queries, [dim])
        return cosines(*self._exact(array, dim, k), norms, isinstance(queries, torch.Tensor))

    def funnel_search(
        self, queries: torch.Tensor | np.ndarray, k: int = 10, stages: Sequence[tuple[int, int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
        """Top-k by a cascade of prefixes: stage 1 keeps `size_1` candidates at `dim_1` (with the first-stage engine
        when dim_1 is dims[0], else exactly), each later stage keeps the best `size_i` of the previous shortlist at
        `dim_i`, exactly, and the last one's top k is returned. A first stage that finds fewer than `size_1` rows (an
        IVF-PQ probing few cells, say) shortlists those; should fewer than k be found in all, the results end in
        index -1 with score -inf, as FAISS pads them.

        Args:
            queries: (Q, D) full-width queries, or (Q, d) ones cut to the last stage's dim d; a torch tensor or a
                numpy array.
            stages: [(dim_1, size_1), …]: dims allowed and strictly increasing, sizes non-increasing and >= k
                (sizes above N act as N). `default_funnel(self.dims, k)` when None.
        Returns:
            scores (Q, k) cosine similarities at the last stage's prefix, descending, and indices (Q, k): torch
            tensors for a tensor of queries, numpy arrays for an array.
        """
        self._check_k(k)
        stages = self._checked_stages(default_funnel(self.dims, k) if stages is None else stages, k)
        array, norms = self._checked_queries(queries, [dim for dim, _ in stages])
        # An inner-product ranking ignores the query's scale: every stage ranks with the raw query prefix, and only
        # the scores of the last stage are divided by that prefix's norm (cosines).
        first_dim, first_size = stages[0]
        size = min(first_size, len(self))
        if first_dim == self.dims[0] and self.settings.ann != "none":
            scores, indices = self._approximate(array[:, :first_dim], size)
        else:
            scores, indices = self._exact(array, first_dim, size)
        for dim, size in stages[1:]:
            scores, indices = self._rerank(array, indices, dim, size)
        return cosines(scores[:, :k], indices[:, :k], norms, isinstance(queries, torch.Tensor))

    def search_images(
        self,
        images: Sequence[str | os.PathLike],
        model: FrancaModel,
        image_processor: BaseImageProcessor,
        k: int = 10,
        dim: int | None = None,
        funnel: bool | None = None,
        allow_other_model: bool = False,
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Embed query images with `model` the way the index was built and search them.

        The model must be the one that made the index (same `model_fingerprint`) unless `allow_other_model`.
        `funnel` None: the funnel when the index has an ANN first stage, exact search at `dim` otherwise.
        Returns the query paths that could be read, scores (Q, k) and indices (Q, k) into `ids`.
        """
        if dim is not None:
            self.check_dim(dim)
        self._check_k(k)
        check_model(self.model, self.manifest.model_name, model, self.named, allow_other_model)
        if model.config.hidden_size < self.width:
            raise UsageError(
                f"{self.named} holds {self.width}-dim embeddings; the model makes {model.config.hidden_size}-dim "
                "ones. Search with the model that built the index."
            )
        queries = extract_features(model, image_processor, images, dim=self.width, progress=False)
        stages = self.image_search_stages(k, dim, funnel)
        if stages is not None:
            return queries.paths, *self.funnel_search(queries.features, k, stages)
        return queries.paths, *self.search(queries.features, k, dim)

    def image_search_stages(
        self, k: int, dim: int | None = None, funnel: bool | None = None
    ) -> list[tuple[int, int]] | None:
        """The cascade `search_images` runs for the top k at prefix `dim` (D when None): `default_funnel` of the dims
        up to `dim`, its shortlists no longer than the index; None for an exact search at `dim`. `funnel` None: the
        funnel when the index has an ANN first stage."""
        if not (self.settings.ann != "none" if funnel is None else funnel):
            return None
        dims = [d for d in self.dims if d <= (self.width if dim is None else dim)]
        return [(d, min(size, len(self))) for d, size in default_funnel(dims, k)]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index as a folder (vectors, ids, FAISS first stage, manifest), replacing one there at once."""
        folder = Path(folder)
        check_folder_out(folder, INDEX_FOLDER, overwrite=True)

        def fill(staging: Path) -> None:
            self._array.tofile(staging / VECTORS_FILE)
            with open(staging / IDS_FILE, "wb") as lines, open(staging / IDS_STARTS_FILE, "wb") as starts:
                ids_bytes = write_ids(self.ids, lines, starts)
            manifest = replace(self.manifest, ids_bytes=ids_bytes, first_stage=None)
            if self.settings.ann != "none":
                manifest.first_stage = write_first_stage(staging, self.first_stage(), len(self))
            manifest.save(staging)

        return write_folder_atomically(folder, fill, INDEX_FOLDER, overwrite=True)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "EmbeddingIndex":
        """Open an index folder written by `save` or `build_index`: reads the manifest, memory-maps the vectors."""
        folder = Path(folder)
        manifest = IndexManifest.load(folder)
        starts = IDS_STARTS_FILE if (folder / IDS_STARTS_FILE).is_file() else None
        needed = {VECTORS_FILE: manifest.rows * manifest.width * 4, IDS_FILE: manifest.ids_bytes}
        needed.update({starts: manifest.rows * STARTS.itemsize, manifest.first_stage: 1})
        for name, size in needed.items():  # an append leaves files longer than committed, never shorter
            if name is None:
                continue
            if not (folder / name).is_file():
                raise damaged_index(folder, f"{name} is missing")
            if (folder / name).stat().st_size < size:
                raise damaged_index(
                    folder, f"{name} holds {(folder / name).stat().st_size} bytes, where {size} are committed"
                )
        index = cls.__new__(cls)
        index._array = np.memmap(folder / VECTORS_FILE, np.float32, "c", shape=(manifest.rows, manifest.width))
        index._ids = None
        index._init(manifest, folder, device)
        # Read lazily, but from the files of this manifest: opened now, they stay this index's when the folder is
        # replaced or appended to later (as the memory-mapped vectors do).
        for name in (IDS_FILE, starts, manifest.first_stage):
            if name is not None:
                index._opened.open(folder, name)
        return index

    def _read_opened(self, name: str):
        """A binary reader of the file `name` opened by `load`, from its start (call it under `_lazy_lock`)."""
        handle = os.fdopen(os.dup(self._opened[name]), "rb")
        handle.seek(0)
        return handle

    def first_stage(self):
        """The FAISS first stage over the unit dims[0] prefixes: built from the vectors, or read from the folder (once,
        by whichever thread asks first; the others wait for it)."""
        if self._first is None:
            with self._lazy_lock:
                if self._first is None:
                    self._first = on_device(self._new_first_stage(), self.device)
        return self._first

    def _new_first_stage(self):
        if self.folder is not None and self.manifest.first_stage is not None:
            import faiss

            with self._read_opened(self.manifest.first_stage) as handle:
                try:
                    return faiss.read_index(faiss.PyCallbackIOReader(handle.read))
                except RuntimeError as error:  # FAISS's for a file it cannot parse
                    reason = str(error).strip().splitlines()[-1]
                    raise damaged_index(self.folder, f"{self.manifest.first_stage} cannot be read ({reason})") from None
        first = new_first_stage(self.settings, self.dims[0])
        train_first_stage(first, self._array, self.dims[0])
        for start in range(0, len(self), FILL_BLOCK):
            add_to_first_stage(first, unit_rows(self._array[start : start + FILL_BLOCK], self.dims[0]), start)
        return first

    def _unit_prefix(self, dim: int) -> np.ndarray:
        """(N, dim) unit prefixes, C-contiguous: the full-width vectors themselves when they are unit."""
        if dim == self.width and self.manifest.unit:
            return self._array
        if dim not in self._unit_prefixes:
            copy = huge_page_array(len(self), dim)
            for start in range(0, len(self), FILL_BLOCK):
                copy[start : start + FILL_BLOCK] = unit_rows(self._array[start : start + FILL_BLOCK], dim, start)
            self._unit_prefixes[dim] = copy
        return self._unit_prefixes[dim]

    def _exact(self, queries: np.ndarray, dim: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (Q, k) by inner product of the unit `dim` prefixes with the queries' `dim` prefixes, any scale."""
        import faiss

        database, count = self._unit_prefix(dim), len(queries)
        cut = queries if queries.shape[1] == dim else np.ascontiguousarray(queries[:, :dim])
        if self._faiss_gpu is None:
            self._faiss_gpu = faiss_on_gpu(self.device)
        if self._faiss_gpu:
            gpu = self.device.index or 0
            return faiss.knn_gpu(gpu_resources(), cut, database, k, metric=faiss.METRIC_INNER_PRODUCT, device=gpu)
        if count >= BLOCKED_MIN_QUERIES:
            if count * dim < faiss.cvar.distance_compute_blas_threshold and torch_products_in_float32():
                return blocked_top_k(cut, database, k)
        else:
            # FAISS shares out one query's rows among its threads for fewer queries than threads over a large table:
            # there, only a sharded half-precision copy (its shards searched in parallel) is faster; elsewhere the
            # kernels below run a query on one thread, as FAISS's does
            shared = faiss_splits_rows(count, len(database))
            if count == 1 and dim in TRANSPOSED_WIDTHS and not shared:
                return blocked_top_k(cut, database, k)
            half = self._half_scan(dim, k)
            if half is not None and (half.shards > 1 or not shared):
                return half.top_k(cut, database, k, parallel=shared)
            bound = self._bound_scan(dim, k) if half is None and torch_products_in_float32() else None
            if bound is not None:
                return bound.top_k(cut, database, k)
        return float_top_k(cut, database, k)

    def _half_scan(self, dim: int, k: int) -> "HalfPrecisionScan | None":
        """The half-precision copy of the unit `dim` prefixes, made on first use, when it beats the float scan for k."""
        rows = len(self)
        if (k + HALF_SCAN_SPARE) * HALF_SCAN_MAX_SHARE > rows:
            return None
        if dim not in self._half_scans:
            worth = (
                self.settings.half_scan
                and HALF_SCAN_WIDTH_MULTIPLE
                and dim % HALF_SCAN_WIDTH_MULTIPLE == 0
                and rows * dim * 4 >= HALF_SCAN_MIN_BYTES
                and rows * dim * 2 <= physical_memory() / 4
            )
            if worth:
                import faiss

                shards = min(faiss.omp_get_max_threads(), HALF_SCAN_MAX_SHARE, rows * dim * 2 // HALF_SCAN_SHARD_BYTES)
                self._half_scans[dim] = HalfPrecisionScan(self._unit_prefix(dim), max(shards, 1))
            else:
                self._half_scans[dim] = None
        return self._half_scans[dim]

    def _bound_scan(self, dim: int, k: int) -> "PrincipalBoundScan | None":
        """The bound table of the unit `dim` prefixes (`PrincipalBoundScan`), fitted on first use, where the table
        is under HALF_SCAN_MIN_BYTES, its principal axes qualify and the shortlist for k is short enough."""
        rows = len(self)
        if k * BOUND_SCAN_MAX_SHARE > rows:
            return None
        if dim not in self._bound_scans:
            worth = self.settings.bound_scan and rows * dim * 4 < HALF_SCAN_MIN_BYTES
            self._bound_scans[dim] = PrincipalBoundScan.fit(self._unit_prefix(dim)) if worth else None
        return self._bound_scans[dim]

    def prepare(self, dims: Sequence[int]) -> int:
        """Make now, rather than on the first exact scan at each of `dims`, the copies that scan reads: the unit
        prefix copy and, where the half-precision scan applies (`HalfPrecisionScan`), its copy, in one shard per
        FAISS thread at this moment, or else, where it applies, the bound table (`PrincipalBoundScan`); a service
        warms up with it, on the threads it will search with (3 s for the half copy of 1M x 768 on 2 cores here).
        Returns the bytes they hold beyond the vectors."""
        for dim in dims:
            self.check_dim(dim)
            self._unit_prefix(dim)
            if self._half_scan(dim, 1) is None:
                self._bound_scan(dim, 1)
        return sum(self.copy_bytes(dim) for dim in set(dims))

    def copy_bytes(self, dim: int) -> int:
        """Bytes this index holds beyond its vectors for exact scans at `dim`: the unit prefix copy, the
        half-precision copy and the bound table, where made so far."""
        copies = self._unit_prefixes.get(dim), self._half_scans.get(dim), self._bound_scans.get(dim)
        return sum(copy.nbytes for copy in copies if copy is not None)

    def _approximate(self, queries: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        first = self.first_stage()
        params = self._search_parameters.get(size)
        if params is None:  # made once per shortlist size: building the SWIG object costs as much as a rerank step
            if self.settings.ann == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=max(self.settings.ef_search, size))
            else:
                params = faiss.SearchParametersIVF(nprobe=self.settings.nprobe)
            self._search_parameters[size] = params
        scores, indices = first.search(queries, size, params=params)
        if padded(indices):  # a graph or inverted lists found fewer than `size` rows
            scores[indices < 0] = -np.inf
        return scores, indices

    def _rerank(self, queries: np.ndarray, rows: np.ndarray, dim: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The best `size` of the shortlisted rows (Q, S) of each query, descending, by their cosine with the query at
        prefix `dim` times that query prefix's norm (queries: (Q, width) C-contiguous, any scale)."""
        if dim == self.width and self.manifest.unit:
            import faiss

            # FAISS reads the shortlisted rows in place (the memory map too) and keeps the best: no gathered copy.
            # The last argument, the row stride of `rows`, is needed: its default is the database size, not S.
            rows = np.ascontiguousarray(rows, dtype=np.int64)
            (queries_count, shortlist), size = rows.shape, min(size, rows.shape[1])
            scores, picked = np.empty((queries_count, size), np.float32), np.empty((queries_count, size), np.int64)
            pointers = [faiss.swig_ptr(a) for a in (queries, self._array, rows, scores, picked)]
            faiss.knn_inner_products_by_idx(  # stops at a shortlist's padding
                *pointers[:3], dim, queries_count, len(self), shortlist, size, *pointers[3:], shortlist
            )
            if padded(picked):  # fewer than `size` rows shortlisted: FAISS's empty slots, here as in the first stage
                scores[picked < 0] = -np.inf
            return scores, picked
        # reads only the shortlisted rows; whole rows are gathered twice as fast as row segments
        candidates = self._array.take(rows, axis=0) if dim == self.width else self._array[rows.reshape(-1), :dim]
        candidates = candidates.reshape(*rows.shape, dim)
        # a batched matrix-vector product (BLAS) is ~3x faster than einsum's loops at these sizes
        scores = np.matmul(candidates, queries[:, :dim, None])[:, :, 0]
        scores /= np.sqrt(np.einsum("qsd,qsd->qs", candidates, candidates))
        if padded(rows):  # the padding gathered the last row: it ranks last and stays padding
            scores[rows < 0] = -np.inf
        pick = np.argsort(-scores, axis=1, kind="stable")[:, :size]
        query_rows = np.arange(len(rows))[:, None]
        return scores[query_rows, pick], rows[query_rows, pick]

    def check_dim(self, dim: int) -> None:
        """A UsageError (setting `dim`) unless `dim` is one of the index's dims; the message lists them."""
        problem = matryoshka_dim_problem(dim, self.dims)
        if problem:
            raise UsageError(f"This index: {problem}", setting="dim")

    def _check_k(self, k: int) -> None:
        if not _is_integer(k):
            raise UsageError(f"k={k!r} is not an integer; give the number of results per query.", setting="k")
        if not 1 <= k <= len(self):
            raise UsageError(f"k={k} is out of range: it must be between 1 and the index size ({len(self)}).")

    def _checked_queries(
        self, queries: torch.Tensor | np.ndarray, dims: list[int]
    ) -> tuple[np.ndarray, np.ndarray | float]:
        """The queries as a (Q, width) float32 C-contiguous array and the (Q, 1) norms of their prefixes at dims[-1] (a
        float for one query: dividing by one is half the cost of dividing by an array), after checking their shape,
        that no prefix at `dims` is zero or non-finite and, for an index of unit-norm embeddings, that full-width ones
        have unit norm."""
        if not isinstance(queries, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"queries must be a torch tensor or a numpy array of shape (Q, width); got a {type(queries).__name__}."
            )
        if queries.ndim != 2 or queries.shape[1] not in (self.width, dims[-1]):
            widths = sorted({dims[-1], self.width})
            raise ValueError(
                f"queries must have shape (Q, width) with width in {widths} (full, or already cut to the searched "
                f"prefix); got {tuple(queries.shape)}. Use queries[None] for a single query."
            )
        array = queries if isinstance(queries, np.ndarray) else numpy_of(queries)
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=np.float32)
        check_unit = self.manifest.unit and array.shape[1] == self.width
        cuts = dims if not check_unit or dims[-1] == self.width else [*dims, self.width]
        if len(array) == 1:
            # FAISS's norm of a contiguous float run, one C call per prefix, instead of the numpy calls below, which
            # run with the caches just emptied by the previous scan (a few percent of a scan over a cached table)
            import faiss

            pointer = faiss.swig_ptr(array)
            squares = [faiss.fvec_norm_L2sqr(pointer, cut) for cut in cuts]
            last = squares[-1]
            fine = 0 < squares[0] and math.isfinite(last)
            if check_unit:
                fine = fine and UNIT_SQUARES[0] <= last <= UNIT_SQUARES[1]
            if fine:
                return array, math.sqrt(squares[len(dims) - 1])
        elif len(array):
            mask = self._prefix_masks.get(tuple(cuts))
            if mask is None:  # (cuts[-1], n): column i sums the first cuts[i] channels
                mask = (np.arange(cuts[-1])[:, None] < np.array(cuts)).astype(np.float32)
                self._prefix_masks[tuple(cuts)] = mask
            # one BLAS call gives every prefix norm; an overflowing square, or a non-finite channel (inf x 0 in the
            # product), is judged below, not warned of
            with np.errstate(over="ignore", invalid="ignore"):
                squares = np.square(array if cuts[-1] == array.shape[1] else array[:, : cuts[-1]])
                norms = np.sqrt(np.dot(squares, mask))
            # Prefix norms grow with the prefix, so the least of the first column and the last column settle every
            # stage: a non-finite channel of any stage makes its row's last norm inf or NaN, and so their sum. In
            # Python floats: numpy calls cost more than these tests for a few queries.
            columns = norms.T.tolist()
            first, last = columns[0], columns[-1]
            fine = math.isfinite(sum(last)) and min(first) > 0
            if check_unit:
                fine = fine and 1 - UNIT_TOLERANCE <= min(last) and max(last) <= 1 + UNIT_TOLERANCE
            if fine:
                return array, norms[:, len(dims) - 1 : len(dims)]
        else:
            return array, np.ones((0, 1), np.float32)
        # find the culprit, or clear the doubt (a non-finite channel that no stage reads)
        norms = prefix_norms(array, cuts)
        refuse_bad_queries(norms, dims, check_unit)
        return array, norms[:, len(dims) - 1 : len(dims)]

    def _checked_stages(self, stages: Sequence[tuple[int, int]], k: int) -> list[tuple[int, int]]:
        """`stages` as (dim, size) pairs of ints (numpy's and torch's integers taken), after checking them."""
        if not stages:
            raise ValueError("stages is empty; pass at least one (dim, shortlist size) pair.")
        dims, sizes = [d for d, _ in stages], [s for _, s in stages]
        if not all(map(_is_integer, sizes)):
            raise ValueError(f"Stage shortlist sizes must be integers; got {sizes}.")
        for dim in dims:
            self.check_dim(dim)
        if dims != sorted(set(dims)):
            raise ValueError(f"Stage dims must be strictly increasing; got {dims}.")
        if sizes != sorted(sizes, reverse=True) or sizes[-1] < k:
            raise ValueError(f"Stage shortlist sizes must be non-increasing and all >= k={k}; got {sizes}.")
        return [(operator.index(dim), operator.index(size)) for dim, size in zip(dims, sizes, strict=True)]


class OpenedFiles(dict):
    """Read-only descriptors of files by name, closed when the last reference to this object goes (copies of an
    index share it)."""

    def open(self, folder: Path, name: str) -> None:
        self[name] = os.open(folder / name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        weakref.finalize(self, os.close, self[name])


class StoredIds(Sequence):
    """The ids of a saved index, each read from its JSON lines when asked for: a billion ids take no RAM.

    Args:
        lines: the bytes of `IDS_FILE` (a read-only memory map).
        starts: (N,) where each row's line starts in `lines`.
        end: where the last line ends.
    """

    def __init__(self, lines, starts: np.ndarray, end: int):
        self.lines, self.starts, self.end = lines, starts, end

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[row] for row in range(*item.indices(len(self)))]
        row = operator.index(item)
        if not -len(self) <= row < len(self):
            raise IndexError(f"id {row} is out of range for {len(self)} ids.")
        row %= len(self)
        stop = int(self.starts[row + 1]) if row + 1 < len(self) else self.end
        line = self.lines[int(self.starts[row]) : stop]
        # '"name"\n': ASCII JSON (`json.dumps`), whose only escapes start with a backslash
        return json.loads(line) if b"\\" in line else line[1:-2].decode("ascii")

    def __eq__(self, other) -> bool:
        if isinstance(other, str) or not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(mine == theirs for mine, theirs in zip(self, other, strict=True))

    __hash__ = None


def read_only_map(descriptor: int, size: int):
    """The first `size` bytes of an open file, memory-mapped read-only (empty bytes for none)."""
    return mmap.mmap(descriptor, size, access=mmap.ACCESS_READ) if size else b""


def line_starts(lines, rows: int) -> np.ndarray:
    """(rows,) where each of the first `rows` newline-ended lines of `lines` starts, read 64 MiB at a time."""
    starts, found, block = np.zeros(rows, STARTS), 1, 1 << 26
    for offset in range(0, len(lines), block):
        chunk = np.frombuffer(lines, np.uint8, count=min(block, len(lines) - offset), offset=offset)
        following = np.flatnonzero(chunk == ord("\n"))[: rows - found] + offset + 1  # the next line starts after one
        starts[found : found + len(following)] = following
        found += len(following)
    return starts


def write_ids(ids: Sequence[str], lines, starts, first_byte: int = 0) -> int:
    """Append `ids` to an ids file `lines` (JSON lines, ASCII) and where each starts, counted from `first_byte` (the
    file's length so far), to a starts file; returns the bytes written to `lines`. A `StoredIds` is copied as stored."""
    if isinstance(ids, StoredIds):
        lines.write(memoryview(ids.lines)[: ids.end])
        starts.write((ids.starts.astype(np.int64) + first_byte).astype(STARTS).tobytes())
        return ids.end
    encoded = [json.dumps(i) + "\n" for i in ids]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    lines.write("".join(encoded).encode())
    starts.write((first_byte + np.cumsum(lengths) - lengths).astype(STARTS).tobytes())
    return int(lengths.sum())


def _is_integer(value) -> bool:
    """An int, or numpy's or torch's integer; never 2.0 (nor a bool)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array on the CPU: float32 for a float type numpy lacks (bfloat16, say)."""
    if tensor.dtype not in NUMPY_FLOATS and tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy(force=True)


def prefix_norms(queries: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """(Q, len(dims)) float32 L2 norms of the queries' prefixes at strictly increasing `dims`, from one pass over them
    in float64 (a channel above 2^64, whose square float32 cannot hold, still has a norm)."""
    segments = np.add.reduceat(np.square(queries[:, : dims[-1]], dtype=np.float64), [0, *dims[:-1]], axis=1)
    return np.sqrt(np.cumsum(segments, axis=1)).astype(np.float32)


def padded(rows: np.ndarray) -> bool:
    """Whether result rows (Q, S) hold padding (-1): FAISS pads a result list shorter than S at its end (score
    -inf here), and the reranks keep it there."""
    return min(rows[:, -1].tolist(), default=0) < 0


def refuse_bad_queries(norms: np.ndarray, dims: Sequence[int], check_unit: bool) -> None:
    """A ValueError naming the first query whose full norm is not 1 (when `check_unit`: norms' last column is the full
    norm) or, else, the first stage and query whose prefix norm at `dims` (norms' first columns) is zero or
    non-finite; nothing when there is none."""
    if check_unit:
        far = np.abs(norms[:, -1] - 1) > UNIT_TOLERANCE
        if far.any():
            row = int(np.flatnonzero(far)[0])
            raise ValueError(
                f"Query {row} has norm {norms[row, -1]:.4g}, but this index holds unit-norm Matryoshka embeddings: "
                "the query is not one of them (the raw CLS of `model(...).pooler_output` or "
                "pipeline('image-feature-extraction') is, say). Embed queries with "
                "model.get_image_embeddings(pixel_values), or search images with index.search_images(images, model, "
                "processor)."
            )
    bad = ~np.isfinite(norms[:, : len(dims)]) | (norms[:, : len(dims)] == 0)
    if bad.any():
        stage = int(np.flatnonzero(bad.any(axis=0))[0])
        row = int(np.flatnonzero(bad[:, stage])[0])
        raise ValueError(f"Query {row} has a zero or non-finite prefix of length {dims[stage]}; cosine is undefined.")


def cosines(
    scores: np.ndarray, indices: np.ndarray, norms: np.ndarray | float, as_tensors: bool
) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
    """Search results: `scores` (Q, k) of raw query prefixes divided by their norms (Q, 1) (or the one query's norm),
    and the indices (Q, k); C-contiguous numpy arrays, or torch tensors sharing their memory when `as_tensors`."""
    scores, indices = scores / norms, np.ascontiguousarray(indices)
    return (torch.from_numpy(scores), torch.from_numpy(indices)) if as_tensors else (scores, indices)


def blocked_top_k(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest inner products (Q, k), descending, and their rows (Q, k), of (Q, d) queries with (N, d) database
    rows, both float32 C-contiguous: the products of blocks of rows, each block merged into FAISS's heaps.

    The products are torch matrix products (on torch's threads): what FAISS does itself once queries x d reach
    `distance_compute_blas_threshold`; below it, FAISS reads the whole database once per query, 1.5-4.4x slower from 16
    queries on. One query of a width in `TRANSPOSED_WIDTHS` takes FAISS's transposed kernel instead (docs/retrieval.md).
    """
    import faiss

    (count, width), pointer = queries.shape, faiss.swig_ptr
    scores, rows = np.empty((count, k), np.float32), np.empty((count, k), np.int64)
    database_rows = torch.from_numpy(database)
    for start in range(0, count, BLOCKED_QUERIES):
        block = queries[start : start + BLOCKED_QUERIES]
        heaps = faiss.float_minheap_array_t()  # keeps the k largest of what it is given, per query
        heaps.nh, heaps.k, heaps.val, heaps.ids = len(block), k, pointer(scores[start:]), pointer(rows[start:])
        heaps.heapify()
        block_rows, step = torch.from_numpy(block), max(BLOCKED_ROWS, BLOCKED_PRODUCTS // len(block))
        for first in range(0, len(database), step):
            if count == 1 and width in TRANSPOSED_WIDTHS:
                part = database[first : first + step]
                products = np.empty(len(part), np.float32)
                faiss.fvec_inner_products_ny(pointer(products), pointer(block), pointer(part), width, len(part))
            else:
                products = torch.mm(block_rows, database_rows[first : first + step].T).numpy()
            heaps.addn(products.shape[-1], pointer(products), first, 0, len(block))
        heaps.reorder()
    return scores, rows


def torch_products_in_float32() -> bool:
    """Whether torch computes float32 matrix products on the CPU in float32: not where
    `torch.set_float32_matmul_precision("medium")` (or oneDNN's own setting) lets them run in bfloat16 on CPUs that have
    it, which would change the exact kernels' products (then they are left to FAISS)."""
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return torch.get_float32_matmul_precision() == "highest" and getattr(mkldnn, "fp32_precision", "none") in (
        "none",
        "ieee",
    )


def faiss_splits_rows(count: int, rows: int) -> bool:
    """Whether FAISS's float scan of `count` queries over `rows` rows divides the rows among its threads, as it does
    for fewer queries than threads over a large table (faiss/utils/distances.cpp, 1.15: at least 10,000 rows and 1024
    a thread); elsewhere it runs one query per thread, and kernels that scan a query on one thread lose nothing."""
    import faiss

    threads = faiss.omp_get_max_threads()
    return (
        1 < threads and count < threads and rows >= max(10_000, threads * faiss.cvar.distance_compute_blas_database_bs)
    )


def float_top_k(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest inner products (Q, k), descending, and their rows (Q, k), of (Q, d) queries with (N, d) database
    rows, both float32 C-contiguous: FAISS's scan (`knn_inner_product`, what `IndexFlatIP.search` runs), called
    without `faiss.knn`'s wrapper, which converts and checks again what the callers checked (about 2 µs a call)."""
    import faiss

    (count, width), pointer = queries.shape, faiss.swig_ptr
    scores, rows = np.empty((count, k), np.float32), np.empty((count, k), np.int64)
    faiss.knn_inner_product(
        pointer(queries), pointer(database), width, count, len(database), k, pointer(scores), pointer(rows)
    )
    return scores, rows


class HalfPrecisionScan:
    """A copy of (N, d) float32 rows in IEEE half precision, scanned with FAISS's fp16 scalar-quantizer kernel to find
    the exact top-k of a few queries while reading half the bytes (1.3-2x faster for one query over tables past the
    caches, docs/retrieval.md).

    The half scan shortlists k + HALF_SCAN_SPARE rows, and FAISS's float kernel rescores them from the float rows:
    exactly the scores its float scan computes on one thread (threads sharing out the rows of one query use matrix
    products, which sum in another order). A row left out scored at most the last shortlisted half-precision
    score s, so in float32 at most s + |q| * `slack` (rounding of the rows to half, plus float32 rounding of both
    products, whatever their order of summation). When that is below the k-th rescored score, no row left out can
    enter the top k, and the answer is the float scan's, scores and rows (equal scores kept as it keeps them: the
    shortlist is rescored in row order, as the scan reads rows). A query for which the bound does not settle it is
    scanned again in float32 by FAISS (`float_top_k`), on FAISS's threads.

    A copy made in shards (consecutive row ranges) is searched shard by shard and the lists merged by FAISS's
    `IndexShards`, in parallel for fewer queries than FAISS's threads: the merged list is still the best
    k + HALF_SCAN_SPARE of all rows, and a settled answer still that of the float scan on one thread (an unsettled
    query's, scanned again with its rows shared out among FAISS's threads, may differ from it in the last bits of
    near-equal scores, as FAISS's own on those threads does).
    """

    def __init__(self, rows: np.ndarray, shards: int = 1):
        import faiss

        count, width = rows.shape
        self.shards = shards
        # the shards: consecutive row ranges (ids run on from one to the next), each its own FAISS index
        bounds = [count * shard // shards for shard in range(shards + 1)]
        parts = [
            faiss.IndexScalarQuantizer(width, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            for _ in range(shards)
        ]
        # the largest squared norms of x - half(x), x and half(x) over the rows, in float32: x - half(x) is exact
        # (two floats within a factor of 2 of each other), each sum of squares within width x 2^-24 of its value
        error = row_norm = half_norm = 0.0
        for part, first, end in zip(parts, bounds[:-1], bounds[1:], strict=True):
            for start in range(first, end, HALF_FILL_BLOCK):
                block = rows[start : min(start + HALF_FILL_BLOCK, end)]
                # rounded to nearest (torch converts 10x faster than numpy): the codes FAISS's fp16 quantizer decodes
                half = torch.from_numpy(block).half()
                part.add_sa_codes(half.numpy().view(np.uint8))
                rounded = half.float().numpy()
                difference = block - rounded
                error = max(error, float(np.einsum("ij,ij->i", difference, difference).max()))
                row_norm = max(row_norm, float(np.einsum("ij,ij->i", block, block).max()))
                half_norm = max(half_norm, float(np.einsum("ij,ij->i", rounded, rounded).max()))
        if shards == 1:
            self.sequential = self.parallel = parts[0]
        else:  # FAISS's shard sets merge the shards' lists; the parallel one searches each in a thread of its own
            self.sequential, self.parallel = faiss.IndexShards(width, False, True), faiss.IndexShards(width, True, True)
            for part in parts:
                self.sequential.add_shard(part)
                self.parallel.add_shard(part)
        rounding = float_rounding(width)
        # per unit of query norm; 0.1 % more covers the float32 sums of squares above and the query norm it meets
        self.slack = (math.sqrt(error) + rounding * (math.sqrt(row_norm) + math.sqrt(half_norm))) * 1.001
        self.nbytes = count * width * 2

    def top_k(
        self, queries: np.ndarray, rows: np.ndarray, k: int, parallel: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float scan's answer on one thread (`float_top_k`; for a query the bound leaves unsettled, FAISS's on
        its threads) for (Q, d) float32 C-contiguous queries over `rows`, the (N, d) float32 rows this copy was made
        from; k + HALF_SCAN_SPARE must not exceed N / shards. `parallel` searches the shards each in a thread of its
        own (for fewer queries than FAISS's threads), else one after another (each sharing its queries among FAISS's
        threads)."""
        import faiss

        (count, width), pointer, wide = queries.shape, faiss.swig_ptr, k + HALF_SCAN_SPARE
        approximate, shortlist = np.empty((count, wide), np.float32), np.empty((count, wide), np.int64)
        # merged from the shards, the list is the k + HALF_SCAN_SPARE best of all rows, so the bound below holds
        index = self.parallel if parallel else self.sequential
        index.search_c(count, pointer(queries), wide, pointer(approximate), pointer(shortlist))
        shortlist.sort(axis=1)
        scores, picked = np.empty((count, k), np.float32), np.empty((count, k), np.int64)
        faiss.knn_inner_products_by_idx(
            pointer(queries), pointer(rows), pointer(shortlist), width, count, len(rows), wide, k,
            pointer(scores), pointer(picked), wide,
        )  # fmt: skip
        unsettled = np.flatnonzero(approximate[:, -1] + float64_norms(queries) * self.slack >= scores[:, -1])
        for query in unsettled:
            scores[query], picked[query] = float_top_k(queries[query : query + 1], rows, k)
        return scores, picked


def float64_norms(queries: np.ndarray) -> np.ndarray:
    """(Q,) L2 norms of (Q, d) float32 queries, summed in float64 (the squares of tiny channels, which underflow in
    float32, kept): what a bound's slack is scaled by."""
    return np.sqrt(np.einsum("ij,ij->i", queries, queries, dtype=np.float64))


def float_rounding(width: int) -> float:
    """Bound on the relative error of a float32 dot product of `width` terms, whatever the order of summation:
    |computed - exact| <= this x |a| x |b|."""
    return width * 2.0**-24 / (1 - width * 2.0**-24)


class PrincipalBoundScan:
    """A narrow table of upper bounds on the inner products of (N, d) float32 rows, whose products with a few queries
    leave only the rows that may enter their exact top-k to score: 1.15-1.46x FAISS's float scan for one query on the
    demo teacher's 19k x 128 embeddings, a table that stays in the CPU caches (docs/retrieval.md).

    In the rows' principal axes A (an orthogonal d x d matrix: eigenvectors of the rows' second moments, largest
    first), y = xA keeps every inner product (q.x = qA.y), and real embeddings put most of their energy in the first
    axes. Each row is stored as its first `kept` coordinates y[:kept] and the norms of BOUND_SCAN_SEGMENTS consecutive
    segments of the rest; a query the same way. Their inner product bounds q.x from above (Cauchy-Schwarz on each
    segment), the tighter the more energy the first axes hold. One matrix product (torch's, on torch's threads) gives
    a query's bound for every row; FAISS's float kernel rescores the rows whose bound is above a floor, and a row below
    the floor scores at most floor + `slack` x |q| in float32. When the k-th rescored score is above that, no row left
    out can enter the top k, and the rescored top k is the float scan's answer, bit for bit: the very scores its kernel
    computes, in row order (so that of equal scores at the k-th place the first row is kept, as the scan keeps it).
    Else the floor drops to the k-th score less the slack, and the next pass settles it. With FAISS on several
    threads, which share out one query's rows over 10,000 rows or more and sum them in another order, near-equal scores
    of FAISS's own scan may differ in the last bits from this answer (the one-thread scan's), as for the half-precision
    copy; a query that falls back is scanned by FAISS on its threads. The first floor leaves about
    BOUND_SCAN_SPARE x k rows above it: on the demo's embeddings, the floor that settles a query left a median of
    2.2 x k rows above it, and 4.3 x k or fewer for 9 queries in 10 (k = 10 and 50).

    The slack covers the float32 rounding of the float scan's products (d x 2^-24 of the norms) and of the bounds (their
    width), the rounding of the rows' and the query's coordinates to float32, and the axes' departure from
    orthogonality (measured), per unit of query norm and at the rows' largest norm.
    """

    def __init__(self, axes: np.ndarray, kept: int, segments: np.ndarray, table: torch.Tensor, slack: float):
        self.axes, self.kept, self.segments, self.table, self.slack = axes, kept, segments, table, slack
        self.nbytes = table.numel() * 4

    @classmethod
    def fit(cls, rows: np.ndarray) -> "PrincipalBoundScan | None":
        """The scan of (N, d) float32 rows, or None where the axes of their first BOUND_SCAN_FIT_ROWS (evenly spaced)
        leave more than BOUND_SCAN_TAIL of their energy beyond every table of at most d/4 channels."""
        count, width = rows.shape
        sample = torch.from_numpy(rows[:: -(-count // BOUND_SCAN_FIT_ROWS)]).double()  # BOUND_SCAN_FIT_ROWS at most
        energies, axes = np.linalg.eigh((sample.T @ sample).numpy())
        energies, axes = np.clip(energies[::-1], 0, None), np.ascontiguousarray(axes[:, ::-1])
        beyond = np.cumsum(energies[::-1])[::-1] / max(energies.sum(), np.finfo(np.float64).tiny)  # beyond[i]: from i
        tables = [
            channels
            for channels in range(2 * BOUND_SCAN_SEGMENTS, width // 4 + 1, 8)
            if beyond[channels - BOUND_SCAN_SEGMENTS] <= BOUND_SCAN_TAIL
        ]
        if not tables:
            return None
        kept = tables[0] - BOUND_SCAN_SEGMENTS
        segments = kept + (width - kept) * np.arange(BOUND_SCAN_SEGMENTS) // BOUND_SCAN_SEGMENTS
        # (channels, rows): a query's product with it runs along contiguous rows, 1.7x faster than with (rows, channels)
        table = torch.from_numpy(huge_page_array(tables[0], count))
        scan = cls(axes, kept, segments, table, 0.0)
        largest = 0.0
        for start in range(0, count, FILL_BLOCK):
            block = rows[start : start + FILL_BLOCK]
            table[:, start : start + FILL_BLOCK] = torch.from_numpy(scan.bound_rows(block)).T
            largest = max(largest, float(np.einsum("ij,ij->i", block, block, dtype=np.float64).max()))
        departure = float(np.linalg.norm(axes @ axes.T - np.eye(width)))  # bounds |I - AA^T| (spectral norm)
        rounding = float_rounding(width) + float_rounding(tables[0]) + 3 * 2.0**-24 + departure + 1e-12
        scan.slack = rounding * math.sqrt(largest) * 1.001
        return scan

    def bound_rows(self, rows: np.ndarray) -> np.ndarray:
        """(n, kept + BOUND_SCAN_SEGMENTS) float32: rows (n, d) in the principal axes, their first `kept`
        coordinates and the norms of the segments of the rest (computed in float64)."""
        turned = rows.astype(np.float64) @ self.axes
        norms = np.sqrt(np.add.reduceat(np.square(turned), self.segments, axis=1))
        return np.concatenate([turned[:, : self.kept], norms], axis=1, dtype=np.float32)

    def top_k(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The float scan's answer on one thread (`float_top_k`) for (Q, d) float32 C-contiguous queries over `rows`,
        the (N, d) float32 rows this table was made from; k at most N / BOUND_SCAN_MAX_SHARE (for a query whose
        bounds leave more than 1/BOUND_SCAN_SHORTLIST_SHARE of the rows to rescore, FAISS's scan on its threads)."""
        bounds = torch.mm(torch.from_numpy(self.bound_rows(queries)), self.table).numpy()  # (Q, N)
        scores, picked = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        slacks = float64_norms(queries) * self.slack
        for number, (query, bound, slack) in enumerate(zip(queries, bounds, slacks.tolist(), strict=True)):
            scores[number], picked[number] = self._settled(query[None], bound, rows, k, slack)
        return scores, picked

    def _settled(
        self, query: np.ndarray, bound: np.ndarray, rows: np.ndarray, k: int, slack: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float scan's top-k (1, k) of one query (1, d) from its bounds (N,) on `rows`, whose float32 scores are
        at most bound + slack."""
        import faiss

        # the floor: the (BOUND_SCAN_SPARE x k)-th largest of the bounds' maxima over groups of rows (rows i, i + n,
        # i + 2n, ...: one elementwise maximum of contiguous runs), each of whose groups holds a row at it or above;
        # groups of up to BOUND_SCAN_GROUP rows, at least 4 x BOUND_SCAN_SPARE x k of them
        size = max(1, min(BOUND_SCAN_GROUP, len(bound) // (4 * BOUND_SCAN_SPARE * k)))
        groups = bound[: len(bound) // size * size].reshape(size, -1).max(axis=0)
        place = len(groups) - BOUND_SCAN_SPARE * k
        floor = float(np.nextafter(np.partition(groups, place)[place], np.float32(-np.inf)))
        for _ in range(2):
            shortlist = np.flatnonzero(bound > floor)  # in row order
            if len(shortlist) * BOUND_SCAN_SHORTLIST_SHARE > len(rows):
                break
            scores, picked = np.empty((1, k), np.float32), np.empty((1, k), np.int64)
            faiss.knn_inner_products_by_idx(
                faiss.swig_ptr(query), faiss.swig_ptr(rows), faiss.swig_ptr(shortlist), query.shape[1], 1,
                len(rows), len(shortlist), k, faiss.swig_ptr(scores), faiss.swig_ptr(picked), len(shortlist),
            )  # fmt: skip
            kth = float(scores[0, -1])
            if kth > floor + slack:  # a row below the floor scores at most floor + slack
                return scores, picked
            # below the floor (kth <= floor + slack): every row that may score kth or more is above it, so the next
            # pass, whose shortlist holds this one, settles
            floor = float32_below(kth - slack - abs(kth) * 2.0**-20)
        return float_top_k(query, rows, k)


def float32_below(value: float) -> float:
    """The largest float32 at most `value`, as a Python float: a floor that compares with float32 arrays as it is
    (numpy rounds a Python float to the array's type, up as often as down)."""
    rounded = np.float32(value)
    return float(rounded if float(rounded) <= value else np.nextafter(rounded, np.float32(-np.inf)))


def huge_page_array(rows: int, width: int) -> np.ndarray:
    """(rows, width) float32 zeros in a private anonymous memory map advised for transparent huge pages
    (`MADV_HUGEPAGE`, where the platform has it): the buffer an `EmbeddingIndex` holds its vectors and prefix copies
    in, fresh pages where allocators may hand out reused ones. Fill one to give an index vectors without a copy.
    benchmarks/scan_memory.py compares a FAISS scan over it with one over other memory (docs/retrieval.md)."""
    size = max(rows * width * 4, 1)
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no anonymous private maps to advise
        return np.zeros((rows, width), np.float32)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buffer, np.float32, rows * width).reshape(rows, width)


def on_memory_map(array: np.ndarray) -> bool:
    """Whether `array` views a memory map: a file's (`np.memmap`) or a `huge_page_array`."""
    while isinstance(array, np.ndarray):
        array = array.base
    return isinstance(array.obj if isinstance(array, memoryview) else array, mmap.mmap)


def new_first_stage(settings: AnnSettings, dim: int):
    """An empty FAISS index of resolved `settings` over `dim`-channel unit vectors (inner product)."""
    import faiss

    if settings.ann == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        return index
    if settings.ann == "ivfpq":
        quantizer = faiss.IndexFlatIP(dim)
        return faiss.IndexIVFPQ(quantizer, dim, settings.nlist, settings.pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexFlatIP(dim)


KMEANS_ROWS_PER_CENTROID = 39  # FAISS's k-means warns under this many training rows per centroid


def training_rows(index) -> int:
    """Rows an untrained IVF-PQ first stage trains on: 64 per cell (FAISS warns under 39), at least 2**16."""
    return max(64 * index.nlist, 2**16)


def train_first_stage(index, vectors: np.ndarray, dim: int) -> None:
    """Train an IVF-PQ first stage on the first `training_rows` rows of `vectors` (a no-op for the others)."""
    if not index.is_trained:
        needed = max(index.nlist, 2**index.pq.nbits)
        if len(vectors) < needed:
            raise UsageError(
                f"ann='ivfpq' with nlist={index.nlist} trains on at least {needed} rows; this collection has "
                f"{len(vectors)}. Use ann='hnsw' or 'none' (or 'auto') for a collection this small."
            )
        rows = min(len(vectors), training_rows(index))
        advised = KMEANS_ROWS_PER_CENTROID * needed
        if rows < advised:
            logger.warning(
                "ann='ivfpq' trains %d cells and a code of %d centroids per byte on %d rows, fewer than the %d "
                "(%d a centroid) FAISS's k-means asks for: expect a lower recall. ann='hnsw' or 'none' suits a "
                "collection this small.",
                index.nlist,
                2**index.pq.nbits,
                rows,
                advised,
                KMEANS_ROWS_PER_CENTROID,
            )
            # that warning says it once, in words, where FAISS would print its own for the cells and every byte
            index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
        index.train(unit_rows(vectors[:rows], dim))


def add_to_first_stage(index, unit: np.ndarray, first_row: int) -> None:
    """Add unit rows `first_row`… to a first stage. HNSW draws node levels at random: seeding its generator with the
    first row's number makes a graph grown shard by shard (an append) the one a rebuild grows, bit for bit."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.rng = faiss.RandomGenerator(first_row)
    index.add(unit)


def write_first_stage(folder: Path, index, rows: int) -> str:
    """Write a first stage under a name that says its row count, so that a manifest never names a newer one."""
    import faiss

    name = f"first_stage.{rows}.faiss"
    if type(index).__name__.startswith("Gpu"):
        index = faiss.index_gpu_to_cpu(index)
    write_file_atomically(folder / name, lambda staging: faiss.write_index(index, str(staging)))
    return name


def remove_stale_first_stages(folder: Path, keep: str | None) -> None:
    """Delete the first stages of `folder` other than `keep` (an index loaded before holds its own open)."""
    for path in folder.glob("first_stage.*.faiss"):
        if path.name != keep:
            with contextlib.suppress(OSError):  # Windows keeps a file a reader holds open: it goes at a later append
                path.unlink()


def faiss_on_gpu(device: torch.device) -> bool:
    """Whether FAISS runs on the GPU for `device`: a CUDA device, a FAISS build with GPU support (faiss-gpu; faiss-cpu
    has `knn_gpu` too, but no GPU resources) and a GPU that it sees. A CUDA device without them warns once."""
    import faiss

    if device.type != "cuda":
        return False
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return True
    global _WARNED_NO_FAISS_GPU
    if not _WARNED_NO_FAISS_GPU:
        logger.warning(
            "device %s: this FAISS (%s) has no GPU support or sees no GPU, so FAISS searches on the CPU; install "
            "faiss-gpu for GPU search.",
            device,
            getattr(faiss, "__version__", "unknown version"),
        )
        _WARNED_NO_FAISS_GPU = True
    return False


_WARNED_NO_FAISS_GPU = False


def gpu_resources():
    """One FAISS GPU resource object per process."""
    import faiss

    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


_GPU_RESOURCES = None


def on_device(index, device: torch.device):
    """`index` moved to the GPU when FAISS runs there (`faiss_on_gpu`); HNSW stays on the CPU."""
    import faiss

    if isinstance(index, faiss.IndexHNSW) or not faiss_on_gpu(device):
        return index
    return faiss.index_cpu_to_gpu(gpu_resources(), device.index or 0, index)


def check_model(stored: str | None, stored_name: str | None, model, what: str, allow_other_model: bool) -> None:
    """`franca_hf.fingerprint.check_same_model` for a loaded `model` against the fingerprint `stored` with `what`."""
    if stored is None or allow_other_model:
        return
    name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    check_same_model(stored, model_fingerprint(model), what, stored_name or "(not recorded)", name, allow_other_model)


def index_images(
    model: FrancaModel,
    image_processor: BaseImageProcessor,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    progress: bool = True,
    num_workers: int | None = 0,
    settings: AnnSettings | None = None,
) -> EmbeddingIndex:
    """Embed image files (folders are searched recursively) with a FrancaModel into an `EmbeddingIndex`.

    Stores the full-width Matryoshka CLS embeddings (`franca_hf.features.embed_batch`, unit norm) with the image
    paths as ids, the model's Matryoshka dims (`matryoshka_dims_of`) as allowed dims and the model's fingerprint, in
    memory; for a large collection, extract to a folder (resumable) and use `build_index`. Unreadable images are
    logged as warnings and skipped.
    """
    embedded = extract_features(
        model, image_processor, paths, batch_size=batch_size, num_workers=num_workers, progress=progress, desc="index"
    )
    return _index_of_embedded(model, embedded, settings)


def _index_of_embedded(model: FrancaModel, embedded: ExtractedFeatures, settings: AnnSettings | None) -> EmbeddingIndex:
    """The in-memory index of the CLS embeddings `model` made (`index_images`), named by their paths."""
    name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    return EmbeddingIndex(
        embedded.features, embedded.paths, matryoshka_dims_of(model.config), settings, model_fingerprint(model), name
    )


def _extraction(folder: Path) -> ExtractionIndex:
    """The committed shards of an extract folder of CLS rows (a warning when the extraction was interrupted)."""
    extraction = ExtractionIndex.load(folder).with_progress(folder)
    if extraction.settings.kind != "cls":
        raise UsageError(
            f"{folder} holds {extraction.settings.kind} patch features; an index needs CLS embeddings (extract "
            "them with dense=False)."
        )
    if not extraction.rows:
        raise UsageError(f"{folder} holds no embedded image yet (failed: {len(extraction.failed)}).")
    if not extraction.complete:
        logger.warning(
            "%s is an interrupted extraction: indexing the %d images committed so far. Rerun the same "
            "`franca-hf extract` command to finish it.",
            folder,
            extraction.rows,
        )
    return extraction


def _extraction_dims(extraction: ExtractionIndex) -> list[int]:
    settings = extraction.settings
    return [d for d in settings.matryoshka_dims if d <= settings.dim]


def index_from_features(folder: str | os.PathLike, settings: AnnSettings | None = None) -> EmbeddingIndex:
    """An in-memory index of the CLS rows of a `franca-hf extract` folder, without embedding anything again.

    Its dims are the extracting model's Matryoshka dims up to the stored width (`--dim`). An interrupted extraction
    gives the rows committed so far, with a warning. For collections past RAM, use `build_index`.
    """
    folder = Path(folder)
    extraction = _extraction(folder)
    vectors, ids, row = huge_page_array(extraction.rows, extraction.settings.dim), [], 0
    for shard in extraction.shards:
        shard_ids, features = _readable_shard(folder, shard, extraction.settings.dim)
        vectors[row : row + len(shard_ids)] = features.numpy()
        ids.extend(shard_ids)
        row += len(shard_ids)
    fingerprint, model_name = extraction.model_fingerprint, extraction.settings.model
    index = EmbeddingIndex(vectors, ids, _extraction_dims(extraction), settings, fingerprint, model_name)
    index.named = f"The index of the extract folder {folder}"
    return index


@dataclass(frozen=True)
class BuildReport:
    """What `build_index` did: the index, rows added now, and whether it appended to an existing one."""

    index: EmbeddingIndex
    added: int
    appended: bool


def build_index(
    features: str | os.PathLike,
    out: str | os.PathLike,
    settings: AnnSettings | None = None,
    append: bool = False,
    overwrite: bool = False,
    model: FrancaModel | None = None,
    allow_other_model: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Stream the shards of a `franca-hf extract` folder into an index folder `out`, one shard in memory at a time.

    Memory: one shard plus the first stage (dims[0] / D of the vectors for "none"/"hnsw" with the graph's links, or
    `pq_bytes` a row for "ivfpq"); the full-width vectors go to disk as they come. With `append`, the shards of
    `features` not yet in `out` are added to it (the same index a full rebuild streams, shard by shard); `settings`
    then must be None (the index keeps its own). `model`, when given, must be the one that made the features.
    """
    features, out = Path(features), Path(out)
    extraction = _extraction(features)
    fingerprint, model_name = extraction.model_fingerprint, extraction.settings.model
    if model is not None:
        check_model(fingerprint, model_name, model, f"The extract folder {features}", allow_other_model)
    dims = _extraction_dims(extraction)
    if append:
        if settings is not None:
            raise UsageError(
                "An append keeps the index's own settings; do not pass settings (ann, hnsw_m, ...).", setting="ann"
            )
        index = EmbeddingIndex.load(out)
        manifest = index.manifest
        if manifest.dims != dims or manifest.width != extraction.settings.dim:
            raise UsageError(
                f"{out} holds {manifest.width}-dim rows with dims {manifest.dims}; {features} holds "
                f"{extraction.settings.dim}-dim rows with dims {dims}. Append features of the same extraction."
            )
        if fingerprint is not None:
            what = f"The index {out}"
            check_same_model(manifest.model, fingerprint, what, manifest.model_name, model_name, allow_other_model)
        _check_same_extraction(index, features, extraction)
        first = index.first_stage() if manifest.settings["ann"] != "none" else None
        rows_before = manifest.rows
        _stream_shards(features, extraction, out, manifest, first, progress)
        remove_stale_first_stages(out, manifest.first_stage)
        return BuildReport(EmbeddingIndex.load(out), manifest.rows - rows_before, True)
    check_folder_out(out, INDEX_FOLDER, overwrite, inputs=(features,), replace_with="overwrite=True or append=True")
    resolved = (settings or AnnSettings()).resolve(extraction.rows, dims[0])

    def fill(staging: Path) -> None:
        # a new index is streamed into a staging folder that replaces `out` once complete: an index there stays
        # whole, for its readers too, until then (and if the build fails)
        manifest = IndexManifest(
            0, extraction.settings.dim, dims, asdict(resolved), None, True, fingerprint, model_name
        )
        for name in (VECTORS_FILE, IDS_FILE, IDS_STARTS_FILE):
            (staging / name).write_bytes(b"")
        first = new_first_stage(resolved, dims[0]) if resolved.ann != "none" else None
        if first is not None and not first.is_trained:
            train_first_stage(first, _leading_prefixes(features, extraction, training_rows(first), dims[0]), dims[0])
        _stream_shards(features, extraction, staging, manifest, first, progress)

    write_folder_atomically(out, fill, INDEX_FOLDER, overwrite=True, inputs=(features,))
    index = EmbeddingIndex.load(out)
    return BuildReport(index, len(index), False)


def _check_same_extraction(index: EmbeddingIndex, features: Path, extraction: ExtractionIndex) -> None:
    """A UsageError unless `features` still holds the shards `index` was built from, with the rows it holds: its last
    shard's ids are the index's last ids (another extract folder names its shards alike)."""
    if len(index) and not index.manifest.sources:
        raise UsageError(
            f"The index {index.folder} was not built from an extract folder (it was made from images, or saved from "
            "Python) and records no shards: an append cannot tell which of its rows it already holds, so it would "
            f"repeat them. Build the index from {features} instead (overwrite=True, --overwrite), and append later "
            "extracts to that one.",
            setting="overwrite",
        )
    held = {shard["file"]: shard for shard in extraction.shards}
    gone = [name for name in index.manifest.sources if name not in held]
    if gone:
        raise UsageError(
            f"{features} no longer holds {len(gone)} of the shards the index {index.folder} was built from "
            f"({gone[0]}, ...): a resumed extract set them aside as damaged and embedded their images again, or "
            "the folder is another extraction. An append would repeat those images: rebuild the index "
            "(overwrite=True, --overwrite).",
            setting="overwrite",
        )
    if index.manifest.sources:
        last = held[index.manifest.sources[-1]]
        stored, rows = index.ids, len(index)
        if _readable_shard(features, last, index.width)[0] != stored[rows - last["rows"] : rows]:
            raise UsageError(
                f"{features / last['file']} holds other images than the rows the index {index.folder} took from a "
                f"shard of that name: {features} is not the extraction it was built from. Append that one, or build "
                "a new index of this one.",
                setting="append",
            )


def _stream_shards(
    features: Path, extraction: ExtractionIndex, folder: Path, manifest: IndexManifest, first, progress: bool
) -> None:
    """Add the shards of `extraction` that `manifest` does not list yet to the index files in `folder` (the vectors
    and ids appended, the first stage `first` added to and written), then save `manifest`, updated, there last."""
    from tqdm.auto import tqdm

    known = set(manifest.sources)
    new = [shard for shard in extraction.shards if shard["file"] not in known]
    if not (folder / IDS_STARTS_FILE).is_file():  # a folder saved before the starts were: where its lines start
        with open(folder / IDS_FILE, "rb") as lines:
            starts = line_starts(lines.read(manifest.ids_bytes), manifest.rows).astype(STARTS)
        write_file_atomically(folder / IDS_STARTS_FILE, starts.tofile)
    with (
        open(folder / VECTORS_FILE, "r+b") as vectors_file,
        open(folder / IDS_FILE, "r+b") as ids_file,
        open(folder / IDS_STARTS_FILE, "r+b") as starts_file,
    ):
        # an interrupted append leaves bytes past the committed rows: drop them
        vectors_file.truncate(manifest.rows * manifest.width * 4)
        ids_file.truncate(manifest.ids_bytes)
        starts_file.truncate(manifest.rows * STARTS.itemsize)
        for handle in (vectors_file, ids_file, starts_file):
            handle.seek(0, os.SEEK_END)
        bar = tqdm(new, desc="index", unit="shard", disable=not progress)
        for shard in bar:
            shard_ids, vectors = _readable_shard(features, shard, manifest.width)
            block = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
            for dim in manifest.dims:
                unit_rows(block, dim, manifest.rows, shard_ids)
            manifest.unit &= bool(np.all(np.abs(np.linalg.norm(block, axis=1) - 1) < UNIT_TOLERANCE))
            vectors_file.write(block.tobytes())
            ids_bytes = write_ids(shard_ids, ids_file, starts_file, manifest.ids_bytes)
            if first is not None:
                add_to_first_stage(first, unit_rows(block, manifest.dims[0]), manifest.rows)
            manifest.rows += len(block)
            manifest.ids_bytes += ids_bytes
            manifest.sources.append(shard["file"])
        for handle in (vectors_file, ids_file, starts_file):
            handle.flush()
            os.fsync(handle.fileno())
    if first is not None:
        manifest.first_stage = write_first_stage(folder, first, manifest.rows)
    manifest.save(folder)


def _readable_shard(folder: Path, shard: dict, width: int) -> tuple[list[str], torch.Tensor]:
    """(ids, (n, width) rows) of a shard of an extract folder (`shard`: its entry in the folder's index), or a
    UsageError naming it and what to do."""
    path = folder / shard["file"]
    try:
        ids, rows = read_shard(path)
    except SHARD_READ_ERRORS as error:
        problem = f"cannot be read ({type(error).__name__}: {error})"
    else:
        if rows.shape[1:] == (width,) and len(ids) == shard["rows"]:
            return ids, rows
        shape = tuple(rows.shape[1:])
        problem = f"holds {len(ids)} rows of shape {shape}, where {shard['rows']} of ({width},) were committed"
    raise UsageError(
        f"The extract shard {path} {problem}. Run `franca-hf extract` on its folder again, which sets damaged shards "
        "aside and embeds their images again, then index it."
    )


def _leading_prefixes(folder: Path, extraction: ExtractionIndex, rows: int, dim: int) -> np.ndarray:
    """The `dim`-channel prefixes of the first `rows` rows of an extraction (all when fewer), read shard by shard."""
    blocks, total = [], 0
    for shard in extraction.shards:
        prefixes = _readable_shard(folder, shard, extraction.settings.dim)[1].numpy()[: rows - total, :dim]
        blocks.append(np.ascontiguousarray(prefixes))
        total += len(blocks[-1])
        if total >= rows:
            break
    return np.concatenate(blocks)


def damaged_index(folder: Path, problem: str) -> UsageError:
    """The error for an index folder whose files are not what its manifest committed."""
    return UsageError(
        f"The index {folder} is damaged: {problem}. Build it again into that folder (`franca-hf index ... --out "
        f"{folder} --overwrite`, or save it again)."
    )


def is_index_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def is_features_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def load_index(path: str | os.PathLike, device: str | torch.device = "cpu") -> EmbeddingIndex:
    """An index folder written by `EmbeddingIndex.save` or `build_index`, or the index of a `franca-hf extract`
    folder (built in memory)."""
    if is_features_folder(path) and not is_index_folder(path):
        index = index_from_features(path)
        index.device = torch.device(device)
        return index
    return EmbeddingIndex.load(path, device)


@dataclass(frozen=True)
class IndexResult(BuildReport):
    """What `index` did (a `BuildReport`; images embedded now are all `added`), in words where the rows came from
    ("from the features in photos_features", "with facebook/franca-vitb14"), and the images it could not read, with
    the reason for each (when embedding images: an extract folder keeps its own in its extraction.json)."""

    source: str
    failed: list[tuple[str, str]] = field(default_factory=list)


def index(settings: IndexSettings) -> IndexResult:
    """`franca-hf index`: the index folder `settings.out` of an extract folder's CLS rows (streamed by `build_index`;
    appended to with `settings.append`) or of image files embedded with `settings.model` (`index_images`)."""
    images = settings.images
    folders = [item for item in images if is_features_folder(item)]
    if folders and len(images) > 1:
        raise UsageError(
            f"{folders[0]} is an extract folder: index one extract folder alone, or image files and folders (with "
            f"model), not both; got {len(images)} inputs.",
            setting="images",
        )
    if folders:
        features, model = images[0], settings.model.load()[0] if settings.model is not None else None
        build = build_index(
            features, settings.out, settings.ann, settings.append, settings.overwrite, model, settings.allow_other_model
        )
        return IndexResult(build.index, build.added, build.appended, f"from the features in {features}")
    if settings.model is None:
        raise UsageError(
            "model is required to embed images (an extract folder, `franca_hf.features.extract`, needs none).",
            setting="model",
        )
    if settings.append:
        raise UsageError(
            "append adds the new shards of an extract folder (`franca_hf.features.extract`); extract the images first.",
            setting="append",
        )
    check_folder_out(settings.out, INDEX_FOLDER, settings.overwrite, inputs=images)  # before hours of embedding
    model, processor = settings.model.load()
    embedded = extract_features(
        model, processor, images, batch_size=settings.batch_size, num_workers=settings.num_workers, desc="index"
    )
    built = _index_of_embedded(model, embedded, settings.ann)
    built.save(settings.out)
    return IndexResult(built, len(built), False, f"with {settings.model.name_or_path}", embedded.failed)


@dataclass(frozen=True)
class SearchResult:
    """What `search` found for each query image that could be read (`queries`): the ids of its `k` nearest images,
    best first (fewer where an ANN first stage found fewer: the rest of that row's scores are -inf), and their cosine
    scores (Q, k); `how` it searched, in words; `k` is at most the index's
    `index_size` images (`clamped` when the settings asked for more)."""

    queries: list[str]
    ids: list[list[str]]
    scores: torch.Tensor
    how: str
    k: int
    clamped: bool
    index_size: int


def search(settings: SearchSettings) -> SearchResult:
    """`franca-hf search`: the nearest images of `settings.index` to each query image, embedded with
    `settings.model` (`EmbeddingIndex.search_images`), the index searched on the model's device."""
    index = load_index(settings.index, device=settings.model.device or "cpu")
    if settings.dim is not None:
        index.check_dim(settings.dim)
    model, processor = settings.model.load()
    k = min(settings.k, len(index))
    paths, scores, indices = index.search_images(
        settings.queries, model, processor, k, settings.dim, settings.funnel, settings.allow_other_model
    )
    stages = index.image_search_stages(k, settings.dim, settings.funnel)
    if stages is not None:
        cascade = " > ".join(f"{d}:{size}" for d, size in stages)
        how = f"funnel {cascade}, first stage {index.settings.describe(index.dims[0])}"
    else:
        how = f"exact, dim {settings.dim or index.width}, cut in the model's basis"
    ids = [[index.ids[position] for position in row if position >= 0] for row in indices.tolist()]
    return SearchResult(paths, ids, scores, how, k, k < settings.k, len(index))


__all__ = [
    "BuildReport",
    "EmbeddingIndex",
    "IndexResult",
    "SearchResult",
    "build_index",
    "default_funnel",
    "huge_page_array",
    "index",
    "index_from_features",
    "index_images",
    "load_index",
    "search",
]

"""What the retrieval commands take: `IndexSettings` for `franca_hf.retrieval.index`, `SearchSettings` for
`franca_hf.retrieval.search`, and `AnnSettings`, the first-stage knobs an index stores in its manifest.

Cheap to import (no torch, numpy or faiss), so that the command line answers usage errors before loading anything;
`franca_hf.retrieval` imports these names too.
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import UsageError, require_at_least
from .features.settings import ModelSpec

ANN_KINDS = ("auto", "none", "hnsw", "ivfpq")
# the `AnnSettings` knobs that only one kind uses ("auto": the one that chooses a kind by size)
KIND_KNOBS = {
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivfpq": ("nlist", "nprobe", "pq_bytes"),
    "auto": ("exact_below",),
}


def physical_memory() -> int:
    """Bytes of RAM on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class AnnSettings:
    """How the first stage of an index is built and searched (defaults measured in docs/retrieval.md); stored in the
    index's manifest (field names are its JSON keys).

    Attributes:
        ann: "none" (exact scan of the unit dims[0] prefixes), "hnsw" (a graph over them), "ivfpq" (product-quantised
            codes in inverted lists, for collections past RAM), or "auto": none below `exact_below` rows, hnsw while
            its graph fits in a quarter of this machine's RAM, ivfpq past that.
        hnsw_m: HNSW neighbours per node (M): more, better recall, more memory (about 8·M bytes a row).
        ef_construction: HNSW candidate list while building.
        ef_search: HNSW candidate list while searching; at least the shortlist size is used.
        nlist: IVF cells; 0 picks a power of two near 4·sqrt(N).
        nprobe: IVF cells visited per query.
        pq_bytes: bytes per row of the PQ code (sub-quantizers of 8 bits); 0 picks dims[0] / 2.
        exact_below: the row count from which "auto" builds an ANN first stage.
        half_scan: exact scans of a few queries (fewer than 16) read a half-precision copy of the scanned prefixes
            and settle the top k exactly from the float rows (`HalfPrecisionScan`): 1.3-2x faster for one query over
            tables past the caches, for N x dim x 2 bytes of RAM per width scanned, made on first use (never more than
            a quarter of the machine's RAM). False: scan the float rows only.
        bound_scan: exact scans of a few queries over a table in the caches (under 16 MiB of float32) first scan a
            narrow table of upper bounds in the rows' principal axes, then settle the top k exactly from the float
            rows (`PrincipalBoundScan`): 1.15-1.46x plain FAISS for one query on the demo teacher's embeddings, for
            N x (a quarter of dim or less) x 4 bytes per width scanned, made on first use where the axes hold the
            rows' energy closely enough. False: scan the float rows only.
    """

    ann: str = "auto"
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    nlist: int = 0
    nprobe: int = 64
    pq_bytes: int = 0
    exact_below: int = 200_000
    half_scan: bool = True
    bound_scan: bool = True

    def __post_init__(self):
        if self.ann not in ANN_KINDS:
            raise UsageError(
                f"ann={self.ann!r} is not an index kind; choose one of {', '.join(ANN_KINDS)}.", setting="ann"
            )
        require_at_least(
            1, hnsw_m=self.hnsw_m, ef_construction=self.ef_construction, ef_search=self.ef_search, nprobe=self.nprobe
        )
        for name in ("nlist", "pq_bytes"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be 0 (automatic) or positive; got {getattr(self, name)}.", setting=name)
        require_at_least(0, exact_below=self.exact_below)  # 0: "auto" builds an ANN first stage at any size

    def check_knobs_apply(self) -> None:
        """A `UsageError` for a knob set (away from its default) that the chosen kind does not use, and so would
        ignore: `nlist` with ann="hnsw", say. With "auto" any knob may be set, as the kind depends on the size."""
        if self.ann == "auto":
            return
        defaults = AnnSettings()
        for kind, knobs in KIND_KNOBS.items():
            for name in knobs:
                value = getattr(self, name)
                if kind != self.ann and value != getattr(defaults, name):
                    raise UsageError(
                        f"{name}={value} applies to ann={kind!r} only; with ann={self.ann!r} it would be ignored. "
                        f"Leave {name} out, or choose ann={kind!r}.",
                        setting=name,
                    )

    def of_own_kind(self) -> "AnnSettings":
        """These settings with the knobs of every other kind than `ann` at their defaults: what a resolved index
        stores and shows (an index of an older manifest may hold an `nlist` resolved for an HNSW graph, say), and so
        can be given to a new build as they are."""
        defaults = AnnSettings()
        others = [name for kind, knobs in KIND_KNOBS.items() if kind != self.ann for name in knobs]
        return replace(self, **{name: getattr(defaults, name) for name in others})

    def resolve(self, rows: int, first_dim: int) -> "AnnSettings":
        """These settings made concrete for `rows` rows of `first_dim` channels (`check_knobs_apply` first): `ann`
        chosen by size for "auto", an IVF-PQ's `nlist` and `pq_bytes` computed, and the knobs of the other kinds at
        their defaults."""
        self.check_knobs_apply()
        ann = self.ann
        if ann == "auto":
            graph_bytes = rows * (4 * first_dim + 8 * self.hnsw_m)
            ann = "none" if rows < self.exact_below else "hnsw" if graph_bytes < physical_memory() / 4 else "ivfpq"
        resolved = replace(self, ann=ann).of_own_kind()
        if ann != "ivfpq":
            return resolved
        nlist = self.nlist or 2 ** max(4, round(math.log2(4 * math.sqrt(rows))))
        pq_bytes = self.pq_bytes or max(1, first_dim // 2)
        if first_dim % pq_bytes:
            raise UsageError(f"pq_bytes={pq_bytes} must divide the first-stage width {first_dim}.", setting="pq_bytes")
        return replace(resolved, nlist=nlist, pq_bytes=pq_bytes)

    def describe(self, first_dim: int) -> str:
        """What a resolved first stage is, in words: 'hnsw M=32 at 48 dims', say."""
        if self.ann == "hnsw":
            return f"hnsw M={self.hnsw_m} efSearch={self.ef_search} at {first_dim} dims"
        if self.ann == "ivfpq":
            return f"ivfpq nlist={self.nlist} nprobe={self.nprobe} PQ{self.pq_bytes} at {first_dim} dims"
        return f"exact at {first_dim} dims"


@dataclass(frozen=True)
class IndexSettings:
    """What `franca_hf.retrieval.index` (`franca-hf index`) builds.

    Attributes:
        images: image files or folders (searched recursively) to embed with `model`, or one folder written by
            `franca_hf.features.extract` whose CLS rows are indexed without embedding anything again.
        out: the index folder written.
        model: the model that embeds `images`; for an extract folder optional, and then checked against the model
            that made its features.
        ann: the first stage (None: `AnnSettings()` for a new index; an append keeps the index's own).
        append: add the extract folder's shards that are not in the index `out` yet.
        overwrite: replace an index already in `out`.
        allow_other_model: index an extract folder with a `model` other than the one that made it.
        batch_size, num_workers: images per forward pass and DataLoader workers (None: CPU cores - 1, at most 8),
            when embedding `images`.
    """

    images: Sequence[str]
    out: str
    model: ModelSpec | None = None
    ann: AnnSettings | None = None
    append: bool = False
    overwrite: bool = False
    allow_other_model: bool = False
    batch_size: int = 32
    num_workers: int | None = None

    def __post_init__(self):
        if not self.images:
            raise UsageError("images is empty; give image files or folders, or one extract folder.", setting="images")
        require_at_least(1, batch_size=self.batch_size)
        require_at_least(0, num_workers=self.num_workers)
        if self.append and self.ann is not None:
            raise UsageError(
                "An append keeps the index's own first stage; do not pass ann settings (ann, hnsw_m, ...).",
                setting="ann",
            )
        if self.ann is not None:
            self.ann.check_knobs_apply()  # before any image is embedded


@dataclass(frozen=True)
class SearchSettings:
    """What `franca_hf.retrieval.search` (`franca-hf search`) looks up.

    Attributes:
        queries: query image files or folders.
        index: an index folder (`franca_hf.retrieval.index`) or an extract folder (indexed in memory).
        model: the model that built the index (its device is also where the index is searched).
        k: results per query; an index of fewer images gives all of them.
        dim: the Matryoshka dim searched at, cut in the model's basis (None: the index's full width).
        funnel: True: shortlist at the smallest dim and rerank up to `dim`; False: exact search at `dim`; None: the
            funnel when the index has an ANN first stage, exact otherwise.
        allow_other_model: search with a `model` other than the one that built the index.
    """

    queries: Sequence[str]
    index: str
    model: ModelSpec
    k: int = 10
    dim: int | None = None
    funnel: bool | None = None
    allow_other_model: bool = False

    def __post_init__(self):
        if not self.queries:
            raise UsageError("queries is empty; give query image files or folders.", setting="queries")
        require_at_least(1, k=self.k)

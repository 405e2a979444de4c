"""Exact Matryoshka retrieval over Franca embeddings, in torch: prefix search and MRL-style funnel search.

Franca embeddings are Matryoshka-nested: the prefix `z[:m]` for `m` in `config.matryoshka_dims` is itself an
embedding. Cosine similarity at prefix `m` truncates query and database to `m` channels and L2-normalises AFTER
truncation, so scores are inner products of unit vectors.

* `EmbeddingIndex.search(queries, k, dim)`: exact top-k at one prefix, chunked over the database.
* `EmbeddingIndex.funnel_search(queries, k, stages)`: scan the database once at a small prefix, keep a shortlist,
  rerank it with larger prefixes (Kusupati et al. 2022, "funnel retrieval"). Only the first stage touches all N
  vectors, at `dim_1` of the D channels, so it costs about dim_1 / D of a full scan plus the reranks.

Memory (N vectors of width D, float32): the vectors (4·N·D bytes) + the inverse norm of every allowed prefix
(4·N·L bytes, L nested dims: under 1% at D = 768) + one L2-normalised contiguous copy of the smallest prefix
(dims[0] / D of the vectors: 6.25% with Franca's D/16). Scans at other prefixes read a strided view of the vectors
and scale the scores by the stored inverse norms: the same results without keeping a normalised copy per prefix,
which would add sum(dims[:-1]) / D (94%) of the vectors. The small copy is kept because the funnel's first stage
scans it in full, and a contiguous read is up to 4x faster there than a strided one for small query batches.
"""

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.image_processing_utils import BaseImageProcessor

from .features import extract_features, nested_dims
from .features.store import ExtractionIndex, read_shard
from .io import write_file_atomically
from .modeling import FrancaModel, check_nested_dims, default_matryoshka_dims

logger = logging.getLogger(__name__)

FORMAT_KEY = "franca_hf.retrieval"
FORMAT_VERSION = 1
# Work sizes, in float32 elements. One score buffer of QUERY_BLOCK x (SCORE_TILE / QUERY_BLOCK) is reused for every
# tile: few, large tiles keep torch.topk and thread start-up overheads low, and the buffer bounds memory at any N.
# Reranks gather at most GATHER_TILE shortlisted prefix values at a time.
SCORE_TILE = 2**24
QUERY_BLOCK = 256
GATHER_TILE = 2**22


def default_funnel(dims: Sequence[int], k: int) -> list[tuple[int, int]]:
    """MRL's funnel for nested `dims` and top-k: shortlist 20·k at dims[0], rerank to 5·k at the middle dim, k at D.

    For Franca (dims = [D/16, D/8, D/4, D/2, D]) and k = 10 this is [(D/16, 200), (D/4, 50), (D, 10)].
    """
    # a dict keeps one stage per dim (the later, smaller size) when dims has fewer than three entries
    return list({dims[0]: 20 * k, dims[len(dims) // 2]: 5 * k, dims[-1]: k}.items())


class EmbeddingIndex:
    """Full-width embeddings, their ids and allowed nested dims; exact cosine search at any allowed prefix.

    Args:
        vectors: (N, D) embeddings, any scale (cosine is scale-free at every prefix). Kept as float32 on their
            device; not copied when already contiguous float32, so do not modify the tensor afterwards.
        ids: N names (image paths, say); "0" … "N-1" when None.
        dims: allowed prefix lengths, strictly increasing and ending at D; Franca's [D/16, D/8, D/4, D/2, D] when
            None. Use `model.config.matryoshka_dims` for embeddings of a FrancaModel.
    """

    def __init__(self, vectors: torch.Tensor, ids: Sequence[str] | None = None, dims: Sequence[int] | None = None):
        if vectors.ndim != 2 or not (vectors.is_floating_point() and vectors.numel()):
            raise ValueError(
                f"vectors must be a non-empty (N, D) float tensor; got shape {tuple(vectors.shape)}, {vectors.dtype}."
            )
        self.vectors = vectors.to(torch.float32).contiguous()
        size, width = self.vectors.shape
        self.ids = [str(i) for i in range(size)] if ids is None else [str(i) for i in ids]
        if len(self.ids) != size:
            raise ValueError(f"Got {len(self.ids)} ids for {size} vectors; pass one id per row.")
        self.dims = default_matryoshka_dims(width) if dims is None else check_nested_dims(dims, width, "dims")
        norms = torch.stack([self.vectors[:, :d].norm(dim=1) for d in self.dims], dim=1)
        bad = ~torch.isfinite(norms) | (norms == 0)
        if bad.any():
            row, level = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"Vector {row} ({self.ids[row]!r}) has a zero or non-finite prefix of length {self.dims[level]} "
                f"(norm {norms[row, level].item()}), so its cosine similarity is undefined."
            )
        self._inv_norms = norms.reciprocal_()
        self._shortlist_vectors = self.prefix(self.dims[0]).contiguous()

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        """D, the full embedding width."""
        return self.vectors.shape[1]

    def prefix(self, dim: int) -> torch.Tensor:
        """(N, dim) database prefixes, L2-normalised after truncation (for export to an ANN library, say)."""
        return self.vectors[:, :dim] * self._inv_norms[:, self._level(dim)].unsqueeze(1)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 10, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k by cosine similarity of the `dim`-channel prefixes (D when None).

        Args:
            queries: (Q, D) full-width queries, or (Q, dim) ones already cut to the prefix.
        Returns:
            scores (Q, k) cosine similarities, descending, and indices (Q, k) into `ids`, on the index's device.
        """
        dim = self.width if dim is None else dim
        self._level(dim)  # raises on a dim that is not allowed
        self._check_k(k)
        self._check_queries(queries, dim)
        return self._scan(self._normalized(queries, dim), dim, k)

    @torch.no_grad()
    def funnel_search(
        self, queries: torch.Tensor, k: int = 10, stages: Sequence[tuple[int, int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by a cascade of prefixes: stage 1 keeps the best `size_1` of all vectors at `dim_1`, each later
        stage keeps the best `size_i` of the previous shortlist at `dim_i`, and the last one's top k is returned.

        Args:
            queries: (Q, D) full-width queries, or (Q, d) ones cut to the last stage's dim d.
            stages: [(dim_1, size_1), …]: dims allowed and strictly increasing, sizes non-increasing and >= k
                (sizes above N act as N). `default_funnel(self.dims, k)` when None.
        Returns:
            scores (Q, k) cosine similarities at the last stage's prefix, descending, and indices (Q, k).
        """
        self._check_k(k)
        stages = default_funnel(self.dims, k) if stages is None else [(int(d), int(s)) for d, s in stages]
        self._check_stages(stages, k)
        self._check_queries(queries, stages[-1][0])
        return self._funnel(queries, stages, k)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to one safetensors file, atomically (temp file in the same folder, then rename).

        Tensors: "vectors" (N, D) float32 and "ids", the UTF-8 JSON list of ids as uint8 (ids can outgrow
        safetensors' 100 MB header); the header metadata holds {"version", "dims"} as JSON under "franca_hf.retrieval".
        """
        ids = torch.frombuffer(bytearray(json.dumps(self.ids).encode()), dtype=torch.uint8)
        header = {FORMAT_KEY: json.dumps({"version": FORMAT_VERSION, "dims": self.dims})}
        tensors = {"vectors": self.vectors.cpu(), "ids": ids}
        return write_file_atomically(path, lambda staging: save_file(tensors, staging, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "EmbeddingIndex":
        """Read an index written by `save`, onto `device`."""
        with safe_open(path, framework="pt", device=str(device)) as handle:
            meta = handle.metadata() or {}
            if FORMAT_KEY not in meta or set(handle.keys()) != {"vectors", "ids"}:
                raise ValueError(
                    f"{path} is not a franca_hf retrieval index (expected tensors 'vectors' and 'ids' and metadata "
                    f"{FORMAT_KEY!r}; found tensors {sorted(handle.keys())}, metadata {sorted(meta)}). Build one with "
                    "EmbeddingIndex(vectors, ids).save(path)."
                )
            info = json.loads(meta[FORMAT_KEY])
            if info.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path} has index format version {info.get('version')}; this code reads {FORMAT_VERSION}."
                )
            ids = json.loads(bytes(handle.get_tensor("ids").cpu().numpy()).decode())
            return cls(handle.get_tensor("vectors"), ids, info["dims"])

    def _level(self, dim: int) -> int:
        if dim not in self.dims:
            raise ValueError(f"dim={dim} is not an allowed nested dim of this index; choose one of {self.dims}.")
        return self.dims.index(dim)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} is out of range: it must be between 1 and the index size ({len(self)}).")

    def _check_queries(self, queries: torch.Tensor, dim: int) -> None:
        widths = sorted({dim, self.width})
        if queries.ndim != 2 or queries.shape[1] not in widths:
            raise ValueError(
                f"queries must have shape (Q, width) with width in {widths} (full, or already cut to the searched "
                f"prefix); got {tuple(queries.shape)}. Use queries[None] for a single query."
            )

    def _check_stages(self, stages: list[tuple[int, int]], k: int) -> None:
        if not stages:
            raise ValueError("stages is empty; pass at least one (dim, shortlist size) pair.")
        dims, sizes = [d for d, _ in stages], [s for _, s in stages]
        for dim in dims:
            self._level(dim)
        if dims != sorted(set(dims)):
            raise ValueError(f"Stage dims must be strictly increasing; got {dims}.")
        if sizes != sorted(sizes, reverse=True) or sizes[-1] < k:
            raise ValueError(f"Stage shortlist sizes must be non-increasing and all >= k={k}; got {sizes}.")

    def _normalized(self, queries: torch.Tensor, dim: int) -> torch.Tensor:
        """(Q, dim) float32 unit query prefixes on the index's device; errors on zero or non-finite prefixes."""
        cut = queries[:, :dim].to(self.vectors.device, torch.float32)
        norms = cut.norm(dim=1, keepdim=True)
        bad = ~torch.isfinite(norms) | (norms == 0)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"Query {row} has a zero or non-finite prefix of length {dim}; cosine is undefined.")
        return cut / norms

    def _scan(self, queries: torch.Tensor, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of all N vectors for unit (Q, dim) queries: (QUERY_BLOCK x chunk) score tiles in one buffer."""
        if dim == self.dims[0]:
            database, scale = self._shortlist_vectors, None
        else:
            database, scale = self.vectors[:, :dim], self._inv_norms[:, self._level(dim)]
        rows = max(1, min(queries.shape[0], QUERY_BLOCK))
        chunk = min(len(self), max(1024, SCORE_TILE // rows))
        buffer = queries.new_empty(rows * chunk)
        best_scores, best_indices = [], []
        for block in queries.split(QUERY_BLOCK):
            values, indices = [], []
            for start in range(0, len(self), chunk):
                part = database[start : start + chunk]
                out = buffer[: len(block) * len(part)].view(len(block), len(part))
                scores = torch.mm(block, part.T, out=out)
                if scale is not None:
                    scores.mul_(scale[start : start + chunk])
                top = scores.topk(min(k, scores.shape[1]), dim=1)
                values.append(top.values)
                indices.append(top.indices + start)
            top, pick = torch.cat(values, dim=1).topk(k, dim=1)
            best_scores.append(top)
            best_indices.append(torch.cat(indices, dim=1).gather(1, pick))
        return torch.cat(best_scores), torch.cat(best_indices)

    def _funnel(
        self, queries: torch.Tensor, stages: list[tuple[int, int]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first_dim, first_size = stages[0]
        scores, indices = self._scan(self._normalized(queries, first_dim), first_dim, min(first_size, len(self)))
        for dim, size in stages[1:]:
            unit, prefixes = self._normalized(queries, dim), self.vectors[:, :dim]
            inv_norms = self._inv_norms[:, self._level(dim)]
            block, parts = max(1, GATHER_TILE // (indices.shape[1] * dim)), []
            for rows, q in zip(indices.split(block), unit.split(block), strict=True):
                # index_select copies row segments; advanced indexing (prefixes[rows]) is several times slower on CPU
                candidates = prefixes.index_select(0, rows.flatten()).view(*rows.shape, dim)
                parts.append(torch.bmm(candidates, q.unsqueeze(2)).squeeze(2).mul_(inv_norms[rows]))
            scores = torch.cat(parts)
            scores, pick = scores.topk(min(size, scores.shape[1]), dim=1)
            indices = indices.gather(1, pick)
        return scores[:, :k], indices[:, :k]


def index_images(
    model: FrancaModel,
    image_processor: BaseImageProcessor,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    progress: bool = True,
    num_workers: int | None = 0,
) -> EmbeddingIndex:
    """Embed image files (folders are searched recursively) with a FrancaModel into an `EmbeddingIndex`.

    Stores the full-width Matryoshka CLS embeddings (`franca_hf.features.embed_batch`, unit norm) with the image
    paths as ids and the model's Matryoshka dims (`nested_dims`) as allowed dims, in memory; for a large collection, extract to a
    folder (resumable) and use `index_from_features`. Unreadable images are logged as warnings and skipped.
    """
    result = extract_features(
        model, image_processor, paths, batch_size=batch_size, num_workers=num_workers, progress=progress, desc="index"
    )
    return EmbeddingIndex(result.features, result.paths, nested_dims(model))


def index_from_features(folder: str | os.PathLike) -> EmbeddingIndex:
    """An index of the CLS rows of a `franca-hf extract` folder, without embedding anything again.

    Its dims are the extracting model's Matryoshka dims up to the stored width (`--dim`). An interrupted extraction
    gives the rows committed so far, with a warning.
    """
    folder = Path(folder)
    extraction = ExtractionIndex.load(folder).with_progress(folder)
    settings = extraction.settings
    if settings.kind != "cls":
        raise ValueError(
            f"{folder} holds {settings.kind} patch features; an index needs CLS embeddings (extract without --dense)."
        )
    if not extraction.rows:
        raise ValueError(f"{folder} holds no embedded image yet (failed: {len(extraction.failed)}).")
    if not extraction.complete:
        logger.warning(
            "%s is an interrupted extraction: indexing the %d images committed so far. Rerun the same "
            "`franca-hf extract` command to finish it.",
            folder,
            extraction.rows,
        )
    vectors, ids, row = torch.empty(extraction.rows, settings.dim), [], 0
    for shard in extraction.shards:
        shard_ids, features = read_shard(folder / shard["file"])
        vectors[row : row + len(shard_ids)] = features
        ids.extend(shard_ids)
        row += len(shard_ids)
    return EmbeddingIndex(vectors, ids, [d for d in settings.matryoshka_dims if d <= settings.dim])


def load_index(path: str | os.PathLike, device: str | torch.device = "cpu") -> EmbeddingIndex:
    """An index file written by `EmbeddingIndex.save`, or the index of a `franca-hf extract` folder."""
    if Path(path).is_dir():
        index = index_from_features(path)
        return index if str(device) == "cpu" else EmbeddingIndex(index.vectors.to(device), index.ids, index.dims)
    return EmbeddingIndex.load(path, device)


__all__ = ["EmbeddingIndex", "default_funnel", "index_from_features", "index_images", "load_index"]

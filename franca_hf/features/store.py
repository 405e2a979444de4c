"""The on-disk layout of an extraction: Parquet shards that `datasets.load_dataset(folder)` opens, and an index.

    OUT/
      README.md            dataset card
      extraction.json      the merged index: settings, committed shards (file, rows), unreadable images
      data/*.parquet       shards: columns `id` (where the row came from), `label` (labelled sources only),
                           `features` (D floats for CLS, or a (D, h, w) Array3D for dense maps)
      .progress/*.jsonl    while a run is going on: one line per shard committed, per process and run (hidden,
                           so that `datasets` never takes these lines for data)
      .damaged/*.parquet   committed shards found unreadable by a resumed run, set aside (their images were
                           embedded again)

`datasets.load_dataset(OUT)` infers the Parquet builder from the shards (it prefers Parquet on a tie with the one
JSON file). The card deliberately has no YAML `configs:` block: with one, `datasets` 5.2 caches every such folder
under the same fingerprint and serves one folder's rows for another, or stale rows after a resumed run.

A shard is written to a temporary name and renamed (complete or absent), then committed by appending a line to its
process's progress file and fsyncing. An image is done once its shard is committed (or it is recorded as
unreadable); a shard file that no line names is left over from a kill and is deleted before a run resumes, and a
committed one that cannot be read (truncated, overwritten, missing, another row count) is moved to `.damaged/`
and its images count as not done. At the end the first process merges the progress lines into `extraction.json`
and removes them.
"""

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputNotFoundError, UsageError
from ..io import write_file_atomically

FORMAT = "franca_hf.features"
FORMAT_VERSION = 1
INDEX_FILE = "extraction.json"
DATA_DIR = "data"
PROGRESS_DIR = ".progress"
SET_ASIDE_DIR = ".damaged"
ONE_ROW_KINDS = ("cls", "linear_probe")  # kinds whose features are one row an image (the dense ones: maps)
# what reading a truncated, overwritten or missing Parquet file raises (pyarrow's ArrowInvalid is a ValueError)
SHARD_READ_ERRORS = (OSError, ValueError)
CARD_FILE = "README.md"


@dataclass
class ExtractionRecord:
    """What a folder of features holds (`settings` in its `extraction.json`); a resumed run must ask for the same.

    Attributes:
        model: the model as given (folder, Hub id or release name).
        sources: the image inputs as given (files, folders, `hf:` specs) and `split` for datasets.
        kind: "cls", "dense", "dense_debiased", or "linear_probe" (`franca_hf.evaluation.linear`).
        dim: channels per row (the Matryoshka prefix; the model's width when not cut).
        normalized: CLS rows have unit L2 norm.
        dtype: stored float type, "float32" or "float16".
        matryoshka_dims: the model's nested dims (an index built from CLS rows uses those up to `dim`).
        quantized: "int8" when the Linear layers ran dynamically quantised, else None.
        resolved_model, resolved_sources: `model` and `sources` with local paths made absolute and resolved
            (`resolve_location`), filled in from the working directory when not given: what resumes compare, so
            that `photos`, `photos/` and `/abs/photos` are one folder, and `photos` from another directory another.
    """

    model: str
    sources: list[str]
    split: str
    kind: str
    dim: int
    normalized: bool
    dtype: str
    matryoshka_dims: list[int]
    quantized: str | None = None
    resolved_model: str | None = None
    resolved_sources: list[str] | None = None

    def __post_init__(self):
        if self.resolved_model is None:
            self.resolved_model = resolve_location(self.model)
        if self.resolved_sources is None:
            self.resolved_sources = [resolve_location(source) for source in self.sources]

    def differences(self, other: "ExtractionRecord") -> list[str]:
        """`field: this vs other` for every field that differs (matryoshka_dims follows model, the resolved
        fields follow theirs; model and sources are compared by what they point to, see `resolved_model`)."""
        mine, theirs = asdict(self), asdict(other)
        differences = []
        for key in ("model", "sources", "split", "kind", "dim", "normalized", "dtype", "quantized"):
            compared = f"resolved_{key}" if key in ("model", "sources") else key
            if mine[compared] == theirs[compared]:
                continue
            if mine[key] != theirs[key]:
                differences.append(f"{key}: {mine[key]!r} vs {theirs[key]!r}")
            else:  # the same words for other places
                differences.append(f"{key} (resolved): {mine[compared]!r} vs {theirs[compared]!r}")
        return differences


def resolve_location(spec: str) -> str:
    """A model or image source as the absolute, resolved path it points to (symlinks followed, trailing slashes
    dropped; `hf:<folder>` keeps its prefix) when it is an existing local path; a Hub id, release name or `demo` as
    is."""
    prefix = "hf:" if spec.startswith("hf:") else ""
    path = Path(spec.removeprefix(prefix))
    return f"{prefix}{path.resolve()}" if path.exists() else spec


@dataclass
class ExtractionIndex:
    """`extraction.json`: settings, the model's fingerprint (`franca_hf.fingerprint`; None in folders written before
    fingerprints), committed shards [{"file", "rows"}], unreadable images [(id, reason)]."""

    settings: ExtractionRecord
    shards: list[dict] = field(default_factory=list)
    failed: list[list[str]] = field(default_factory=list)
    complete: bool = False
    model_fingerprint: str | None = None

    @property
    def rows(self) -> int:
        return sum(shard["rows"] for shard in self.shards)

    def save(self, folder: Path) -> None:
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "settings": asdict(self.settings),
            "model_fingerprint": self.model_fingerprint,
            "complete": self.complete,
            "rows": self.rows,
            "shards": self.shards,
            "failed": self.failed,
        }
        write_file_atomically(folder / INDEX_FILE, lambda staging: staging.write_text(json.dumps(document, indent=1)))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ExtractionIndex":
        path = Path(folder) / INDEX_FILE
        if not path.is_file():
            raise InputNotFoundError(
                f"{folder} holds no {INDEX_FILE}: it is not a folder written by `franca-hf extract`."
            )
        try:
            document = json.loads(path.read_bytes())
            version = (document.get("format"), document.get("version"))
        except (ValueError, AttributeError) as error:  # not JSON, not UTF-8, or not an object
            raise UsageError(f"{path} is damaged ({error}); restore it, or extract into a new folder.") from None
        if version != (FORMAT, FORMAT_VERSION):
            raise UsageError(
                f"{path} is not a franca_hf features index of version {FORMAT_VERSION} "
                f"(format {version[0]!r}, version {version[1]!r})."
            )
        try:
            return cls(
                ExtractionRecord(**document["settings"]),
                document["shards"],
                document["failed"],
                document["complete"],
                document.get("model_fingerprint"),
            )
        except (KeyError, TypeError) as error:
            raise UsageError(
                f"{path} is damaged (lacks or mistypes {error}); restore it, or extract into a new folder."
            ) from None

    def with_progress(self, folder: Path) -> "ExtractionIndex":
        """This index plus the shards and failures committed in `progress/` by runs not yet merged."""
        merged = dataclasses.replace(self, shards=list(self.shards), failed=list(self.failed))
        files, failed = {shard["file"] for shard in self.shards}, {image_id for image_id, _ in self.failed}
        for line in progress_lines(folder):  # lines already merged (a kill while merging) are skipped
            if line["shard"] is not None and line["shard"] not in files:
                files.add(line["shard"])
                merged.shards.append({"file": line["shard"], "rows": line["rows"]})
            merged.failed.extend(entry for entry in line["failed"] if entry[0] not in failed)
            failed.update(image_id for image_id, _ in line["failed"])
        merged.shards.sort(key=lambda shard: shard["file"])
        return merged


def read_model_fingerprint(folder: str | os.PathLike) -> tuple[str | None, str]:
    """(fingerprint, model as given) of the model that made an extraction folder's features; the fingerprint is
    None for folders written before fingerprints were recorded."""
    index = ExtractionIndex.load(folder)
    return index.model_fingerprint, index.settings.model


def progress_lines(folder: Path) -> Iterator[dict]:
    """The committed lines of every progress file. A torn last line (a kill mid-append) is not committed, and a line
    that is not one `ProgressLog` writes (damaged) ends what is read of its file: the shards it and the later lines
    name are then uncommitted, and their images embedded again."""
    for path in sorted((folder / PROGRESS_DIR).glob("*.jsonl")):
        for raw in path.read_bytes().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:  # torn, or not UTF-8
                break
            if not isinstance(line, dict) or line.keys() != {"shard", "rows", "failed"}:
                break
            yield line


class ProgressLog:
    """Appends one fsynced JSON line per committed shard to `progress/<name>.jsonl`."""

    def __init__(self, folder: Path, name: str):
        self.path = folder / PROGRESS_DIR / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def commit(self, shard: str | None, rows: int, failed: list[tuple[str, str]]) -> None:
        with open(self.path, "a") as log:
            log.write(json.dumps({"shard": shard, "rows": rows, "failed": failed}) + "\n")
            log.flush()
            os.fsync(log.fileno())


def shard_features(settings: ExtractionRecord, row_shape: tuple[int, ...], class_names: list[str] | None):
    """The `datasets.Features` of a shard: id, label (when labelled), features."""
    from datasets import Array3D, ClassLabel, Features, List, Value

    columns = {"id": Value("string")}
    if class_names is not None:
        columns["label"] = ClassLabel(names=class_names)
    if len(row_shape) == 1:
        columns["features"] = List(Value(settings.dtype), length=row_shape[0])
    else:
        columns["features"] = Array3D(row_shape, settings.dtype)
    return Features(columns)


def write_shard(
    path: Path,
    settings: ExtractionRecord,
    ids: list[str],
    features: np.ndarray,
    labels: list[int] | None,
    class_names: list[str] | None,
) -> None:
    """Write rows (ids, (n, D) or (n, D, h, w) features, labels) as one Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = shard_features(settings, features.shape[1:], class_names if labels is not None else None).arrow_schema
    values = pa.array(np.ascontiguousarray(features, dtype=settings.dtype).reshape(-1))
    for size in reversed(features.shape[2:]):  # dense maps: nested lists, the storage of datasets' Array3D
        values = pa.ListArray.from_arrays(pa.array(np.arange(len(values) // size + 1, dtype=np.int32) * size), values)
    if features.ndim == 2:
        column = pa.FixedSizeListArray.from_arrays(values, features.shape[1])
    else:
        storage = pa.ListArray.from_arrays(
            pa.array(np.arange(len(ids) + 1, dtype=np.int32) * features.shape[1]), values
        )
        column = pa.ExtensionArray.from_storage(schema.field("features").type, storage)
    columns = [pa.array(ids, pa.string())] + ([pa.array(labels, pa.int64())] if labels is not None else []) + [column]
    table = pa.Table.from_arrays(columns, schema=schema)
    write_file_atomically(path, lambda staging: pq.write_table(table, staging))


def read_committed_ids(path: Path, rows: int, settings: ExtractionRecord) -> list[str]:
    """The ids of a committed shard's rows, from its footer and `id` column; raises one of `SHARD_READ_ERRORS` when
    the file cannot be read, holds another number of rows than `rows` (what the index committed), or columns other
    than an extraction of `settings` writes (another width or float type, say)."""
    import datasets  # noqa: F401 (registers the Array3D type that dense shards' schemas name)
    import pyarrow.parquet as pq

    problem = shard_schema_problem(pq.read_schema(path), settings)
    if problem:
        raise ValueError(problem)
    ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
    if len(ids) != rows:
        raise ValueError(f"{len(ids)} rows where {rows} were committed")
    return ids


def shard_class_names(path: Path) -> list[str] | None:
    """The class names a shard's `label` column stands for (None for an unlabelled shard), from its footer."""
    import pyarrow.parquet as pq
    from datasets import Features

    label = Features.from_arrow_schema(pq.read_schema(path)).get("label")
    return None if label is None else list(label.names)


def shard_schema_problem(schema, settings: ExtractionRecord) -> str | None:
    """What in a shard's Arrow `schema` differs from what an extraction of `settings` writes: string ids, and features
    of its float type and width (rows of (dim,), or maps of (dim, h, w) for dense kinds); None when nothing does."""
    import pyarrow as pa

    if "id" not in schema.names or "features" not in schema.names or schema.field("id").type != pa.string():
        return f"columns {schema.names}, where string ids and features were written"
    column = schema.field("features").type
    storage = getattr(column, "storage_type", column)
    shape = tuple(column.shape) if hasattr(column, "shape") else (getattr(storage, "list_size", None),)
    values = storage
    while hasattr(values, "value_type"):
        values = values.value_type
    expected = (settings.dim,) if settings.kind in ONE_ROW_KINDS else (settings.dim, "h", "w")
    if (
        values != pa.from_numpy_dtype(np.dtype(settings.dtype))
        or len(shape) != len(expected)
        or shape[0] != settings.dim
    ):
        held = np.dtype(values.to_pandas_dtype()).name if pa.types.is_floating(values) else values
        return f"features of shape {shape} in {held}, where {expected} in {settings.dtype} were written"
    return None


def read_shard(path: Path) -> tuple[list[str], torch.Tensor]:
    """(ids, features) of one shard; features (n, D) or (n, D, h, w) float32."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "features"])
    column = table.column("features").combine_chunks()
    shape = (len(table), *_row_shape(column.type))
    if hasattr(column, "storage"):  # Array3D
        column = column.storage
    while hasattr(column, "flatten"):
        column = column.flatten()
    values = torch.from_numpy(np.require(column.to_numpy(zero_copy_only=False), requirements="W").reshape(shape))
    return table.column("id").to_pylist(), values.float()


def _row_shape(arrow_type) -> tuple[int, ...]:
    if hasattr(arrow_type, "shape"):  # datasets' Array3D extension type
        return tuple(arrow_type.shape)
    return (arrow_type.list_size,)


def iter_shards(folder: str | os.PathLike) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(ids, features) of each committed shard of a finished or interrupted extraction, in file order."""
    folder = Path(folder)
    for shard in ExtractionIndex.load(folder).with_progress(folder).shards:
        yield read_shard(folder / shard["file"])


def write_card(folder: Path, index: ExtractionIndex) -> None:
    """A dataset card: what the features are and how to load them."""
    settings = index.settings
    what = (
        f"{settings.dim}-dim {'L2-normalised ' if settings.normalized else ''}CLS embeddings"
        if settings.kind == "cls"
        else f"{settings.dim}-dim linear-probe inputs (CLS of the last blocks, mean patch token)"
        if settings.kind == "linear_probe"
        else f"{settings.dim}-channel {'RASA-debiased ' if settings.kind == 'dense_debiased' else ''}patch feature maps"
    )
    text = f"""---
tags:
- franca
- image-feature-extraction
---
# Features of {", ".join(settings.sources)}

{what} ({settings.dtype}{", int8 model" if settings.quantized else ""}) of {index.rows} images by `{settings.model}`,
written by `franca-hf extract`; {len(index.failed)} unreadable images are listed in `{INDEX_FILE}`.

```python
import datasets

features = datasets.load_dataset("path/to/this/folder", split="train").with_format("torch")
```
"""
    write_file_atomically(folder / CARD_FILE, lambda staging: staging.write_text(text))

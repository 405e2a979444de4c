"""Feature extraction: what `franca-hf extract` runs (`extract`), streamed to resumable Parquet shards
(`extract_to_folder`), or in memory (`extract_features`).

`extract_to_folder` runs in one process or under `accelerate launch` (each process embeds every n-th pending image
into its own shards; the first one merges the index at the end). Rerunning it with the same settings resumes: the
images of committed shards are not embedded again, none is lost. Memory stays flat in the number of images: rows
are written shard by shard; only the ids of the done images are kept.
"""

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedConfig

from ..conversion.convert import release_is_converted, resolve_model
from ..conversion.releases import RELEASES
from ..data.sources import (
    ImageSource,
    SkipCounter,
    collect_image_paths,
    files_source,
    folder_source,
    hf_source,
    load_hf_dataset,
)
from ..errors import InputNotFoundError, OutputExistsError, UsageError
from ..fingerprint import check_same_model, model_fingerprint
from ..modeling import matryoshka_dim_problem, matryoshka_dims_of
from ..modeling.image_processing_franca import make_image_processor
from .loop import embed_batch, run_model
from .settings import ExtractSettings, check_dense_request
from .store import (
    DATA_DIR,
    INDEX_FILE,
    PROGRESS_DIR,
    SET_ASIDE_DIR,
    SHARD_READ_ERRORS,
    ExtractionIndex,
    ExtractionRecord,
    ProgressLog,
    read_committed_ids,
    shard_class_names,
    write_card,
    write_shard,
)

logger = logging.getLogger(__name__)
SHARD_BYTES = 256 * 2**20  # default shard size bound: rows x row bytes <= 256 MiB
MAX_SHARD_ROWS = 1024
# the run number R in a shard's name (`shard-<R>-<P>-<S>.parquet`) or a progress file's (`<R>-<P>.jsonl`)
RUN_FILE = re.compile(r"(\d{6})-\d{3}(?:-\d{5}\.parquet|\.jsonl)$")


@dataclass
class ExtractedFeatures:
    """Features of the images that could be read, in input order, and the ones that could not.

    Attributes:
        features: (n, d) embeddings, or (n, d, h, w) dense maps.
        paths: the n image ids (file paths, or `<spec>[<split>][<row>]`), aligned with `features`.
        failed: (id, reason) for every skipped image.
    """

    features: torch.Tensor
    paths: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)


def _open_inputs(inputs: Sequence[str | os.PathLike], split: str, image_column: str | None) -> ImageSource:
    """The images to extract: one `hf:<dataset>` spec (a saved folder or a Hub name, with `split`), one folder
    (labelled by subfolder when every image sits in one), or any list of image files and folders."""
    inputs = [str(item) for item in inputs]
    datasets_specs = [item for item in inputs if item.startswith("hf:")]
    if datasets_specs:
        if len(inputs) > 1:
            raise UsageError(
                f"Give one hf:<dataset> source alone, not together with other inputs; got {inputs}.", setting="images"
            )
        return hf_source(load_hf_dataset(inputs[0], split), inputs[0], image_column)
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        source = folder_source(inputs[0])
    else:
        source = files_source(collect_image_paths(inputs), ", ".join(inputs))
    _check_storable_ids(source)
    return source


def _check_storable_ids(source: ImageSource) -> None:
    """A UsageError naming the files whose paths are not valid UTF-8 (bytes a file system allows, which Python reads
    as surrogates): the shards store each image's path as its id, in Parquet's UTF-8 strings."""
    unstorable = []
    for position in range(len(source)):
        path = source.describe(position)
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            unstorable.append(os.fsencode(path))
    if unstorable:
        shown = ", ".join(repr(path) for path in unstorable[:3]) + (", ..." if len(unstorable) > 3 else "")
        raise UsageError(
            f"{len(unstorable)} image file name(s) are not valid UTF-8 ({shown}): an extract folder stores each path "
            "as the image's id, in UTF-8. Rename them (or index these images directly: `franca-hf index` with "
            "model)."
        )


def _check_feature_request(config: PreTrainedConfig, dim: int | None, dense: bool, debiased: bool) -> None:
    """Errors (naming the settings) for a request the model of `config` cannot serve, before its weights load."""
    check_dense_request(dense, debiased)
    if debiased and not getattr(config, "rasa_steps", 0):
        raise UsageError(
            "debiased needs RASA weights, and this model has none. Convert the checkpoint with its RASA head "
            "(`franca-hf convert`, `convert_checkpoint(rasa=...)`) or train one (`franca-hf rasa`).",
            setting="debiased",
        )
    problem = None if dim is None else matryoshka_dim_problem(dim, matryoshka_dims_of(config))
    if problem:
        raise UsageError(problem, setting="dim")


def _feature_kind(dense: bool, debiased: bool) -> str:
    return ("dense_debiased" if debiased else "dense") if dense else "cls"


def extract(settings: ExtractSettings) -> "ExtractionResult":
    """What `franca-hf extract` does: embed `settings.images` with `settings.model` into the resumable Parquet
    shards of `settings.out` (`extract_to_folder`), the images done before skipped.

    The inputs are opened (a missing path or an empty folder is refused) before the model loads, and the request
    (`dim`, `debiased`) is checked against the model's config before its weights are read. Runs in one process or under
    `accelerate launch` (every process returns the merged index; `ExtractionResult.is_main_process` says which one
    reports it).
    """
    source = _open_inputs(settings.images, settings.split, settings.image_column)
    request = partial(_check_feature_request, dim=settings.dim, dense=settings.dense, debiased=settings.debiased)
    model, processor = settings.model.load(check=request)
    record = ExtractionRecord(
        model=settings.model.name_or_path,
        sources=[str(item) for item in settings.images],
        split=settings.split,
        kind=_feature_kind(settings.dense, settings.debiased),
        dim=settings.dim or model.config.hidden_size,
        normalized=settings.normalize and not settings.dense,
        dtype=settings.features_dtype,
        matryoshka_dims=matryoshka_dims_of(model.config),
        quantized="int8" if settings.model.int8 else None,
    )
    return extract_to_folder(
        model,
        processor,
        source,
        settings.out,
        record,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        shard_rows=settings.shard_size,
        allow_other_model=settings.allow_other_model,
    )


def extract_features(
    model,
    image_processor,
    inputs: Sequence[str | os.PathLike] | ImageSource,
    dim: int | None = None,
    dense: bool = False,
    debiased: bool = False,
    normalize: bool = True,
    batch_size: int = 32,
    num_workers: int | None = 0,
    progress: bool = True,
    desc: str = "extract",
) -> ExtractedFeatures:
    """Embed images in memory (for a few images: queries, tests; use `extract_to_folder` for collections).

    Args:
        inputs: image files and folders (searched recursively), or an `ImageSource`.
        dim: Matryoshka prefix length (one of `model.config.matryoshka_dims`); full width when None.
        dense: (n, d, h, w) patch feature maps instead of (n, d) CLS embeddings.
        debiased: with `dense`, remove the RASA position directions (the model needs RASA weights).
        normalize: L2-normalise CLS embeddings after truncation (ignored for dense maps).
    """
    _check_feature_request(model.config, dim, dense, debiased)
    source = inputs if isinstance(inputs, ImageSource) else files_source(collect_image_paths(inputs))
    skips = SkipCounter()
    outputs, ids = [], []
    batches = run_model(
        model,
        source,
        image_processor,
        lambda model, pixels: embed_batch(model, pixels, dim, dense, debiased, normalize),
        batch_size=batch_size,
        num_workers=num_workers,
        skips=skips,
        progress=progress,
        desc=desc,
    )
    for positions, features in batches:
        outputs.append(features.float().cpu())
        ids.extend(source.describe(p) for p in positions)
    if not outputs:
        raise UsageError(f"None of the {len(source)} images could be read: {skips.describe()}.")
    return ExtractedFeatures(features=torch.cat(outputs), paths=ids, failed=skips.failed)


def process_state(device: str | None = None):
    """Accelerate's view of this process (rank, count, device): one process, or one of `accelerate launch`'s.

    Without an accelerator (or with `device="cpu"`), `accelerate launch --multi_gpu` processes join a gloo MULTI_CPU
    group only when the state is created with `cpu=True`. The first call fixes the state for the whole process.
    """
    from accelerate import PartialState

    cpu = not torch.accelerator.is_available() or (device is not None and torch.device(device).type == "cpu")
    return PartialState(cpu=cpu)


def default_shard_rows(row_bytes: int) -> int:
    """Rows per shard: at most MAX_SHARD_ROWS and at most SHARD_BYTES of features."""
    return max(1, min(MAX_SHARD_ROWS, SHARD_BYTES // row_bytes))


@dataclass
class ExtractionResult:
    """What `extract_to_folder` did: the folder, its merged index (`index.settings`: what the rows are), the images
    this process embedded, the rows the folder held before this run (its unreadable images not counted);
    `is_main_process`: this process is the one that reports (always true in a single process)."""

    folder: Path
    index: ExtractionIndex
    embedded: int
    already_done: int
    is_main_process: bool = True


class ShardWriter:
    """Buffers one process's rows and writes them as shards of `shard_rows` rows (the last of a run may hold fewer),
    each committed with the unreadable images met since the previous one."""

    def __init__(
        self,
        folder: Path,
        run_name: str,
        settings: ExtractionRecord,
        source: ImageSource,
        skips: SkipCounter,
        shard_rows: int | None,
    ):
        self.folder, self.run_name, self.settings, self.source, self.skips = folder, run_name, settings, source, skips
        self.shard_rows, self.log = shard_rows, ProgressLog(folder, run_name)
        self.positions: list[int] = []
        self.features: list[np.ndarray] = []
        self.shards = self.reported_failures = 0

    def add(self, positions: list[int], features: np.ndarray) -> None:
        self.positions.extend(positions)
        self.features.append(features)
        if self.shard_rows is None:
            self.shard_rows = default_shard_rows(features[0].nbytes)
        while len(self.positions) >= self.shard_rows:
            self.commit(self.shard_rows)

    def commit(self, rows: int | None = None) -> None:
        """Write the first `rows` buffered rows (all when None) as a shard and commit it; the rest stay buffered."""
        failed = self.skips.failed[self.reported_failures :]
        self.reported_failures = len(self.skips.failed)
        rows = len(self.positions) if rows is None else rows
        if not rows and not failed:
            return
        name = None
        if rows:
            name = f"{DATA_DIR}/shard-{self.run_name}-{self.shards:05d}.parquet"
            buffered = np.concatenate(self.features)
            positions, self.positions = self.positions[:rows], self.positions[rows:]
            self.features = [buffered[rows:]] if self.positions else []
            labels = self.source.labels
            write_shard(
                self.folder / name,
                self.settings,
                [self.source.describe(p) for p in positions],
                buffered[:rows],
                None if labels is None else [labels[p] for p in positions],
                self.source.class_names,
            )
            self.shards += 1
        self.log.commit(name, rows, [list(f) for f in failed])


def extract_to_folder(
    model,
    image_processor,
    source: ImageSource,
    out_dir: str | os.PathLike,
    settings: ExtractionRecord,
    batch_size: int = 32,
    num_workers: int | None = None,
    shard_rows: int | None = None,
    progress: bool = True,
    allow_other_model: bool = False,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> ExtractionResult:
    """Embed every image of `source` not already done into Parquet shards under `out_dir` (see `store`).

    `forward(model, pixel_values)` computes the rows of a batch when `settings.kind` is one that `embed_batch` does
    not make (the linear-probe inputs of `franca_hf.evaluation`); `embed_batch` with `settings` when None.

    Under `accelerate launch`, each process takes every n-th pending image and writes its own shards; all
    processes return the merged index. `settings` must match those of a partial extraction already in `out_dir`,
    and the model its fingerprint (`franca_hf.fingerprint`) unless `allow_other_model`. A committed shard that
    cannot be read is set aside (`SET_ASIDE_DIR`) and its images are embedded again. `shard_rows` defaults to
    `default_shard_rows` of the feature size.
    """
    state = process_state()
    folder = Path(out_dir)
    index = _existing_index(folder, settings)
    fingerprint = model_fingerprint(model)
    if index.model_fingerprint is None and not index.shards and not index.failed:
        index.model_fingerprint = fingerprint  # a new folder (one recorded before fingerprints keeps None)
    same_place = settings.resolved_model == index.settings.resolved_model
    check_same_model(
        index.model_fingerprint,
        fingerprint,
        f"The extract folder {folder}",
        index.settings.model,
        index.settings.model if same_place else settings.model,
        allow_other_model,
    )
    source = _spelled_as(source, settings.sources, index.settings.sources)
    done = {image_id for image_id, _ in index.failed}
    readable, damaged, rows_before = [], [], 0
    for shard in index.shards:
        try:
            ids = read_committed_ids(folder / shard["file"], shard["rows"], index.settings)
        except SHARD_READ_ERRORS as error:
            damaged.append((shard, f"{type(error).__name__}: {error}"))
            continue
        readable.append(shard)
        done.update(ids)
        rows_before += len(ids)
    if readable:
        _check_same_classes(folder / readable[0]["file"], source)
    pending = [position for position in range(len(source)) if source.describe(position) not in done]
    run_number = _next_run_number(folder, index)
    state.wait_for_everyone()  # every process has read the same state; now the first one tidies up
    if state.is_main_process:
        for shard, reason in damaged:
            _set_aside(folder, shard, reason)
        index.shards = readable
        _remove_uncommitted(folder, index.shards)
        _consolidate(folder, index)
    state.wait_for_everyone()

    run_name = f"{run_number:06d}-{state.process_index:03d}"
    skips = SkipCounter()
    writer = ShardWriter(folder, run_name, settings, source, skips, shard_rows)
    storage_dtype = getattr(torch, settings.dtype)
    if forward is None:
        dense, debiased = settings.kind != "cls", settings.kind == "dense_debiased"
        forward = partial(embed_batch, dim=settings.dim, dense=dense, debiased=debiased, normalize=settings.normalized)
    batches = run_model(
        model,
        source,
        image_processor,
        forward,
        positions=pending[state.process_index :: state.num_processes],
        batch_size=batch_size,
        num_workers=num_workers,
        skips=skips,
        progress=progress and state.is_local_main_process,
        desc="extract",
    )
    embedded = 0
    for positions, features in batches:
        writer.add(positions, features.to("cpu", storage_dtype).numpy())
        embedded += len(positions)
    writer.commit()

    state.wait_for_everyone()
    if state.is_main_process:
        merged = ExtractionIndex.load(folder).with_progress(folder)
        merged.complete = True
        _consolidate(folder, merged)
        write_card(folder, merged)
    state.wait_for_everyone()
    return ExtractionResult(folder, ExtractionIndex.load(folder), embedded, rows_before, state.is_main_process)


def _existing_index(folder: Path, settings: ExtractionRecord) -> ExtractionIndex:
    """The committed state of `folder` (a fresh index when there is none); errors when the settings differ."""
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(
            f"out={folder} is a file; extract writes a folder of Parquet shards there.", setting="out"
        )
    if not (folder / INDEX_FILE).is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise OutputExistsError(
                f"out={folder} exists and is not a franca-hf extraction folder; choose a new or empty folder.",
                setting="out",
            )
        return ExtractionIndex(settings)
    index = ExtractionIndex.load(folder).with_progress(folder)
    differences = settings.differences(index.settings)
    if differences:
        raise UsageError(
            f"out={folder} holds features made with other settings, so this run cannot resume it ("
            + "; ".join(differences)
            + " [this run vs the folder]). Use the same settings, or a new out folder.",
            setting="out",
        )
    index.complete = False
    return index


def _consolidate(folder: Path, index: ExtractionIndex) -> None:
    """Write `index` (which includes the progress lines) as the folder's index, then drop the progress files.
    A kill in between is harmless: `with_progress` skips lines the index already holds."""
    index.save(folder)
    for path in (folder / PROGRESS_DIR).glob("*.jsonl"):
        path.unlink()
    if (folder / PROGRESS_DIR).is_dir():
        (folder / PROGRESS_DIR).rmdir()


def _check_same_classes(shard: Path, source: ImageSource) -> None:
    """A UsageError when the images' classes are not those a committed shard of the folder labels its rows with (a
    class folder added or removed since: the labels are class indices, and the old shards' would mean other names)."""
    held = shard_class_names(shard)
    if held != source.class_names:
        now, before = (
            "no classes" if names is None else f"the classes {names}" for names in (source.class_names, held)
        )
        raise UsageError(
            f"The images now have {now}, where the shards of the folder hold labels of {before}: a resume would mix "
            "labels that mean other classes. Extract into a new out folder (or restore the class folders).",
            setting="out",
        )


def _next_run_number(folder: Path, index: ExtractionIndex) -> int:
    """One more than the largest run number R of any shard or progress file the folder names or holds (committed,
    in progress, set aside, or written by an interrupted run): a new run's files never take an earlier run's names."""
    names = [shard["file"] for shard in index.shards]
    for part in (DATA_DIR, SET_ASIDE_DIR, PROGRESS_DIR):
        names.extend(path.name for path in (folder / part).glob("*"))
    numbers = [int(match.group(1)) for name in names if (match := RUN_FILE.search(name))]
    return max(numbers, default=-1) + 1


def _set_aside(folder: Path, shard: dict, reason: str) -> None:
    """Move a damaged committed shard out of the data (into the hidden `SET_ASIDE_DIR`, which `datasets` does not
    read) and say so in one line; its images are no longer done."""
    path, target = folder / shard["file"], folder / SET_ASIDE_DIR / Path(shard["file"]).name
    if path.exists():
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        what = f"is damaged ({reason}): set aside as {target}"
    else:
        what = "is missing"
    logger.warning("%s %s; its %d images are extracted again.", path, what, shard["rows"])


def _spelled_as(source: ImageSource, given: list[str], stored: list[str]) -> ImageSource:
    """`source` with its image ids spelled as the stored run spelled its inputs: `/abs/photos/a.jpg` read as
    `photos/a.jpg` when this run gave `/abs/photos/` for the folder's `photos` (the settings check has found that
    they point to the same place), so that done images are recognised and the folder stays consistent."""
    if given == stored:
        return source
    pairs = [(_id_prefix(new), _id_prefix(old)) for new, old in zip(given, stored, strict=True)]
    return dataclasses.replace(source, describe=partial(_respelled, source.describe, pairs))


def _id_prefix(spec: str) -> str:
    """How the ids of an input's images begin: the spec itself for `hf:` datasets, the normalised path otherwise
    (`Path` drops trailing slashes and `./`)."""
    return spec if spec.startswith("hf:") else str(Path(spec))


def _respelled(describe, pairs: list[tuple[str, str]], position: int) -> str:
    image_id = describe(position)
    for new, old in pairs:
        if image_id == new or image_id.startswith(new + ("" if new.startswith("hf:") else os.sep)):
            return old + image_id[len(new) :]
    return image_id


def _remove_uncommitted(folder: Path, committed: list[dict]) -> None:
    """Delete the shard files that no committed line names (a kill between writing and committing one) and the
    temporary files of interrupted writes."""
    keep = {shard["file"] for shard in committed}
    for path in (folder / DATA_DIR).glob("*"):
        if f"{DATA_DIR}/{path.name}" not in keep:
            logger.info("Removing %s, written by an interrupted run but never committed.", path)
            path.unlink()


def load_model_and_processor(
    name_or_path: str,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    int8: bool = False,
    check: Callable[[PreTrainedConfig], None] | None = None,
):
    """A model and its image processor from a folder, a Hub id, or an official release name.

    `device` defaults to this process's accelerator (`cuda:<local rank>` under `accelerate launch`) or the CPU;
    `int8` quantises the Linear layers dynamically (CPU only, see `quantize_int8`). `check`, given the model's config
    before its weights are read (or downloaded), raises on a request the model cannot serve.
    """
    _check_device(device)
    state = process_state(device)
    device = torch.device(device) if device else state.device
    if int8 and dtype not in (None, torch.float32):
        raise UsageError(
            f"int8 quantises a float32 model; got dtype={str(dtype).removeprefix('torch.')}.", setting="int8"
        )
    if int8 and device.type != "cpu":
        raise UsageError(
            f"int8 runs on the CPU only (PyTorch's int8 kernels are CPU kernels); got device={device}.", setting="int8"
        )
    if check is not None and name_or_path in RELEASES and not release_is_converted(name_or_path):
        check(RELEASES[name_or_path].expected_config())  # before gigabytes are downloaded and converted
    with state.main_process_first():  # a release name is downloaded and converted once, by the first process
        path = resolve_model(name_or_path)
    config = _model_config(path)
    if check is not None:
        check(config)
    model = load_pretrained_model(path, config, dtype or torch.float32).to(device).eval()
    if int8:
        from .quantize import quantize_int8

        model = quantize_int8(model)
    return model, load_image_processor(path, model.config)


def _check_device(device: str | None) -> None:
    """A UsageError (setting `device`) for a device torch does not know, or whose kind of accelerator it cannot see."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(
            f"device={device!r} is not a device; give cpu, cuda, cuda:<index>, mps, ... (torch.device's spelling).",
            setting="device",
        ) from None
    module = getattr(torch, kind, None)
    if kind != "cpu" and hasattr(module, "is_available") and not module.is_available():
        raise UsageError(f"device={device!r}, but torch sees no {kind} device on this machine.", setting="device")


def _model_config(path: str) -> PreTrainedConfig:
    """The config of the model folder or Hub id `path`, or an InputNotFoundError (setting `model`) saying what it is
    instead: a missing or unreachable name, a file, a folder without a model."""
    local = Path(path).expanduser()
    if local.is_file():
        raise InputNotFoundError(f"model={path} is a file; give a model folder, a Hub id or a release name.", "model")
    if local.is_dir() and not (local / "config.json").is_file():
        raise InputNotFoundError(
            f"model={path} is a folder without config.json: not a model folder (write one with "
            "model.save_pretrained(folder)).",
            "model",
        )
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as error:  # not a folder here, and not a Hub model this machine can reach
        reason = str(error).strip().splitlines()[0]
        raise InputNotFoundError(
            f"model={path} is not a model folder here, a release name (`franca-hf releases`), or a Hub model "
            f"this machine can reach ({reason}).",
            "model",
        ) from None


def load_pretrained_model(path: str, config: PreTrainedConfig | None = None, dtype: torch.dtype | str = "auto"):
    """`AutoModel.from_pretrained(path)`, with a one-line error (setting `model`) where a folder or Hub model with a
    config has no weights this machine can read, or its weights file is truncated or damaged."""
    from safetensors import SafetensorError

    try:
        return AutoModel.from_pretrained(path, config=config, dtype=dtype)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        raise InputNotFoundError(
            f"model={path} has a config but no weights that can be read here ({reason}).", "model"
        ) from None
    except SafetensorError as error:
        raise UsageError(
            f"model={path}: its weights cannot be read ({error}); the file is truncated or damaged. Save or download "
            "the model again.",
            setting="model",
        ) from None


def load_image_processor(path: str, config):
    """The image processor saved with a model, or, for a Franca folder without one (`save_pretrained` writes none),
    the authors' evaluation transform at the config's `image_size`, with a one-line note."""
    from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file

    if cached_file(path, IMAGE_PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False) is not None:
        return AutoImageProcessor.from_pretrained(path)
    if config.model_type != "franca":
        raise InputNotFoundError(
            f"{path} has no {IMAGE_PROCESSOR_NAME}, and its {config.model_type!r} config does not say how to preprocess "
            "images; save the model's image processor into it (`processor.save_pretrained(folder)`)."
        )
    logger.warning(
        "note: %s has no %s; using the Franca evaluation transform for its image_size %d (resize, center crop %d, "
        "ImageNet mean/std).",
        path,
        IMAGE_PROCESSOR_NAME,
        config.image_size,
        config.image_size,
    )
    return make_image_processor(config.image_size)

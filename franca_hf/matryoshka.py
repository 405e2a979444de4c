"""A fitted Matryoshka truncation basis (PCA) for a FrancaModel: what `franca-hf fit-pca` runs (`fit_pca`).

Cutting an embedding to its first m channels only works where training made those prefixes meaningful. A checkpoint
trained with projection heads (the released Franca weights, any `project`-layout teacher) cuts better in a basis
fitted to its own features: the principal directions of its final-normed CLS tokens (and, separately, of its patch
tokens), by decreasing variance. The model then stores the mean and the rotation (`config.matryoshka_basis="pca"`,
`FrancaMatryoshkaBasis`) and every Matryoshka output becomes normalise(((z - mean) R)[:, :m]) (see docs/matryoshka.md).

* `CovarianceAccumulator`: streaming mean and covariance in float64; memory D² whatever the number of rows, and
  accumulators of disjoint shares merge exactly (several processes, several passes).
* `PrincipalBasis.from_statistics`: the eigen-decomposition, columns by decreasing variance, signs fixed.
* `accumulate_token_statistics`: one pass over an image source (`franca_hf.features.run_model`), CLS and patch tokens.
* `fit_matryoshka_basis`: that pass and the decomposition, as a `MatryoshkaFit`.
* `with_matryoshka_basis`: a new FrancaModel holding a fit; `write_fitted_folder`: a complete folder with it.
* `fit_pca(FitPcaSettings)`: the command in one call (checks, the fit, the folder).

Imports nothing from `franca_hf.training`.
"""

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from .conversion.convert import resolve_model
from .conversion.export import fill_model_folder
from .conversion.model_card import format_explained_variance
from .data.sources import ImageSource, SkipCounter, open_source, subsample
from .errors import UsageError
from .features.loop import input_device_and_dtype, run_model
from .io import MODEL_FOLDER, check_folder_out, write_folder_atomically
from .matryoshka_settings import FitPcaSettings
from .modeling import FrancaConfig, FrancaModel

BASIS_PREFIX = "matryoshka_basis."
PROVENANCE_KEY = "matryoshka_pca"  # in config.source_checkpoint: what the basis was fitted on
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".index.json")


def describe_data(spec: str, split: str) -> str:
    """How a card names the images of a source spec: the folder, or the dataset (demo, hf:...) and its split."""
    return spec if Path(spec).is_dir() else f"{spec} (split {split})"


def minimum_images(width: int) -> int:
    """Images needed to fit a basis of a D-wide model: D + 1 (the covariance of n rows has rank at most n - 1, and
    every direction of a D x D rotation must come from the data)."""
    return width + 1


class CovarianceAccumulator:
    """Running count, mean (D,) and scatter matrix (D, D) sum (x - mean)(x - mean)^T of rows, in float64.

    Each batch is centred on its own mean and combined with the running sums by the pairwise update of Chan et al.
    (1979), which stays accurate where the textbook sum of x x^T loses digits to a large mean. Memory is two D x D
    float64 matrices' worth at most, independent of the number of rows.
    """

    def __init__(self, width: int, device: torch.device | str | None = None):
        self.width = width
        self.count = 0
        self.mean = torch.zeros(width, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(width, width, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        """Add rows (..., D), any float dtype and device (moved to the accumulator's)."""
        rows = rows.reshape(-1, self.width).to(self.mean.device, torch.float64)
        if len(rows) == 0:
            return
        mean = rows.mean(dim=0)
        centred = rows - mean
        self._combine(len(rows), mean, centred.T @ centred)

    def merge(self, other: "CovarianceAccumulator") -> None:
        """Add the rows another accumulator has seen."""
        if other.width != self.width:
            raise ValueError(f"Cannot merge a {other.width}-wide accumulator into a {self.width}-wide one.")
        if other.count:
            self._combine(other.count, other.mean.to(self.mean.device), other.scatter.to(self.mean.device))

    def _combine(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.scatter += scatter + torch.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        """(D, D) unbiased sample covariance, float64."""
        if self.count < 2:
            raise ValueError(f"A covariance needs at least 2 rows; got {self.count}.")
        return self.scatter / (self.count - 1)

    def cpu(self) -> "CovarianceAccumulator":
        """This accumulator with its tensors on the CPU (to send it to other processes)."""
        self.mean, self.scatter = self.mean.cpu(), self.scatter.cpu()
        return self


@dataclass
class PrincipalBasis:
    """Principal directions of a set of D-dim rows.

    Attributes:
        mean: (D,) float64 mean of the rows.
        rotation: (D, D) float64 orthogonal matrix; column j is the direction of the j-th largest variance, signed
            so that its entry of largest magnitude is positive (the first such entry on ties).
        variances: (D,) float64 variance along each column, decreasing (eigenvalues of the covariance, >= 0).
        count: number of rows fitted.
    """

    mean: torch.Tensor
    rotation: torch.Tensor
    variances: torch.Tensor
    count: int

    @classmethod
    def from_statistics(cls, statistics: CovarianceAccumulator) -> "PrincipalBasis":
        eigenvalues, eigenvectors = torch.linalg.eigh(statistics.covariance())  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        largest = eigenvectors.abs().argmax(dim=0)
        signs = eigenvectors.gather(0, largest[None]).sign()
        return cls(statistics.mean.clone(), eigenvectors * signs, eigenvalues, statistics.count)

    def explained_variance(self, dims: list[int]) -> dict[int, float]:
        """Share (0..1) of the total variance held by the first m directions, for each m in `dims`."""
        cumulative = self.variances.cumsum(0)
        total = cumulative[-1].item()
        return {m: (cumulative[m - 1].item() / total if total > 0 else math.nan) for m in dims}


@dataclass
class TokenStatistics:
    """What one pass over images accumulates: the final-normed CLS tokens and the final-normed patch tokens."""

    cls: CovarianceAccumulator
    patches: CovarianceAccumulator
    images: int = 0

    def merge(self, other: "TokenStatistics") -> None:
        self.cls.merge(other.cls)
        self.patches.merge(other.patches)
        self.images += other.images

    def cpu(self) -> "TokenStatistics":
        self.cls.cpu(), self.patches.cpu()
        return self


@dataclass
class MatryoshkaFit:
    """A fitted truncation basis: CLS and patch-token bases and a description of the data they came from."""

    cls: PrincipalBasis
    patches: PrincipalBasis | None
    images: int
    data: str

    @classmethod
    def from_statistics(cls, statistics: TokenStatistics, data: str) -> "MatryoshkaFit":
        """The bases of accumulated statistics; errors when there are too few images for a full-width basis."""
        needed = minimum_images(statistics.cls.width)
        if statistics.images < needed:
            raise UsageError(
                f"A PCA basis of this {statistics.cls.width}-dim model needs at least {needed} readable images (the "
                f"covariance of n images has rank at most n - 1); {data} gave {statistics.images}."
            )
        return cls(
            PrincipalBasis.from_statistics(statistics.cls),
            PrincipalBasis.from_statistics(statistics.patches),
            statistics.images,
            data,
        )

    def explained_variance(self, dims: list[int]) -> dict[str, dict[int, float]]:
        """{"cls": {m: share}, "patches": {m: share}} (no "patches" when no patch basis was fitted)."""
        shares = {"cls": self.cls.explained_variance(dims)}
        if self.patches is not None:
            shares["patches"] = self.patches.explained_variance(dims)
        return shares

    def provenance(self, dims: list[int]) -> dict[str, Any]:
        """JSON-ready record for `config.source_checkpoint["matryoshka_pca"]` (shown on the model card)."""
        return {
            "data": self.data,
            "images": self.images,
            "patch_tokens": self.patches.count if self.patches is not None else 0,
            # lists aligned with "dims": config.json is written with sorted keys, which would reorder "8" < "16"
            "explained_variance": {
                "dims": list(dims),
                **{
                    kind: [round(s, 6) for s in shares.values()]
                    for kind, shares in self.explained_variance(dims).items()
                },
            },
        }


def _raw_tokens(model: FrancaModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) final-normed CLS and (B, N, D) final-normed patch tokens, in no basis (full width, never rotated)."""
    out = model(pixel_values, return_dict=True)
    return out.pooler_output, out.patch_tokens


def accumulate_token_statistics(
    model: FrancaModel,
    source: ImageSource,
    image_processor,
    positions: list[int] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    skips: SkipCounter | None = None,
    progress: bool = True,
) -> TokenStatistics:
    """Mean and covariance of the model's raw CLS and patch tokens over the readable images of `source` (those at
    `positions` when given), accumulated on the model's device in float64 (on the CPU for Apple's MPS, which has no
    float64) while `run_model` streams the images."""
    if not isinstance(model, FrancaModel):
        raise ValueError(f"A Matryoshka basis is fitted for a FrancaModel; got a {type(model).__name__}.")
    width, (device, _) = model.config.hidden_size, input_device_and_dtype(model)
    if device.type == "mps":
        device = torch.device("cpu")
    statistics = TokenStatistics(CovarianceAccumulator(width, device), CovarianceAccumulator(width, device))
    batches = run_model(
        model,
        source,
        image_processor,
        _raw_tokens,
        positions=positions,
        batch_size=batch_size,
        num_workers=num_workers,
        skips=skips,
        progress=progress,
        desc="fit-pca",
    )
    for batch_positions, (cls, patches) in batches:
        statistics.cls.update(cls)
        statistics.patches.update(patches)
        statistics.images += len(batch_positions)
    return statistics


def fit_matryoshka_basis(
    model: FrancaModel,
    source: ImageSource,
    image_processor,
    data: str | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    skips: SkipCounter | None = None,
    progress: bool = True,
) -> MatryoshkaFit:
    """Fit the CLS and the patch-token bases of `model` on the images of `source`.

    Args:
        data: how the card describes the images (default: the source's name).
        image_processor: the model's preprocessing (`AutoImageProcessor.from_pretrained(folder)`).
    Raises ValueError when fewer than `minimum_images(D)` images could be read.
    """
    skips = SkipCounter() if skips is None else skips
    statistics = accumulate_token_statistics(
        model, source, image_processor, batch_size=batch_size, num_workers=num_workers, skips=skips, progress=progress
    )
    if statistics.images == 0:
        raise UsageError(f"None of the {len(source)} images of {source.name} could be read: {skips.describe()}.")
    return MatryoshkaFit.from_statistics(statistics, data or source.name)


def with_matryoshka_basis(model: FrancaModel, fit: MatryoshkaFit) -> FrancaModel:
    """A new FrancaModel with `config.matryoshka_basis="pca"` holding `fit` (fp32), and the fit's provenance in
    `config.source_checkpoint["matryoshka_pca"]`. Any basis `model` had is replaced; without a patch fit the patch
    basis is the identity (patch tokens are cut as prefixes).

    The new model shares its other weights with `model` (no copy: an 8-GB model stays 8 GB); it is on the same
    device, in the same dtype and training mode, with the same attention implementation and gradient checkpointing.
    """
    config = model.config
    source = {**(config.source_checkpoint or {}), PROVENANCE_KEY: fit.provenance(config.matryoshka_dims)}
    device, width = input_device_and_dtype(model)[0], config.hidden_size
    patches = fit.patches
    basis = {
        "cls_mean": fit.cls.mean,
        "cls_rotation": fit.cls.rotation,
        "patch_mean": patches.mean if patches is not None else torch.zeros(width),
        "patch_rotation": patches.rotation if patches is not None else torch.eye(width),
    }
    basis = {BASIS_PREFIX + name: value.to(device, torch.float32) for name, value in basis.items()}
    return rebuilt_model(model, {"matryoshka_basis": "pca", "source_checkpoint": source}, basis)


def without_matryoshka_basis(model: FrancaModel) -> FrancaModel:
    """A new FrancaModel whose Matryoshka embeddings are cut as prefixes: `model` with its fitted basis (if any)
    dropped, sharing its other weights, on the same device, in the same dtype and training mode, with the same
    attention implementation and gradient checkpointing."""
    return rebuilt_model(model, {"matryoshka_basis": "prefix"}, {})


def rebuilt_model(model: FrancaModel, config_changes: dict, basis: dict[str, torch.Tensor]) -> FrancaModel:
    """`model` rebuilt with `config_changes`, sharing its weights but its Matryoshka basis (replaced by the `basis`
    weights, by state-dict key), in its training mode, attention implementation and gradient checkpointing (which
    live outside the config's dict and the weights)."""
    config = FrancaConfig.from_dict({**model.config.to_dict(), **config_changes})
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        rebuilt = FrancaModel(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(BASIS_PREFIX)}
    rebuilt.load_state_dict({**state, **basis}, assign=True)
    modules = dict(model.named_modules())
    for name, module in rebuilt.named_modules():
        for attribute in ("gradient_checkpointing", "_gradient_checkpointing_func"):
            if hasattr(modules.get(name), attribute):  # (a basis module is new)
                setattr(module, attribute, getattr(modules[name], attribute))
    return rebuilt.train(model.training)


def write_fitted_folder(
    model_path: str | os.PathLike,
    fit: MatryoshkaFit,
    out_dir: str | os.PathLike,
    image_processor=None,
    overwrite: bool = False,
) -> Path:
    """Write the model at `model_path` (a folder or Hub id) with `fit` as its basis to `out_dir`, atomically.

    The weights are the stored ones in their stored dtype (whatever dtype the fit ran in); the folder gets the image
    processor (`image_processor`, else the one of `model_path`'s config size), the remote code and a model card that
    records the fit and keeps the input's provenance and license (`config.source_checkpoint`). Other files of a local
    input folder (e.g. `rasa_report.json`) are copied, weights excepted. `out_dir` may be `model_path` itself
    (with `overwrite`).
    """
    fitted = with_matryoshka_basis(FrancaModel.from_pretrained(model_path, dtype="auto"), fit).eval()
    source = Path(model_path)

    def fill(folder: Path) -> None:
        fill_model_folder(folder, fitted, image_processor)
        if not source.is_dir():
            return
        for path in source.iterdir():
            written = (folder / path.name).exists()
            if (
                path.is_file()
                and not written
                and not path.name.startswith(".")
                and not path.name.endswith(WEIGHT_SUFFIXES)
            ):
                shutil.copy2(path, folder / path.name)

    return write_folder_atomically(out_dir, fill, MODEL_FOLDER, overwrite, inputs=(model_path,))


@dataclass
class FitPcaResult:
    """What `fit_pca` wrote: the new folder, the images fitted on (`data` describes them), the unreadable images
    skipped, and the share (0..1) of the variance kept at each Matryoshka dim ({"cls": {m: share}, "patches": ...})."""

    folder: Path
    images: int
    data: str
    skipped: int
    explained_variance: dict[str, dict[int, float]]

    def explained_variance_table(self) -> str:
        """The Markdown table the model card shows."""
        return format_explained_variance(self.explained_variance)


def fit_pca(settings: FitPcaSettings) -> FitPcaResult:
    """What `franca-hf fit-pca` does: fit the PCA truncation basis of a Franca model on `settings.data` and write the
    model with it as the folder `settings.out` (`fit_matryoshka_basis`, `write_fitted_folder`).

    Refused before the model loads (`_checked_inputs`): an existing `out` without `overwrite`, a model that is not
    a Franca one, a model that already has a basis without `overwrite_basis`, and fewer images than `minimum_images`
    of its width.
    """
    path, config, source = _checked_inputs(settings)
    model, processor = dataclasses.replace(settings.model, name_or_path=path).load()
    described = describe_data(settings.data, settings.split)
    skips = SkipCounter()
    fit = fit_matryoshka_basis(
        model,
        source,
        processor,
        data=described,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        skips=skips,
    )
    del model  # the folder is written from the stored weights, in their stored dtype
    folder = write_fitted_folder(path, fit, settings.out, processor, overwrite=settings.overwrite)
    return FitPcaResult(folder, fit.images, described, skips.count, fit.explained_variance(config.matryoshka_dims))


def _checked_inputs(settings: FitPcaSettings) -> tuple[str, PretrainedConfig, ImageSource]:
    """The model's resolved path and config and the images to fit on, once `fit_pca`'s checks have passed."""
    name = settings.model.name_or_path
    check_folder_out(settings.out, MODEL_FOLDER, settings.overwrite, inputs=(name,))
    path = resolve_model(name)
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "franca":
        raise UsageError(
            f"model={name} is a {config.model_type!r} model; fit-pca fits the truncation basis of a Franca model "
            "(model_type 'franca').",
            setting="model",
        )
    if config.matryoshka_basis == "pca" and not settings.overwrite_basis:
        fitted_on = (config.source_checkpoint or {}).get(PROVENANCE_KEY, {}).get("data", "unknown data")
        raise UsageError(
            f"model={name} already has a fitted Matryoshka basis (fitted on {fitted_on}); set overwrite_basis to fit "
            "a new one in its place.",
            setting="overwrite_basis",
        )
    needed = minimum_images(config.hidden_size)
    if settings.max_images is not None and settings.max_images < needed:
        raise UsageError(
            f"max_images={settings.max_images} is too few: a PCA basis of this {config.hidden_size}-dim model needs "
            f"at least {needed} images.",
            setting="max_images",
        )
    source = subsample(open_source(settings.data, settings.split, settings.image_column), settings.max_images)
    if len(source) < needed:
        raise UsageError(
            f"data={settings.data} holds {len(source)} images; a PCA basis of this {config.hidden_size}-dim model "
            f"needs at least {needed}.",
            setting="data",
        )
    return path, config, source


__all__ = [
    "CovarianceAccumulator",
    "FitPcaResult",
    "MatryoshkaFit",
    "PrincipalBasis",
    "TokenStatistics",
    "accumulate_token_statistics",
    "describe_data",
    "fit_matryoshka_basis",
    "fit_pca",
    "minimum_images",
    "with_matryoshka_basis",
    "write_fitted_folder",
]

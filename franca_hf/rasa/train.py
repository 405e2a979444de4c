"""RASA post-training (docs/rasa.md): `rasa(RasaRunSettings)` is `franca-hf rasa key=value ...` in one call; under it,
`train_rasa` trains the chain of position directions on a frozen backbone, resuming after every step, and
`write_rasa_output` writes the debiased model or the directions file."""

import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..conversion.export import fill_model_folder
from ..data.augmented import AugmentedImages, EpochBatchSampler
from ..data.sources import ImageSource, open_source, split_off, subsample
from ..errors import UsageError
from ..features.loop import run_model
from ..io import FolderKind, check_folder_out, write_folder_atomically
from ..modeling import FrancaConfig, FrancaModel, orthonormalize_rasa_weights, remove_position_directions
from ..modeling.image_processing_franca import IMAGENET_MEAN, IMAGENET_STD, make_image_processor
from .directions import DIRECTIONS_FILE, RasaDirections, patch_tokens
from .probe import evaluate_chain, grid_coordinates, probe_sample_problem
from .settings import RasaRunSettings, RasaSettings

# a model folder with RASA weights, or the directions of another backbone (both with rasa_report.json)
RASA_FOLDER = FolderKind("a model or RASA directions", ("rasa_report.json", "config.json"))
logger = logging.getLogger(__name__)


@dataclass
class RasaReport:
    """Held-out position-probe R² and raw/debiased cosine similarity: entry 0 for the raw tokens (no RASA at all),
    then one entry per trained step for the whole chain so far (a model's existing steps included)."""

    probe_r2: list[float] = field(default_factory=list)
    cosine_to_raw: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)


def augmentation(settings: RasaSettings) -> v2.Compose:
    """The RASA training views: random resized crop, colour jitter, grayscale, blur, ImageNet normalisation."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.RandomResizedCrop(
                settings.resolution,
                scale=settings.crop_scale,
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.RandomApply([v2.ColorJitter(0.32, 0.32, 0.32, 0.08)], p=settings.jitter_probability),
            v2.RandomGrayscale(p=settings.grayscale_probability),
            v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=settings.blur_probability),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def fit_position_predictor(
    batches,
    width: int,
    basis: torch.Tensor,
    epochs: int,
    lr: float,
    accelerator: Accelerator | None = None,
    progress: bool = False,
    orthogonal: bool = True,
) -> tuple[torch.Tensor, float]:
    """Train one RASA step: a bias-free Linear(width, 2) + sigmoid regressing grid coordinates by MSE.

    Args:
        batches: callable(epoch) -> iterable of (tokens (B, N, width) fp32 raw patch tokens, coords (N, 2)).
        basis: (S, 2, width) orthonormal directions of the steps already trained (applied to the tokens first).
        orthogonal: project the trained weight off every direction of the earlier steps. The tokens it sees have
            no component there, so its predictions do not change; but the official code keeps whatever the
            random init and Adam's per-coordinate updates left in those directions, and the per-step projections
            of the chain then write position back into them (on a planted signal the held-out probe R² stays at
            0.33 instead of reaching 0; tests/rasa/test_train.py). False reproduces the official step.
    Returns:
        the (2, width) weight and the mean training loss of the last epoch.
    """
    accelerator = accelerator or Accelerator(cpu=True)
    head = nn.Linear(width, 2, bias=False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    head, optimizer = accelerator.prepare(head, optimizer)
    per_epoch = len(batches) if hasattr(batches, "__len__") else sum(1 for _ in batches(0))
    iterations = epochs * max(1, per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
    last_losses = []
    for epoch in range(epochs):
        last_losses = []
        for tokens, coords in tqdm(
            batches(epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress
        ):
            tokens = remove_position_directions(tokens.to(accelerator.device), basis)
            predicted = torch.sigmoid(head(tokens))
            loss = F.mse_loss(predicted, coords.to(accelerator.device).expand_as(predicted))
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_losses.append(loss.detach())
    weight = accelerator.unwrap_model(head).weight.detach().float().cpu().clone()
    if orthogonal and len(basis):
        earlier = torch.linalg.qr(basis.reshape(-1, width).T.cpu().double())[0].float()  # (width, 2S) orthonormal
        weight = weight - (weight @ earlier) @ earlier.T
    loss = accelerator.reduce(torch.stack(last_losses).mean(), "mean").item() if last_losses else math.nan
    return weight, loss


class FrozenTokens:
    """Final-normed patch tokens of a frozen backbone for RASA training views (this process's shard)."""

    def __init__(self, model, source: ImageSource, settings: RasaSettings, accelerator: Accelerator, round_: int):
        self.model, self.settings, self.accelerator, self.round = model, settings, accelerator, round_
        self.images = AugmentedImages(source, augmentation(settings), settings.seed)
        self.sampler = EpochBatchSampler(
            len(source),
            min(settings.batch_size, len(source) // accelerator.num_processes),
            accelerator.process_index,
            accelerator.num_processes,
            settings.seed,
        )
        self.loader = DataLoader(self.images, batch_sampler=self.sampler, num_workers=settings.num_workers)

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    @torch.no_grad()
    def __call__(self, epoch: int):
        """Batches of (tokens, coords) of epoch `epoch` of this step; fresh augmentations for every step and epoch."""
        self.sampler.start(self.round * self.settings.epochs + epoch, 0)
        for pixels, _, _ in self.loader:
            with self.accelerator.autocast():
                tokens, grid = patch_tokens(self.model, pixels.to(self.accelerator.device))
            yield tokens.float(), grid_coordinates(*grid)


def held_out_tokens(model, source: ImageSource, settings: RasaSettings, accelerator: Accelerator) -> tuple:
    """Raw patch tokens (images, N, D) of every readable held-out image (each process embeds its share, all get the
    gathered result) at `settings.resolution` (resize + center crop), and their grid coordinates (N, 2)."""
    processor = make_image_processor(settings.resolution, settings.resolution)
    mine = []
    for positions, tokens in run_model(
        model,
        source,
        processor,
        lambda model, pixels: patch_tokens(model, pixels)[0].float().cpu(),
        positions=range(accelerator.process_index, len(source), accelerator.num_processes),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        progress=False,
    ):
        mine.extend(zip(positions, tokens, strict=True))
    gathered = sorted((item for part in gather_object([mine]) for item in part), key=lambda pair: pair[0])
    if len(gathered) < 4:
        raise UsageError(f"Only {len(gathered)} held-out images could be read; the probe needs at least 4.")
    rows = settings.resolution // model.config.patch_size
    return torch.stack([tokens for _, tokens in gathered]), grid_coordinates(rows, rows)


def _progress_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.rasa-progress.safetensors"


def train_rasa(
    model,
    train_source: ImageSource,
    held_out_source: ImageSource,
    settings: RasaSettings,
    out_dir: str | Path,
    accelerator: Accelerator | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, RasaReport]:
    """Learn `settings.steps` RASA steps on top of the model's existing chain (if any) and write the result.

    Returns the full (S, 2, D) weights and the report. Progress after each step goes to a hidden file beside
    `out_dir`; calling again with the same arguments resumes after the last finished step.
    """
    out_dir = Path(out_dir)
    accelerator = accelerator or Accelerator(cpu=not torch.accelerator.is_available())
    check_folder_out(out_dir, RASA_FOLDER, overwrite)
    settings = settings.for_model(model.config)
    model.eval().requires_grad_(False).to(accelerator.device)
    width = model.config.hidden_size
    existing = model.rasa.position_weights.detach().float().cpu() if getattr(model, "rasa", None) is not None else None
    weights = existing if existing is not None else torch.zeros(0, 2, width)

    tokens, coords = held_out_tokens(model, held_out_source, settings, accelerator)
    problem = probe_sample_problem(*tokens.shape)
    if problem and accelerator.is_main_process:
        logger.warning("The held-out probe R² is unreliable: %s; raise held_out_images.", problem)
    report = RasaReport()
    progress_file = _progress_path(out_dir)
    identity = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "width": width,
        "data": train_source.name,
        "images": len(train_source),
        "held_out": len(held_out_source),
    }
    training = {f.name: getattr(settings, f.name) for f in dataclasses.fields(RasaSettings) if f.name != "num_workers"}
    fingerprint = json.dumps({**identity, **training}, sort_keys=True)
    if progress_file.is_file():
        saved = RasaDirections.load(progress_file)
        if saved.metadata.get("settings") == fingerprint:
            weights, report = saved.weights, RasaReport(**saved.metadata["report"])
            accelerator.print(f"resuming RASA after {len(report.train_loss)} of {settings.steps} steps")
    if not report.probe_r2:  # entry 0: the raw tokens, before any RASA step (also a model's existing ones)
        r2, cosine = evaluate_chain(tokens, coords, None)
        report.probe_r2.append(r2)
        report.cosine_to_raw.append(cosine)
        accelerator.print(f"before: probe R² {r2:.3f}")
    for step in range(len(report.train_loss), settings.steps):
        batches = FrozenTokens(model, train_source, settings, accelerator, round_=step)
        basis = orthonormalize_rasa_weights(weights).to(accelerator.device)
        weight, loss = fit_position_predictor(
            batches,
            width,
            basis,
            settings.epochs,
            settings.lr,
            accelerator,
            progress=accelerator.is_main_process,
            orthogonal=settings.orthogonal,
        )
        weights = torch.cat([weights, weight[None]])
        r2, cosine = evaluate_chain(tokens, coords, weights)
        report.train_loss.append(loss)
        report.probe_r2.append(r2)
        report.cosine_to_raw.append(cosine)
        accelerator.print(
            f"step {step + 1}/{settings.steps}: train MSE {loss:.4f}, held-out probe R² {r2:.3f}, "
            f"cosine to raw {cosine:.3f}"
        )
        if accelerator.is_main_process:
            RasaDirections(weights, {"settings": fingerprint, "report": asdict(report)}).save(progress_file)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_rasa_output(model, weights, report, out_dir, overwrite, data=train_source.name)
        progress_file.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return weights, report


def write_rasa_output(
    model, weights: torch.Tensor, report: RasaReport, out_dir: Path, overwrite: bool, data: str = "unknown data"
) -> Path:
    """The output folder, atomically: for a FrancaModel a complete HF folder with the new chain as its RASA weights
    (its provenance says how many steps were fitted here, on `data`: the model card tells them from a converted
    head's), for other backbones `rasa_directions.safetensors`; in both, `rasa_report.json` (probe R² and cosine per
    step)."""
    metadata = {
        "backbone": type(model).__name__,
        "name_or_path": getattr(model.config, "_name_or_path", ""),
        "report": asdict(report),
    }

    def fill(folder: Path) -> None:
        if isinstance(model, FrancaModel):
            source = dict(model.config.source_checkpoint or {})
            added = weights.shape[0] - model.config.rasa_steps
            source["rasa_fitted_steps"] = source.get("rasa_fitted_steps", 0) + added
            source["rasa_fitted_on"] = data
            if isinstance(source.get("parity"), dict):  # the converter's debiased parity was the converted chain's
                source["parity"] = {k: v for k, v in source["parity"].items() if k != "patch_rasa"}
            new = {"rasa_steps": weights.shape[0], "source_checkpoint": source}
            config = FrancaConfig.from_dict({**model.config.to_dict(), **new})
            debiased = FrancaModel(config)
            state = {k: v for k, v in model.state_dict().items() if not k.startswith("rasa.")}
            state["rasa.position_weights"] = weights
            debiased.load_state_dict(state)
            fill_model_folder(folder, debiased.eval())
        else:
            RasaDirections(weights, metadata).save(folder / DIRECTIONS_FILE)
        (folder / "rasa_report.json").write_text(json.dumps(metadata, indent=2))

    return write_folder_atomically(out_dir, fill, RASA_FOLDER, overwrite)


def load_model_for_rasa(settings: RasaRunSettings, accelerator: Accelerator):
    """(the model, the settings resolved for it), its config checked before the weights load."""
    from transformers import AutoConfig

    from ..conversion.convert import resolve_model
    from ..features.extraction import load_pretrained_model

    with accelerator.main_process_first():  # one process downloads and converts a release, the others wait
        path = resolve_model(settings.model)
    resolved = settings.for_model(AutoConfig.from_pretrained(path))
    return load_pretrained_model(path), resolved


def rasa(settings: RasaRunSettings) -> RasaReport:
    """`franca-hf rasa` in one call: load the model, hold `held_out_images` of `data` out for the position probe,
    train `steps` directions on (at most `max_images` of) the rest and write `out`; the report of every process.
    Usage errors (`UsageError`) come before the weights load where the settings alone decide them."""
    check_folder_out(
        settings.out,
        RASA_FOLDER,
        settings.overwrite,
        inputs=(settings.model,),
        replace_with="overwrite=true to replace it",
    )
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    source = open_source(settings.data, settings.split, seed=settings.seed)  # a bad source is refused before the load
    if settings.held_out_images >= len(source):
        raise UsageError(
            f"held_out_images={settings.held_out_images} leaves no image to train on: data={settings.data} holds "
            f"{len(source)} images; set held_out_images below that (at least 4, the probe's two halves).",
            setting="held_out_images",
        )
    train, held_out = split_off(source, settings.held_out_images, seed=settings.seed)
    model, settings = load_model_for_rasa(settings, accelerator)
    train = subsample(train, settings.max_images, seed=settings.seed)
    return train_rasa(model, train, held_out, settings, settings.out, accelerator, settings.overwrite)[1]


__all__ = [
    "FrozenTokens",
    "RasaReport",
    "augmentation",
    "load_model_for_rasa",
    "rasa",
    "fit_position_predictor",
    "held_out_tokens",
    "train_rasa",
    "write_rasa_output",
]

"""RASA post-training: learn the directions that carry absolute patch position and remove them, on a frozen ViT.

    franca-hf rasa --model runs/demo/teacher --data demo --steps 8 --out runs/demo/teacher_rasa
    accelerate launch -m franca_hf.rasa.train --model facebook/dinov2-base --data /voc --steps 8 --out dinov2_rasa

Step t trains a fresh bias-free Linear(D, 2) + sigmoid on the currently debiased final-normed patch tokens to regress
the normalised grid coordinates (row / (rows - 1), col / (cols - 1)) with MSE (AdamW without weight decay, cosine lr
to 0), then freezes it into the chain. After every step a fresh linear probe, fitted on half of the held-out images
and scored on the other half, gives the R² of position still linearly decodable; the mean cosine similarity between
raw and debiased tokens shows how much else changed. Progress is saved after every step; a rerun resumes.

Output: for a FrancaModel, an HF folder whose `debiased_patch_tokens` use the whole chain; for DINOv2 models, a
`rasa_directions.safetensors` file to use with `franca_hf.rasa.RasaDirections`.
"""

import argparse
import json
import logging
import math
import sys
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

from ..conversion.export import fill_model_folder, make_image_processor
from ..data.sources import ImageSource, open_source, split_off, subsample
from ..features.loop import run_model
from ..io import write_folder_atomically
from ..modeling import FrancaConfig, FrancaModel, orthonormalize_rasa_weights, remove_position_directions
from ..training.augment import IMAGENET_MEAN, IMAGENET_STD
from ..training.data import AugmentedImages, EpochBatchSampler
from .directions import DIRECTIONS_FILE, RasaDirections, patch_tokens
from .probe import evaluate_chain, grid_coordinates

logger = logging.getLogger(__name__)


@dataclass
class RasaSettings:
    """Defaults follow the paper (Franca §2.3, see docs/rasa.md): 8 steps of 5 epochs, lr 2e-3 (the official config says 2e-4),
    batch 128, 518-px random resized crops (scale 0.25-1) with colour jitter, grayscale and blur."""

    steps: int = 8
    epochs: int = 5
    lr: float = 2e-3
    batch_size: int = 128
    resolution: int = 518
    crop_scale: tuple[float, float] = (0.25, 1.0)
    jitter_probability: float = 0.8  # colour jitter (0.32, 0.32, 0.32, 0.08)
    grayscale_probability: float = 0.2
    blur_probability: float = 0.5  # Gaussian blur, kernel 9, sigma 0.1-2
    held_out_images: int = 64
    max_images: int | None = None
    orthogonal: bool = True  # False: the official steps (see fit_position_predictor)
    num_workers: int = 2
    seed: int = 0

    def validate(self, patch_size: int) -> None:
        if self.steps < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("steps, epochs and batch_size must be >= 1.")
        if self.resolution % patch_size or self.resolution < 2 * patch_size:
            raise ValueError(f"resolution must be a multiple of the patch size ({patch_size}) covering >= 2 patches.")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}.")
        for name in ("jitter_probability", "grayscale_probability", "blur_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.held_out_images < 4:
            raise ValueError("held_out_images must be >= 4 (two halves for the position probe).")


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
            0.33 instead of reaching 0; tests/training/test_rasa_training.py). False reproduces the official step.
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
        raise ValueError(f"Only {len(gathered)} held-out images could be read; the probe needs at least 4.")
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
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    settings.validate(model.config.patch_size)
    model.eval().requires_grad_(False).to(accelerator.device)
    width = model.config.hidden_size
    existing = model.rasa.position_weights.detach().float().cpu() if getattr(model, "rasa", None) is not None else None
    weights = existing if existing is not None else torch.zeros(0, 2, width)

    tokens, coords = held_out_tokens(model, held_out_source, settings, accelerator)
    report = RasaReport()
    progress_file = _progress_path(out_dir)
    identity = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "width": width,
        "data": train_source.name,
        "images": len(train_source),
        "held_out": len(held_out_source),
    }
    fingerprint = json.dumps(
        {**identity, **{k: v for k, v in asdict(settings).items() if k != "num_workers"}}, sort_keys=True
    )
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
        write_rasa_output(model, weights, report, out_dir, overwrite)
        progress_file.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return weights, report


def write_rasa_output(model, weights: torch.Tensor, report: RasaReport, out_dir: Path, overwrite: bool) -> Path:
    """The output folder, atomically: for a FrancaModel a complete HF folder with the new chain as its RASA weights,
    for other backbones `rasa_directions.safetensors`; in both, `rasa_report.json` (probe R² and cosine per step)."""
    metadata = {
        "backbone": type(model).__name__,
        "name_or_path": getattr(model.config, "_name_or_path", ""),
        "report": asdict(report),
    }

    def fill(folder: Path) -> None:
        if isinstance(model, FrancaModel):
            config = FrancaConfig.from_dict({**model.config.to_dict(), "rasa_steps": weights.shape[0]})
            debiased = FrancaModel(config)
            state = {k: v for k, v in model.state_dict().items() if not k.startswith("rasa.")}
            state["rasa.position_weights"] = weights
            debiased.load_state_dict(state)
            fill_model_folder(folder, debiased.eval())
        else:
            RasaDirections(weights, metadata).save(folder / DIRECTIONS_FILE)
        (folder / "rasa_report.json").write_text(json.dumps(metadata, indent=2))

    return write_folder_atomically(out_dir, fill, overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="franca-hf rasa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = RasaSettings()
    parser.add_argument("--model", required=True, help="FrancaModel folder/Hub id/release, or a DINOv2 model")
    parser.add_argument("--data", required=True, help="'demo', an image folder, or hf:<dataset>")
    parser.add_argument("--split", default="train")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="RASA steps K (paper 8, code 9)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=defaults.crop_scale, metavar=("LOW", "HIGH"))
    parser.add_argument("--jitter-prob", type=float, default=defaults.jitter_probability, help="colour jitter")
    parser.add_argument("--grayscale-prob", type=float, default=defaults.grayscale_probability)
    parser.add_argument("--blur-prob", type=float, default=defaults.blur_probability)
    parser.add_argument("--held-out-images", type=int, default=defaults.held_out_images)
    parser.add_argument("--max-images", type=int, help="train on at most this many images")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--official-steps",
        action="store_true",
        help="keep each step's weight as trained (official); default: made orthogonal to earlier steps",
    )
    parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModel

    from ..conversion.convert import resolve_model

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = RasaSettings(
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        resolution=args.resolution,
        crop_scale=tuple(args.crop_scale),
        jitter_probability=args.jitter_prob,
        grayscale_probability=args.grayscale_prob,
        blur_probability=args.blur_prob,
        held_out_images=args.held_out_images,
        max_images=args.max_images,
        orthogonal=not args.official_steps,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    try:
        with accelerator.main_process_first():  # one process downloads and converts a release, the others wait
            model = AutoModel.from_pretrained(resolve_model(args.model))
        source = open_source(args.data, args.split, seed=args.seed)
        train, held_out = split_off(source, settings.held_out_images, seed=args.seed)
        train = subsample(train, settings.max_images, seed=args.seed)
        _, report = train_rasa(model, train, held_out, settings, args.out, accelerator, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"franca-hf rasa: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"probe_r2": report.probe_r2, "cosine_to_raw": report.cosine_to_raw}))
    return 0


__all__ = [
    "FrozenTokens",
    "RasaReport",
    "RasaSettings",
    "augmentation",
    "build_parser",
    "fit_position_predictor",
    "held_out_tokens",
    "main",
    "train_rasa",
    "write_rasa_output",
]


if __name__ == "__main__":
    sys.exit(main())

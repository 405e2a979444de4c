"""Official Franca checkpoint (+ RASA head) -> verified Hugging Face folder."""

import fcntl
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__
from ..io import MODEL_FOLDER, check_folder_out, write_folder_atomically
from ..modeling import FrancaConfig, FrancaModel, interpolate_position_table
from ..rasa.reference import official_rasa_chain
from .checkpoint import (
    CheckpointError,
    ConversionReport,
    convert_state_dict,
    extract_teacher,
    infer_config_values,
    load_rasa_weights,
    load_torch_file,
)
from .dtypes import check_weight_dtype
from .export import WEIGHT_DTYPES, fill_model_folder
from .hub import push
from .model_card import render_model_card
from .releases import (
    RELEASES,
    cache_dir,
    check_rasa_published,
    fetch_release_file,
    get_release,
    release_base_url,
    sha256_of,
)
from .settings import ConvertSettings

logger = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-4


@dataclass
class ConversionResult:
    """Where the folder went, what was converted, and the verification errors (max abs, fp32)."""

    folder: Path
    config: FrancaConfig
    report: ConversionReport
    parity: dict[str, float] = field(default_factory=dict)


def reference_forward(
    original: dict[str, torch.Tensor],
    pixel_values: torch.Tensor,
    config: FrancaConfig,
    rasa_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Evaluate the ORIGINAL state dict directly (functional ops on the official key names), as an independent
    check of the key mapping. Returns `cls` (B, D), `patch` (B, N, D) and, with RASA weights, `patch_rasa`
    computed with the official per-step chain."""
    dim, heads, patch = config.hidden_size, config.num_attention_heads, config.patch_size
    batch, _, height, width = pixel_values.shape
    x = F.conv2d(pixel_values, original["patch_embed.proj.weight"], original["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([original["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + interpolate_position_table(
        original["pos_embed"], height // patch, width // patch, config.interpolate_offset, config.interpolate_antialias
    )
    if "register_tokens" in original:
        x = torch.cat([x[:, :1], original["register_tokens"].expand(batch, -1, -1), x[:, 1:]], dim=1)
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in original.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            index_at = 2 if parts[2].isdigit() else 1
            blocks.setdefault(int(parts[index_at]), {})[".".join(parts[index_at + 1 :])] = value
    eps = config.layer_norm_eps
    for index in sorted(blocks):
        b = blocks[index]
        h = F.layer_norm(x, (dim,), b["norm1.weight"], b["norm1.bias"], eps)
        q, k, v = (
            F.linear(h, b["attn.qkv.weight"], b.get("attn.qkv.bias"))
            .reshape(batch, -1, 3, heads, dim // heads)
            .permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, dim)
        x = x + b.get("ls1.gamma", 1.0) * F.linear(attended, b["attn.proj.weight"], b.get("attn.proj.bias"))
        h = F.layer_norm(x, (dim,), b["norm2.weight"], b["norm2.bias"], eps)
        if "mlp.w12.weight" in b:
            gate, up = F.linear(h, b["mlp.w12.weight"], b.get("mlp.w12.bias")).chunk(2, dim=-1)
            h = F.linear(F.silu(gate) * up, b["mlp.w3.weight"], b.get("mlp.w3.bias"))
        else:
            h = F.linear(
                F.gelu(F.linear(h, b["mlp.fc1.weight"], b.get("mlp.fc1.bias"))),
                b["mlp.fc2.weight"],
                b.get("mlp.fc2.bias"),
            )
        x = x + b.get("ls2.gamma", 1.0) * h
    x = F.layer_norm(x, (dim,), original["norm.weight"], original["norm.bias"], eps)
    out = {"cls": x[:, 0], "patch": x[:, 1 + config.num_register_tokens :]}
    if rasa_weights is not None:
        out["patch_rasa"] = official_rasa_chain(out["patch"], rasa_weights)
    return out


def _verification_inputs(config: FrancaConfig) -> list[torch.Tensor]:
    """A square input at the native crop and a non-square one that forces position interpolation."""
    generator = torch.Generator().manual_seed(0)
    patch = config.patch_size
    side = config.image_size - config.image_size % patch
    return [
        torch.randn(1, config.num_channels, side, side, generator=generator),
        torch.randn(1, config.num_channels, 8 * patch, 12 * patch, generator=generator),
    ]


@torch.no_grad()
def measure_parity(model: FrancaModel, original: dict, rasa_weights: torch.Tensor | None) -> dict[str, float]:
    """Max abs error (fp32) of the converted model against `reference_forward` of the original weights."""
    errors: dict[str, float] = {}
    for pixels in _verification_inputs(model.config):
        expected = reference_forward(original, pixels, model.config, rasa_weights)
        out = model(pixels)
        got = {"cls": out.pooler_output, "patch": out.patch_tokens, "patch_rasa": out.debiased_patch_tokens}
        for name, value in expected.items():
            errors[name] = max(errors.get(name, 0.0), (got[name] - value).abs().max().item())
    return errors


def convert_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    rasa: str | Path | None = None,
    preset: str | None = None,
    num_heads: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    provenance: dict | None = None,
    verify: bool = True,
) -> ConversionResult:
    """Convert an official Franca checkpoint (and optionally its RASA head) into an HF folder.

    Every backbone key is accounted for (unknown or missing keys raise CheckpointError naming them; `dino_head.*`
    and `ibot_head.*` are skipped and reported). With `verify`, the converted model is compared with a direct
    evaluation of the original weights (fails above 1e-4) and the written folder is reloaded and compared
    bit-exactly before it is moved into place. The folder appears atomically and is never overwritten silently.
    """
    out_dir = Path(out_dir)
    check_weight_dtype(dtype)
    check_folder_out(out_dir, MODEL_FOLDER, overwrite, inputs=(checkpoint, rasa))
    original = extract_teacher(load_torch_file(checkpoint), source=str(checkpoint))
    values = infer_config_values(original, num_heads=num_heads, preset=preset)
    rasa_weights = load_rasa_weights(rasa, values["hidden_size"]) if rasa is not None else None
    source = dict(provenance or {})
    if "release" in source:  # downloaded by convert_release: anything else than the release is a broken download
        mismatches = RELEASES[source["release"]].architecture_mismatches(values)
        if mismatches:
            raise CheckpointError(
                f"{checkpoint} does not hold {source['release']}: {', '.join(mismatches)}. Delete it and download "
                "it again."
            )
    elif Path(checkpoint).stem in RELEASES:
        # named like an official file: its card gets the release's name, data and licence only if the weights fit
        release = RELEASES[Path(checkpoint).stem]
        mismatches = release.architecture_mismatches(values)
        if mismatches:
            logger.warning(
                "%s is named like the official release %s, but its weights are not that architecture (%s): it is "
                "converted as an ordinary checkpoint, without the release's name, data and licence.",
                checkpoint,
                release.stem,
                ", ".join(mismatches),
            )
        else:
            source.update(release=release.stem, tag=release.tag, dataset=release.dataset)
    source.update(file=Path(checkpoint).name, sha256=sha256_of(checkpoint), converter=f"franca_hf {__version__}")
    if rasa is not None:
        source.update(rasa_file=Path(rasa).name, rasa_sha256=sha256_of(rasa))
    config = FrancaConfig(
        **values, rasa_steps=0 if rasa_weights is None else rasa_weights.shape[0], source_checkpoint=source
    )
    with torch.device("meta"):
        model = FrancaModel(config)
    expected = set(model.state_dict()) - {"rasa.position_weights"}
    converted, report = convert_state_dict(original, expected)
    if rasa_weights is not None:
        converted["rasa.position_weights"] = rasa_weights
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True, assign=True)
    model.eval()
    report.config_values = values

    parity: dict[str, float] = {}
    if verify:
        parity = measure_parity(model, {k: v.float() for k, v in original.items()}, rasa_weights)
        worst = max(parity.values())
        if worst > PARITY_TOLERANCE:
            raise CheckpointError(f"Converted model differs from the original weights by {worst:.2e}: {parity}.")
        config.source_checkpoint["parity"] = parity
    model = model.to(WEIGHT_DTYPES[dtype])
    if model.rasa is not None:
        model.rasa.float()  # RASA directions stay fp32 (see FrancaPreTrainedModel._keep_in_fp32_modules_strict)

    def fill(folder: Path) -> None:
        fill_model_folder(folder, model, card_text=render_model_card(config))
        if verify:
            _check_reload(folder, model)

    write_folder_atomically(out_dir, fill, MODEL_FOLDER, overwrite, inputs=(checkpoint, rasa))
    return ConversionResult(folder=out_dir, config=config, report=report, parity=parity)


@torch.no_grad()
def _check_reload(folder: Path, model: FrancaModel) -> None:
    """The written folder must load with from_pretrained and give exactly the in-memory model's outputs."""
    reloaded = FrancaModel.from_pretrained(folder, dtype=model.dtype).eval()
    pixels = _verification_inputs(model.config)[1].to(model.dtype)
    first, second = model(pixels), reloaded(pixels)
    for name in ("last_hidden_state", "debiased_patch_tokens"):
        a, b = getattr(first, name), getattr(second, name)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            raise CheckpointError(f"The saved folder does not reproduce the converted model ({name} differs).")


@contextmanager
def cache_lock(path: Path):
    """An exclusive lock on the file `path` (created if missing), held for the block, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_release(
    name: str,
    out_dir: str | Path | None = None,
    with_rasa: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    base_url: str | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Download (once) and convert (once) an official release; returns the HF folder.

    Without `out_dir` the folder is kept in the cache (`<cache>/converted/<name>[_rasa]/<dtype>`) and reused by later
    calls (`overwrite=True` converts it again).
    """
    release = get_release(name)
    if with_rasa:
        check_rasa_published(release)
    converted = converted_release_folder(name, with_rasa, dtype, cache)
    target = Path(out_dir) if out_dir is not None else converted
    if out_dir is not None:
        check_folder_out(target, MODEL_FOLDER, overwrite)  # before a download of gigabytes
    # one process at a time per cache (those of a node, or all on a shared file system): a release is downloaded
    # and converted into the cache once; the others wait, then find it there
    with cache_lock(cache_dir(cache) / "locks" / f"{name}.lock"):
        if out_dir is None and (target / "config.json").is_file() and not overwrite:
            return target
        checkpoint = fetch_release_file(name, base_url=base_url, cache=cache, progress=progress)
        rasa = (
            fetch_release_file(name, rasa=True, base_url=base_url, cache=cache, progress=progress)
            if with_rasa
            else None
        )
        url = f"{release_base_url(base_url)}/{release.tag}/{name}" + (
            "_chunked.tar.gz.part_*" if release.chunked else ".pth"
        )
        provenance = {"release": name, "tag": release.tag, "dataset": release.dataset, "url": url}
        convert_checkpoint(
            checkpoint, target, rasa=rasa, dtype=dtype, overwrite=overwrite, provenance=provenance, verify=verify
        )
    return target


def converted_release_folder(
    name: str, with_rasa: bool, dtype: str = "float32", cache: str | Path | None = None
) -> Path:
    """Where `convert_release` keeps a release converted without `out_dir` (whether it is there yet or not)."""
    return cache_dir(cache) / "converted" / (f"{name}_rasa" if with_rasa else name) / dtype


def release_is_converted(name: str, cache: str | Path | None = None) -> bool:
    """Whether `resolve_model(name)` finds the release `name` converted in the cache (nothing to download)."""
    return (converted_release_folder(name, RELEASES[name].has_rasa, cache=cache) / "config.json").is_file()


def resolve_model(name_or_path: str, cache: str | Path | None = None, progress: bool = True) -> str:
    """A local folder or Hub id as is; a release name is converted (once, with its RASA head when published)."""
    if name_or_path in RELEASES:
        return str(
            convert_release(name_or_path, with_rasa=RELEASES[name_or_path].has_rasa, cache=cache, progress=progress)
        )
    return name_or_path


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` did: the folder (for a release without `out`, the cached one, converted now or before); the
    conversion of a local checkpoint (None for a release); the commit URL of the push (None without one)."""

    folder: Path
    conversion: ConversionResult | None
    commit_url: str | None


def convert(settings: ConvertSettings) -> ConvertResult:
    """`franca-hf convert`: a local checkpoint (`convert_checkpoint`) or a release (`convert_release`) to a verified
    folder, then pushed to the Hub with `settings.push`."""
    conversion, shared = None, {"dtype": settings.dtype, "overwrite": settings.overwrite, "verify": settings.verify}
    if settings.release is not None:
        folder = convert_release(
            settings.release,
            settings.out,
            settings.with_rasa,
            base_url=settings.base_url,
            cache=settings.cache_dir,
            **shared,
        )
    else:
        conversion = convert_checkpoint(
            settings.checkpoint, settings.out, settings.rasa, settings.preset, settings.num_heads, **shared
        )
        folder = conversion.folder
    commit_url = push(replace(settings.push, folder=str(folder))) if settings.push is not None else None
    return ConvertResult(folder, conversion, commit_url)

"""`franca-hf <command>`: a thin command line over the franca_hf Python API."""

import argparse
import json
import sys

import torch

from .conversion.releases import RELEASES, DownloadError

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, DownloadError)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _convert(args: argparse.Namespace) -> None:
    from .conversion.convert import convert_checkpoint, convert_release

    if (args.checkpoint is None) == (args.release is None):
        raise ValueError("Give either a CHECKPOINT file or --release NAME (not both).")
    if args.release is not None:
        if args.rasa is not None:
            raise ValueError("--rasa is for local checkpoints; with --release use --with-rasa.")
        folder = convert_release(
            args.release,
            out_dir=args.out,
            with_rasa=args.with_rasa,
            dtype=args.dtype,
            overwrite=args.overwrite,
            base_url=args.base_url,
            cache=args.cache_dir,
        )
        print(f"converted {args.release} -> {folder}")
        return
    if args.out is None:
        raise ValueError("--out DIR is required when converting a local checkpoint.")
    result = convert_checkpoint(
        args.checkpoint,
        args.out,
        rasa=args.rasa,
        preset=args.preset,
        num_heads=args.num_heads,
        dtype=args.dtype,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    print(f"converted {result.report.converted} tensors -> {result.folder}")
    if result.report.skipped_heads:
        print(f"skipped {len(result.report.skipped_heads)} training-head tensors (dino_head.*, ibot_head.*)")
    if result.parity:
        print("max abs error vs the original weights: " + json.dumps({k: f"{v:.2e}" for k, v in result.parity.items()}))


def _extract(args: argparse.Namespace) -> None:
    from .features import collect_image_paths, extract_features, load_model_and_processor, save_features

    model, processor = load_model_and_processor(args.model, device=args.device, dtype=TORCH_DTYPES[args.dtype])
    paths = collect_image_paths(args.images)
    result = extract_features(
        model,
        processor,
        paths,
        dim=args.dim,
        dense=args.dense,
        debiased=args.debiased,
        normalize=not args.no_normalize,
        batch_size=args.batch_size,
    )
    kind = ("dense_debiased" if args.debiased else "dense") if args.dense else "cls"
    save_features(
        result,
        args.out,
        metadata={
            "model": args.model,
            "dim": args.dim or model.config.hidden_size,
            "kind": kind,
            "normalized": not args.no_normalize and not args.dense,
        },
    )
    print(f"wrote {tuple(result.features.shape)} {kind} features of {len(result.paths)} images to {args.out}")
    for path, reason in result.failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)


def _releases(args: argparse.Namespace) -> None:
    for release in RELEASES.values():
        grid = f"{release.grid * 14}px" if release.grid else "?"
        print(
            f"{release.stem:34s} {release.tag}  {release.preset:10s} table {grid:6s} "
            f"RASA {'yes' if release.has_rasa else 'no '}  {release.dataset}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="franca-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an official checkpoint or release to an HF folder")
    convert.add_argument("checkpoint", nargs="?", help="official .pth file ({'teacher': state_dict})")
    convert.add_argument("--rasa", help="official RASA head .pth to include")
    convert.add_argument("--release", choices=list(RELEASES), metavar="NAME", help="official release to download")
    convert.add_argument("--with-rasa", action="store_true", help="with --release: include its RASA head")
    convert.add_argument("--out", help="output folder (default for --release: the cache)")
    convert.add_argument("--preset", help="vit_small | vit_base | vit_large | vit_giant2 (sets the head count)")
    convert.add_argument("--num-heads", type=int, help="attention heads (default: hidden size / 64)")
    convert.add_argument("--dtype", choices=list(TORCH_DTYPES), default="float32", help="dtype of the saved weights")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    convert.add_argument("--no-verify", action="store_true", help="skip the comparison with the original weights")
    convert.add_argument("--base-url", help="release mirror (default $FRANCA_HF_RELEASE_URL or GitHub)")
    convert.add_argument("--cache-dir", help="download/convert cache (default $FRANCA_HF_CACHE or ~/.cache/franca_hf)")
    convert.set_defaults(run=_convert)

    extract = commands.add_parser("extract", help="embed images into a safetensors file")
    extract.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    extract.add_argument("--model", required=True, help="HF folder, Hub id, or release name (converted on first use)")
    extract.add_argument("--dim", type=int, help="Matryoshka prefix length (default: full width)")
    extract.add_argument("--dense", action="store_true", help="patch feature maps (n, d, h, w) instead of CLS")
    extract.add_argument("--debiased", action="store_true", help="with --dense: remove RASA position directions")
    extract.add_argument("--no-normalize", action="store_true", help="keep CLS embeddings un-normalised")
    extract.add_argument("--out", required=True, help="output .safetensors file")
    extract.add_argument("--batch-size", type=int, default=32)
    extract.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    extract.add_argument("--dtype", choices=list(TORCH_DTYPES), default="float32")
    extract.set_defaults(run=_extract)

    releases = commands.add_parser("releases", help="list the official Franca releases")
    releases.set_defaults(run=_releases)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"franca-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

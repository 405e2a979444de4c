"""`franca-hf <command>`: a thin command line over the franca_hf Python API."""

import argparse
import importlib
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
        fixed = [flag for flag, value in (("--preset", args.preset), ("--num-heads", args.num_heads)) if value]
        if fixed:
            raise ValueError(f"{' and '.join(fixed)}: only for local checkpoints; a release fixes its architecture.")
        folder = convert_release(
            args.release,
            out_dir=args.out,
            with_rasa=args.with_rasa,
            dtype=args.dtype,
            overwrite=args.overwrite,
            base_url=args.base_url,
            cache=args.cache_dir,
            verify=not args.no_verify,
        )
        print(f"converted {args.release} -> {folder}")
        _maybe_push(args, folder)
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
    _maybe_push(args, result.folder)


def _maybe_push(args: argparse.Namespace, folder) -> None:
    if args.push_to_hub:
        from .conversion.hub import push_to_hub

        url = push_to_hub(folder, args.push_to_hub, private=args.private, endpoint=args.endpoint)
        print(f"pushed to {args.push_to_hub}: {url}")


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


def _knn(args: argparse.Namespace) -> None:
    from .conversion.export import make_image_processor
    from .features import load_model_and_processor
    from .training.data import open_source, subsample
    from .training.knn import embed_source, format_knn_table, knn_accuracy_by_dim

    model, processor = load_model_and_processor(args.model, device=args.device)
    width = model.config.hidden_size
    # any transformers backbone whose pooler_output is its CLS embedding (Franca, DINOv2, ...); prefixes of a model
    # not trained for them are a baseline for the Matryoshka ones
    dims = args.dims or getattr(model.config, "matryoshka_dims", None) or [width]
    if any(not 1 <= dim <= width for dim in dims):
        raise ValueError(f"--dims must lie in 1..{width} (the model's hidden size), got {dims}.")
    if args.crop_size:
        processor = make_image_processor(args.crop_size)
    splits = []
    for spec, split in ((args.train, args.train_split), (args.test, args.test_split)):
        source = subsample(open_source(spec, split), args.max_images)
        splits.append(embed_source(model, source, processor, batch_size=args.batch_size, progress=True))
    (train_x, train_y), (test_x, test_y) = splits
    accuracy = knn_accuracy_by_dim(train_x, train_y, test_x, test_y, dims, args.k, args.temperature)
    print(f"k-NN (k={args.k}, T={args.temperature}) of {args.model}: {len(train_x)} train / {len(test_x)} test images")
    print(format_knn_table(accuracy))


def _push(args: argparse.Namespace) -> None:
    from .conversion.hub import push_to_hub

    url = push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.message,
        base_model=args.base_model,
        endpoint=args.endpoint,
    )
    print(f"pushed {args.folder} to {args.repo_id}: {url}")


def _index(args: argparse.Namespace) -> None:
    from .features import load_model_and_processor
    from .retrieval import index_images

    model, processor = load_model_and_processor(args.model, device=args.device)
    index = index_images(model, processor, args.images, batch_size=args.batch_size)
    index.save(args.out)
    print(f"indexed {len(index)} images ({index.width} dims, nested {index.dims}) -> {args.out}")


def _search(args: argparse.Namespace) -> None:
    from .features import collect_image_paths, extract_features, load_model_and_processor
    from .retrieval import EmbeddingIndex, default_funnel

    index = EmbeddingIndex.load(args.index)
    model, processor = load_model_and_processor(args.model, device=args.device)
    if model.config.hidden_size != index.width:
        raise ValueError(
            f"The index holds {index.width}-dim embeddings; {args.model} makes "
            f"{model.config.hidden_size}-dim ones. Search with the model that built the index."
        )
    queries = extract_features(model, processor, collect_image_paths(args.queries), progress=False)
    if args.funnel:
        stages = default_funnel(index.dims, args.k)
        scores, indices = index.funnel_search(queries.features, k=args.k, stages=stages)
        how = "funnel " + " > ".join(f"{dim}:{size}" for dim, size in stages)
    else:
        scores, indices = index.search(queries.features, k=args.k, dim=args.dim)
        how = f"prefix dim {args.dim or index.width}"
    print(f"top-{args.k} of {len(index)} images ({how})")
    for query, row_scores, row_indices in zip(queries.paths, scores.tolist(), indices.tolist(), strict=True):
        print(query)
        for rank, (score, position) in enumerate(zip(row_scores, row_indices, strict=True), start=1):
            print(f"  {rank:2d}. {score:.4f}  {index.ids[position]}")


def _visualize(args: argparse.Namespace) -> None:
    from .conversion.export import make_image_processor
    from .features import load_model_and_processor
    from .visualize import visualize

    model, processor = load_model_and_processor(args.model, device=args.device)
    if args.size:
        processor = make_image_processor(args.size)
    r2 = visualize(model, processor, args.image, args.out)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in r2.items() if v is not None)
    print(
        f"wrote {args.out}"
        + (f"; position-probe R²: {scores}" if scores else " (no position-probe R²: grid too small)")
    )


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
    convert.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the folder to this Hub repo")
    convert.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    convert.add_argument("--endpoint", help="with --push-to-hub: Hub address (default $HF_ENDPOINT)")
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

    push = commands.add_parser("push", help="upload a Franca folder (with a fresh model card) to the Hub")
    push.add_argument("folder", help="folder written by convert, the trainer or rasa")
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--base-model", help="Hub id this model derives from (model card metadata)")
    push.add_argument("--endpoint", help="Hub address (default $HF_ENDPOINT or https://huggingface.co)")
    push.set_defaults(run=_push)

    index = commands.add_parser("index", help="embed images into a Matryoshka retrieval index")
    index.add_argument("images", nargs="+", help="image files or folders")
    index.add_argument("--model", required=True, help="HF folder, Hub id, or release name")
    index.add_argument("--out", required=True, help="index file (.safetensors)")
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    index.set_defaults(run=_index)

    search = commands.add_parser("search", help="find the images of an index closest to query images")
    search.add_argument("queries", nargs="+", help="query image files or folders")
    search.add_argument("--index", required=True, help="index file written by `franca-hf index`")
    search.add_argument("--model", required=True, help="the model that built the index")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--dim", type=int, help="search on this Matryoshka prefix (default: full width)")
    search.add_argument("--funnel", action="store_true", help="shortlist with a small prefix, rerank up to full width")
    search.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    search.set_defaults(run=_search)

    visualize = commands.add_parser(
        "visualize", help="the image and PCA maps of its patch features (raw, and RASA-debiased when available)"
    )
    visualize.add_argument("image", help="an image file")
    visualize.add_argument("--model", required=True, help="a Franca folder, Hub id or release")
    visualize.add_argument("--out", required=True, help="output PNG")
    visualize.add_argument("--size", type=int, help="resize + center-crop side in pixels (default: the model's)")
    visualize.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    visualize.set_defaults(run=_visualize)

    # These two have their own parsers (they also run as `accelerate launch -m franca_hf.training.<module>`).
    commands.add_parser(
        "pretrain",
        add_help=False,
        help="pretrain with Accelerate: --config demo|vitb14_in21k|... [section.key=value ...]",
    )
    commands.add_parser(
        "rasa", add_help=False, help="learn RASA position directions on a frozen Franca or DINOv2 backbone"
    )
    knn = commands.add_parser("knn", help="k-NN accuracy of any model's CLS features at every Matryoshka dim")
    knn.add_argument("--model", required=True, help="HF folder, Hub id, or release name")
    knn.add_argument("--train", required=True, help="labelled images: 'demo', a class-per-folder tree, or hf:<dataset>")
    knn.add_argument("--test", required=True, help="same syntax as --train")
    knn.add_argument("--train-split", default="train")
    knn.add_argument("--test-split", default="test")
    knn.add_argument(
        "--dims", type=int, nargs="+", help="CLS prefix widths to evaluate (default: the Matryoshka dims, else full)"
    )
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--max-images", type=int, help="evaluate on at most this many images per split")
    knn.add_argument("--crop-size", type=int, help="override the model's preprocessing crop (resize + center crop)")
    knn.add_argument("--batch-size", type=int, default=64)
    knn.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    knn.set_defaults(run=_knn)

    releases = commands.add_parser("releases", help="list the official Franca releases")
    releases.set_defaults(run=_releases)
    return parser


DELEGATED = {"pretrain": "franca_hf.training.pretrain", "rasa": "franca_hf.training.rasa"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"franca-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

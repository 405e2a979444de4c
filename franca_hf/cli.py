"""`franca-hf <command>`: a thin command line over the franca_hf Python API."""

# Parsing imports nothing heavy: torch and transformers load inside the command that runs (benchmarks/cli_startup.py).
import argparse
import functools
import importlib
import json
import sys

from .conversion.dtypes import WEIGHT_DTYPE_NAMES
from .conversion.releases import RELEASES
from .errors import USER_ERRORS, UsageError, report


def _convert(args: argparse.Namespace) -> None:
    from .conversion.convert import convert_checkpoint, convert_release

    if (args.checkpoint is None) == (args.release is None):
        raise UsageError("Give either a CHECKPOINT file or --release NAME (not both).")
    if args.release is not None:
        if args.rasa is not None:
            raise UsageError("--rasa is for local checkpoints; with --release use --with-rasa.")
        fixed = [flag for flag, value in (("--preset", args.preset), ("--num-heads", args.num_heads)) if value]
        if fixed:
            raise UsageError(f"{' and '.join(fixed)}: only for local checkpoints; a release fixes its architecture.")
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
        raise UsageError("--out DIR is required when converting a local checkpoint.")
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
    from .features.settings import ExtractSettings, ModelSpec

    settings = ExtractSettings(
        images=args.images,
        out=args.out,
        model=ModelSpec(args.model, args.device, args.dtype, args.int8),
        dim=args.dim,
        dense=args.dense,
        debiased=args.debiased,
        normalize=not args.no_normalize,
        features_dtype=args.features_dtype,
        split=args.split,
        image_column=args.image_column,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        shard_size=args.shard_size,
        allow_other_model=args.allow_other_model,
    )
    from .features import extract  # after the settings: a usage error answers without loading torch

    result = extract(settings)
    if result.is_main_process:
        index, record = result.index, result.index.settings
        resumed = f"; {result.already_done} were done before this run" if result.already_done else ""
        print(
            f"wrote {record.kind} features ({record.dim} channels, {record.dtype}) of {_count(index.rows, 'image')} "
            f"in {_count(len(index.shards), 'shard')} to {args.out}{resumed}"
        )
        if index.failed:
            print(
                f"skipped {_count(len(index.failed), 'unreadable image')} (listed in {args.out}/extraction.json):",
                file=sys.stderr,
            )
            for image_id, reason in index.failed[:20]:
                print(f"  {image_id}: {reason}", file=sys.stderr)


def _count(number: int, noun: str) -> str:
    """`1 image`, `2 images`."""
    return f"{number} {noun}{'s' * (number != 1)}"


def _load_model(args: argparse.Namespace, path: str | None = None):
    """The model and image processor the model flags (`_add_model_flags`) ask for (from `path` once resolved)."""
    from .features.settings import ModelSpec

    return ModelSpec(path or args.model, args.device, args.dtype, args.int8).load()


def _check_runtime_flags(args: argparse.Namespace) -> None:
    """The flags of `_add_runtime_flags`."""
    _require_at_least(1, batch_size=args.batch_size)
    _require_at_least(0, num_workers=args.num_workers)


def _require_at_least(minimum: int, **flags: int | None) -> None:
    """An error naming the flag (`shard_size` -> --shard-size) of the first value given below `minimum`."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}; got {value}.")


def _knn(args: argparse.Namespace) -> None:
    from .evaluation.settings import KnnSettings
    from .features.settings import ModelSpec

    settings = KnnSettings(
        model=ModelSpec(args.model, args.device, args.dtype, args.int8),
        train=args.train,
        test=args.test,
        train_split=args.train_split,
        test_split=args.test_split,
        dims=tuple(args.dims) if args.dims else None,
        k=args.k,
        temperature=args.temperature,
        max_images=args.max_images,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    from .evaluation.nearest_neighbours import knn  # after the settings: a usage error answers without loading torch

    result = knn(settings)
    int8 = " (int8)" if args.int8 else ""
    print(
        f"k-NN (k={args.k}, T={args.temperature}) of {args.model}{int8}: "
        f"{result.train_images} train / {result.test_images} test images"
    )
    print(result.table())


def _eval(args: argparse.Namespace) -> None:
    from .evaluation.settings import LinearSettings, SegmentationSettings
    from .features.settings import ModelSpec

    common = {
        name: getattr(args, name)
        for name in ("train", "test", "train_split", "test_split", "max_images", "epochs", "batch_size")
    }
    common["model"] = ModelSpec(args.model, args.device)
    if args.protocol == "seg":
        settings = SegmentationSettings(
            **common,
            image_column=args.image_column,
            mask_column=args.mask_column,
            num_classes=args.num_classes,
            image_size=args.image_size,
            clusters=tuple(args.clusters) if args.clusters else None,
            show=args.show,
            figure=args.figure,
        )
        from .evaluation.segmentation import format_segmentation_result, run_segmentation_evaluation

        print(format_segmentation_result(run_segmentation_evaluation(settings)))
        if args.show:
            print(f"wrote {args.figure}")
        return
    settings = LinearSettings(
        **common, val=args.val, val_split=args.val_split, features_dir=args.features_dir, logistic=args.logistic
    )
    from .evaluation.linear import format_linear_report, run_linear_evaluation

    print(format_linear_report(run_linear_evaluation(settings)))


def _fit_pca(args: argparse.Namespace) -> None:
    from .features.settings import ModelSpec
    from .matryoshka_settings import FitPcaSettings

    settings = FitPcaSettings(
        model=ModelSpec(args.model, args.device, args.dtype, args.int8),
        data=args.data,
        out=args.out,
        max_images=args.max_images,
        split=args.split,
        image_column=args.image_column,
        overwrite_basis=args.overwrite_basis,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    from .matryoshka import fit_pca  # after the settings: a usage error answers without loading torch

    result = fit_pca(settings)
    print(f"fitted a PCA basis on {result.images} images of {result.data} -> {result.folder}")
    if result.skipped:
        print(f"skipped {result.skipped} unreadable images", file=sys.stderr)
    print(result.explained_variance_table())


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
    _check_runtime_flags(args)
    from .retrieval import IndexSettings, build_index, index_images, is_features_folder

    knobs = ("ann", "hnsw_m", "ef_search", "nlist", "nprobe")  # the flags that are IndexSettings fields
    chosen = {key: getattr(args, key) for key in knobs if getattr(args, key) is not None}
    settings = IndexSettings(**chosen) if chosen or not args.append else None
    if len(args.images) == 1 and is_features_folder(args.images[0]):
        model = _load_model(args)[0] if args.model else None
        report = build_index(
            args.images[0], args.out, settings, args.append, args.overwrite, model, args.allow_other_model
        )
        index, how = report.index, f"from the features in {args.images[0]}"
        if report.appended:
            how = f"appended {report.added} from the features in {args.images[0]}"
    else:
        if args.model is None:
            raise UsageError("--model is required to embed images (it is not needed for a `franca-hf extract` folder).")
        if args.append:
            raise UsageError("--append adds the new shards of a `franca-hf extract` folder; extract the images first.")
        model, processor = _load_model(args)
        index = index_images(
            model, processor, args.images, args.batch_size, num_workers=args.num_workers, settings=settings
        )
        index.save(args.out)
        how = f"with {args.model}"
    print(f"indexed {len(index)} images ({index.describe()}) {how} -> {args.out}")


def _search(args: argparse.Namespace) -> None:
    _require_at_least(1, k=args.k)
    from .retrieval import default_funnel, load_index

    index = load_index(args.index, device=args.device or "cpu")
    if args.dim is not None:
        index.check_dim(args.dim)
    model, processor = _load_model(args)
    k = min(args.k, len(index))
    if k < args.k:
        print(
            f"note: the index holds {len(index)} images, fewer than --k {args.k}; showing all of them.", file=sys.stderr
        )
    funnel = True if args.funnel else False if args.exact else None
    paths, scores, indices = index.search_images(
        args.queries, model, processor, k, args.dim, funnel, args.allow_other_model
    )
    dim = args.dim or index.width
    if index.settings.ann != "none" if funnel is None else funnel:
        stages = default_funnel([d for d in index.dims if d <= dim], k)
        how = f"funnel {' > '.join(f'{d}:{size}' for d, size in stages)}, first stage {index.settings.ann}"
    else:
        how = f"exact, dim {dim}, cut in the model's basis"
    print(f"top-{k} of {len(index)} images ({how})")
    for query, row_scores, row_indices in zip(paths, scores.tolist(), indices.tolist(), strict=True):
        print(query)
        for rank, (score, position) in enumerate(zip(row_scores, row_indices, strict=True), start=1):
            print(f"  {rank:2d}. {score:.4f}  {index.ids[position]}")


def _visualize(args: argparse.Namespace) -> None:
    from .features.settings import ModelSpec
    from .visualize_settings import VisualizeSettings

    # a bad image file is refused here, before torch and the model load
    settings = VisualizeSettings(
        args.image, args.out, ModelSpec(args.model, args.device, args.dtype, args.int8), args.size
    )
    from .visualize import visualize_image

    result = visualize_image(settings)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.r2.items() if v is not None)
    print(
        f"wrote {result.out}"
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
    convert.add_argument("--dtype", choices=WEIGHT_DTYPE_NAMES, default="float32", help="dtype of the saved weights")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    convert.add_argument("--no-verify", action="store_true", help="skip the comparison with the original weights")
    convert.add_argument("--base-url", help="release mirror (default $FRANCA_HF_RELEASE_URL or GitHub)")
    convert.add_argument("--cache-dir", help="download/convert cache (default $FRANCA_HF_CACHE or ~/.cache/franca_hf)")
    convert.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the folder to this Hub repo")
    convert.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    convert.add_argument("--endpoint", help="with --push-to-hub: Hub address (default $HF_ENDPOINT)")
    convert.set_defaults(run=_convert)

    extract = commands.add_parser(
        "extract",
        help="embed images into resumable Parquet shards (datasets.load_dataset opens the folder)",
        description="Embed images into a folder of Parquet shards with an index of the images done; rerun the same "
        "command to resume after an interruption. Several processes: "
        "accelerate launch --multi_gpu --num_processes N -m franca_hf.cli extract ... (see docs/extraction.md).",
    )
    extract.add_argument("images", nargs="+", help="image files or folders (searched recursively), or one hf:<dataset>")
    _add_model_flags(extract)
    extract.add_argument("--out", required=True, help="output folder (created; an existing one is resumed)")
    extract.add_argument(
        "--dim", type=int, help="Matryoshka dim, cut in the model's basis (prefix or fitted PCA; default: full width)"
    )
    extract.add_argument("--dense", action="store_true", help="patch feature maps (d, h, w) instead of CLS")
    extract.add_argument("--debiased", action="store_true", help="with --dense: remove RASA position directions")
    extract.add_argument("--no-normalize", action="store_true", help="keep CLS embeddings un-normalised")
    extract.add_argument(
        "--features-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="stored float type (dense: float16 halves the size)",
    )
    extract.add_argument("--split", default="train", help="with hf:<dataset>: the split to read")
    extract.add_argument("--image-column", help="with hf:<dataset>: the image column (default: the first Image one)")
    extract.add_argument("--shard-size", type=int, help="rows per shard (default: up to 1024, at most 256 MiB)")
    extract.add_argument(
        "--allow-other-model",
        action="store_true",
        help="resume a folder with a model whose fingerprint differs from the one that began it",
    )
    _add_runtime_flags(extract, batch_size=32)
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

    index = commands.add_parser("index", help="a Matryoshka retrieval index of images or of an extract folder")
    index.add_argument("images", nargs="+", help="image files or folders, or one folder written by `franca-hf extract`")
    _add_model_flags(
        index,
        required=False,
        help="HF folder, Hub id, or release name (for an extract folder: optional, checked against the features)",
    )
    index.add_argument("--out", required=True, help="index folder")
    index.add_argument(
        "--ann", choices=["auto", "none", "hnsw", "ivfpq"], help="first stage: exact, HNSW graph, IVF-PQ (default auto)"
    )
    index.add_argument("--hnsw-m", type=int, help="HNSW neighbours per node (default 32)")
    index.add_argument("--ef-search", type=int, help="HNSW search list (default 64; at least the shortlist)")
    index.add_argument("--nlist", type=int, help="IVF cells (default: a power of two near 4 sqrt(rows))")
    index.add_argument("--nprobe", type=int, help="IVF cells visited per query (default 64)")
    index.add_argument("--append", action="store_true", help="add the extract folder's new shards to the index --out")
    index.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    index.add_argument("--allow-other-model", action="store_true", help="skip the model fingerprint check")
    _add_runtime_flags(index, batch_size=32)
    index.set_defaults(run=_index)

    search = commands.add_parser("search", help="find the images of an index closest to query images")
    search.add_argument("queries", nargs="+", help="query image files or folders")
    search.add_argument(
        "--index", required=True, help="index folder of `franca-hf index`, or a `franca-hf extract` folder"
    )
    _add_model_flags(search, help="the model that built the index")
    search.add_argument("--k", type=int, default=10, help="results per query (at most the index size)")
    search.add_argument(
        "--dim", type=int, help="search at this Matryoshka dim, cut in the model's basis (default: full width)"
    )
    how = search.add_mutually_exclusive_group()
    how.add_argument(
        "--funnel", action="store_true", help="shortlist at the smallest dim, rerank up to --dim (default with ANN)"
    )
    how.add_argument("--exact", action="store_true", help="exact search at --dim (default without ANN)")
    search.add_argument("--allow-other-model", action="store_true", help="skip the model fingerprint check")
    search.set_defaults(run=_search)

    visualize = commands.add_parser(
        "visualize", help="the image and PCA maps of its patch features (raw, and RASA-debiased when available)"
    )
    visualize.add_argument("image", help="an image file")
    _add_model_flags(visualize, help="a Franca folder, Hub id or release")
    visualize.add_argument("--out", required=True, help="output PNG")
    visualize.add_argument("--size", type=int, help="resize + center-crop side in pixels (default: the model's)")
    visualize.set_defaults(run=_visualize)

    # Their arguments are defined by their modules, which also run as `accelerate launch -m <module>`.
    for name, arguments_module, trainer_module, help_text in TRAINING_COMMANDS:
        command = commands.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments = importlib.import_module(arguments_module)
        command.description = arguments.DESCRIPTION
        arguments.add_arguments(command)
        command.set_defaults(run=functools.partial(_train, trainer_module))
    knn = commands.add_parser("knn", help="k-NN accuracy of any model's CLS features at every Matryoshka dim")
    _add_model_flags(knn)
    knn.add_argument("--train", required=True, help="labelled images: 'demo', a class-per-folder tree, or hf:<dataset>")
    knn.add_argument("--test", required=True, help="same syntax as --train")
    knn.add_argument("--train-split", default="train")
    knn.add_argument("--test-split", default="test")
    knn.add_argument(
        "--dims",
        type=int,
        nargs="+",
        help="CLS widths to evaluate, cut in the model's basis (default: the Matryoshka dims, else full)",
    )
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--max-images", type=int, help="evaluate on at most this many images per split")
    knn.add_argument("--crop-size", type=int, help="override the model's preprocessing crop (resize + center crop)")
    _add_runtime_flags(knn, batch_size=64)
    knn.set_defaults(run=_knn)

    evaluate = commands.add_parser("eval", help="linear probing and dense (segmentation) evaluation at every dim")
    protocols = evaluate.add_subparsers(dest="protocol", required=True)
    linear = protocols.add_parser("linear", help="the official linear protocol (or --logistic) per Matryoshka dim")
    segmentation = protocols.add_parser("seg", help="linear segmentation and clustering mIoU, raw vs RASA, per dim")
    for parser_ in (linear, segmentation):
        parser_.add_argument("--model", required=True, help="model folder, Hub id or release name")
        parser_.add_argument("--train", required=True, help="'demo', a folder, or hf:<dataset>")
        parser_.add_argument("--test", required=True, help="same syntax as --train")
        parser_.add_argument("--train-split", default="train")
        parser_.add_argument("--test-split", default="test")
        parser_.add_argument("--max-images", type=int, help="at most this many images per split")
        parser_.add_argument("--epochs", type=int, default=10)
        parser_.add_argument("--device", help="default: the accelerator if there is one, else cpu")
        parser_.set_defaults(run=_eval)
    linear.add_argument("--val", help="labelled images to choose the classifier on (default: 10%% of --train)")
    linear.add_argument("--val-split", default="validation")
    linear.add_argument("--features-dir", help="keep the probe inputs here as extract shards (reused, resumable)")
    linear.add_argument("--logistic", action="store_true", help="the log-regression variant (official C grid)")
    linear.add_argument("--batch-size", type=int, default=128, help="the linear classifiers' batch (lrs scale by it)")
    segmentation.add_argument("--batch-size", type=int, default=32, help="images per step of the segmentation heads")
    segmentation.add_argument("--image-column", help="the dataset's image column (default: its first Image column)")
    segmentation.add_argument("--mask-column", help="the dataset's mask column (default: found by name or type)")
    segmentation.add_argument("--num-classes", type=int, help="default: the source's classes or max mask value + 1")
    segmentation.add_argument("--image-size", type=int, help="square side images are resized to (default: model's)")
    segmentation.add_argument("--clusters", type=int, nargs="+", help="K-means sizes (default: C and 3C)")
    segmentation.add_argument("--show", type=int, default=0, help="figure of this many test images")
    segmentation.add_argument("--figure", default="segmentation.png", help="where --show writes its PNG")

    fit_pca = commands.add_parser(
        "fit-pca",
        help="fit a PCA truncation basis for Matryoshka embeddings, written with the model as a new folder",
        description="Stream images through a Franca model, fit the principal directions of its CLS embeddings and "
        "patch tokens (float64 mean and covariance, memory independent of the number of images), and write a new "
        "folder whose Matryoshka embeddings are cut in that basis: normalise(((z - mean) R)[:m]). For checkpoints "
        "whose prefixes were not trained as embeddings (the released weights; `project`-layout teachers); see "
        "docs/matryoshka.md.",
    )
    _add_model_flags(fit_pca, help="Franca folder, Hub id, or release name (converted on first use)")
    fit_pca.add_argument(
        "--data", required=True, help="'demo', an image folder (searched recursively), or hf:<dataset>"
    )
    fit_pca.add_argument("--out", required=True, help="output folder (a complete model folder)")
    fit_pca.add_argument("--max-images", type=int, help="fit on at most this many images (a fixed random subset)")
    fit_pca.add_argument("--split", default="train", help="with demo or hf:<dataset>: the split to read")
    fit_pca.add_argument("--image-column", help="with hf:<dataset>: the image column (default: the first Image one)")
    fit_pca.add_argument("--overwrite-basis", action="store_true", help="refit a model that already has a basis")
    fit_pca.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    _add_runtime_flags(fit_pca, batch_size=32)
    fit_pca.set_defaults(run=_fit_pca)

    releases = commands.add_parser("releases", help="list the official Franca releases")
    releases.set_defaults(run=_releases)
    return parser


def _add_model_flags(
    parser: argparse.ArgumentParser,
    required: bool = True,
    help: str = "HF folder, Hub id, or release name (converted on first use)",  # noqa: A002 (argparse's name)
) -> None:
    """How every command that runs a model loads it: --model, --device, --dtype, --int8."""
    parser.add_argument("--model", required=required, help=help)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: this process's GPU when there is one)")
    parser.add_argument("--dtype", choices=WEIGHT_DTYPE_NAMES, default="float32", help="the model's dtype")
    parser.add_argument("--int8", action="store_true", help="CPU: int8 dynamically quantised Linear layers (faster)")


def _add_runtime_flags(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument(
        "--num-workers", type=int, help="DataLoader workers decoding images (default: CPU cores - 1, at most 8)"
    )


# (command, arguments module, trainer module, help): commands whose DESCRIPTION and add_arguments() live in a module
# cheap to import, and whose run() lives in the trainer module (multi-process: `accelerate launch -m franca_hf.cli COMMAND`)
TRAINING_COMMANDS = (
    (
        "pretrain",
        "franca_hf.training.pretrain_arguments",
        "franca_hf.training.pretrain",
        "pretrain with Accelerate: --config demo|vitb14_in21k|... [section.key=value ...]",
    ),
    (
        "rasa",
        "franca_hf.rasa.settings",
        "franca_hf.rasa.train",
        "learn RASA position directions on a frozen Franca or DINOv2 backbone",
    ),
)


def _train(trainer_module: str, args: argparse.Namespace) -> int:
    return importlib.import_module(trainer_module).run(args)


def _with_flag(error: Exception, parser: argparse.ArgumentParser, command: str) -> str:
    """The message of a usage error, followed by the flag of `command` that sets the setting it names, if one does:
    library messages name settings (`dim=48 ...`), the command line spells them as flags (`(--dim)`)."""
    setting = getattr(error, "setting", None)
    if setting is None:
        return str(error)
    # argparse has no public lookup of a subcommand's actions by dest
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = subcommands.choices[command]._actions
    flags = [action.option_strings[0] for action in actions if action.dest == setting and action.option_strings]
    return f"{error} ({flags[0]})" if flags else str(error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as error:
        report(args.command, _with_flag(error, parser, args.command))
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`franca-hf <command>`: a thin command line over the franca_hf Python API; each command calls one library function
and prints what it returns."""

# Parsing imports nothing heavy: torch and transformers load inside the command that runs (benchmarks/cli_startup.py).
import argparse
import dataclasses
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

from .conversion.dtypes import WEIGHT_DTYPE_NAMES
from .conversion.releases import RELEASES
from .errors import USER_ERRORS, RunStoppedError, report
from .features.settings import FEATURE_DTYPES
from .rasa.settings import RasaRunSettings
from .retrieval_settings import ANN_KINDS

GRAMMAR = (
    "Training commands (pretrain, rasa) take a recipe (--config) and key=value settings; every other command takes "
    "--flags."
)


def _convert(args: argparse.Namespace) -> None:
    from .conversion.settings import ConvertSettings, PushSettings

    push = PushSettings(args.push_to_hub, private=args.private, endpoint=args.endpoint) if args.push_to_hub else None
    settings = _settings(ConvertSettings, args, verify=not args.no_verify, push=push)
    from .conversion.convert import convert

    result = convert(settings)
    if result.conversion is None:
        print(f"converted {args.release} -> {result.folder}")
    else:
        report, parity = result.conversion.report, result.conversion.parity
        print(f"converted {report.converted} tensors -> {result.folder}")
        if report.skipped_heads:
            print(f"skipped {len(report.skipped_heads)} training-head tensors (dino_head.*, ibot_head.*)")
        if parity:
            print("max abs error vs the original weights: " + json.dumps({k: f"{v:.2e}" for k, v in parity.items()}))
    if result.commit_url is not None:
        print(f"pushed to {args.push_to_hub}: {result.commit_url}")


def _extract(args: argparse.Namespace) -> None:
    from .features.settings import ExtractSettings

    settings = _settings(ExtractSettings, args, model=_model_spec(args), normalize=not args.no_normalize)
    from .features import extract  # after the settings: a usage error answers without loading torch

    result = extract(settings)
    if result.is_main_process:
        index, record = result.index, result.index.settings
        what, held = f"{record.kind} features ({record.dim} channels, {record.dtype})", _count(index.rows, "image")
        shards = _count(len(index.shards), "shard")
        if result.already_done:
            new = _count(index.rows - result.already_done, "new image")
            summary = f"wrote {what} of {new} to {args.out}, which holds {held} in {shards} "
            summary += f"({result.already_done} were done before this run)"
        else:
            summary = f"wrote {what} of {held} in {shards} to {args.out}"
        if index.failed:
            summary += f"; {_count(len(index.failed), 'unreadable image')} listed in its extraction.json"
        print(summary)
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


def _model_spec(args: argparse.Namespace):
    """The model the model flags (`_add_model_flags`) name, and how to run it."""
    from .features.settings import ModelSpec

    return ModelSpec(args.model, args.device, args.dtype, args.int8)


def _settings(settings_class, args: argparse.Namespace, **given):
    """`settings_class` from the parsed flags whose dest is one of its fields (flags are named after settings),
    with `given` for the fields spelled otherwise on the command line (`--no-normalize`, the model flags, ...)."""
    fields = {field.name for field in dataclasses.fields(settings_class)} - given.keys()
    return settings_class(**{name: getattr(args, name) for name in fields if hasattr(args, name)}, **given)


def _knn(args: argparse.Namespace) -> None:
    from .evaluation.settings import KnnSettings

    settings = _settings(KnnSettings, args, model=_model_spec(args), dims=tuple(args.dims) if args.dims else None)
    from .evaluation.nearest_neighbours import knn  # after the settings: a usage error answers without loading torch

    result = knn(settings)
    if result.k < args.k:
        print(
            f"note: --k {args.k} is more than the {result.train_images} train images; every train image votes "
            f"(k={result.k}).",
            file=sys.stderr,
        )
    int8 = " (int8)" if args.int8 else ""
    print(
        f"k-NN (k={result.k}, T={args.temperature}) of {args.model}{int8}: "
        f"{result.train_images} train / {result.test_images} test images"
    )
    print(result.table())


def _eval(args: argparse.Namespace) -> None:
    from .evaluation.settings import LinearSettings, SegmentationSettings
    from .features.settings import ModelSpec

    model = ModelSpec(args.model, args.device)
    if args.protocol == "seg":
        clusters = tuple(args.clusters) if args.clusters else None
        settings = _settings(SegmentationSettings, args, model=model, clusters=clusters)
        from .evaluation.segmentation import format_segmentation_result, run_segmentation_evaluation

        print(format_segmentation_result(run_segmentation_evaluation(settings)))
        if args.show:
            print(f"wrote {settings.figure_path}")
        return
    settings = _settings(LinearSettings, args, model=model)
    from .evaluation.linear import format_linear_report, run_linear_evaluation

    print(format_linear_report(run_linear_evaluation(settings)))


def _fit_pca(args: argparse.Namespace) -> None:
    from .matryoshka_settings import FitPcaSettings

    settings = _settings(FitPcaSettings, args, model=_model_spec(args))
    from .matryoshka import fit_pca  # after the settings: a usage error answers without loading torch

    result = fit_pca(settings)
    print(f"fitted a PCA basis on {result.images} images of {result.data} -> {result.folder}")
    if result.skipped:
        print(f"skipped {result.skipped} unreadable images", file=sys.stderr)
    print(result.explained_variance_table())


def _push(args: argparse.Namespace) -> None:
    from .conversion.settings import PushSettings

    settings = _settings(PushSettings, args, commit_message=args.message)
    from .conversion.hub import push

    print(f"pushed {args.folder} to {args.repo_id}: {push(settings)}")


def _index(args: argparse.Namespace) -> None:
    from .retrieval_settings import AnnSettings, IndexSettings

    knobs = {field.name: getattr(args, field.name) for field in dataclasses.fields(AnnSettings)}
    chosen = {key: value for key, value in knobs.items() if value is not None}
    model = _model_spec(args) if args.model else None
    settings = _settings(IndexSettings, args, model=model, ann=AnnSettings(**chosen) if chosen else None)
    from .retrieval import index

    result = index(settings)
    how = f"appended {result.added} {result.source}" if result.appended else result.source
    print(f"indexed {len(result.index)} images ({result.index.describe()}) {how} -> {args.out}")
    if result.failed:
        print(f"skipped {_count(len(result.failed), 'unreadable image')} (each named above)", file=sys.stderr)


def _search(args: argparse.Namespace) -> None:
    from .retrieval_settings import SearchSettings

    funnel = True if args.funnel else False if args.exact else None
    settings = _settings(SearchSettings, args, model=_model_spec(args), funnel=funnel)
    from .retrieval import search

    result = search(settings)
    if result.clamped:
        print(
            f"note: the index holds {result.index_size} images, fewer than --k {args.k}; showing all of them.",
            file=sys.stderr,
        )
    print(f"top-{result.k} of {result.index_size} images ({result.how})")
    for query, row_scores, row_ids in zip(result.queries, result.scores.tolist(), result.ids, strict=True):
        print(query)
        for rank, (score, id_) in enumerate(zip(row_scores[: len(row_ids)], row_ids, strict=True), start=1):
            print(f"  {rank:2d}. {score:.4f}  {id_}")
        if len(row_ids) < result.k:
            print(
                f"  (only {len(row_ids)}: the index's approximate first stage found no more; --exact reads every row)"
            )


def _visualize(args: argparse.Namespace) -> None:
    from .visualize_settings import VisualizeSettings

    # a bad image file is refused here, before torch and the model load
    settings = _settings(VisualizeSettings, args, model=_model_spec(args))
    from .visualize import visualize_image

    result = visualize_image(settings)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.r2.items() if v is not None)
    print(
        f"wrote {result.out}"
        + (f"; position-probe R²: {scores}" if scores else " (no position-probe R²: grid too small)")
    )


def _releases(args: argparse.Namespace) -> None:
    from .conversion.releases import release_table

    print(release_table())


def _pretrain(args: argparse.Namespace) -> None:
    from .training.config import load_config
    from .training.pretrain import train

    _log_to_stderr(franca_hf_level=logging.INFO)
    train(load_config(args.config, args.overrides), config_name=Path(args.config).stem)


def _rasa(args: argparse.Namespace) -> None:
    from .settings import load_settings

    # a bad setting is answered before torch loads
    settings = load_settings(RasaRunSettings, args.config, args.settings)
    from .rasa.train import rasa

    _log_to_stderr(franca_hf_level=logging.WARNING)
    report = rasa(settings)
    if _is_main_process():
        print(json.dumps({"probe_r2": report.probe_r2, "cosine_to_raw": report.cosine_to_raw}))


def _log_to_stderr(franca_hf_level: int) -> None:
    """Training commands log progress notes (franca_hf's at `franca_hf_level`) and every library's warnings."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("franca_hf").setLevel(franca_hf_level)


def _is_main_process() -> bool:
    """True in a single process and in the process of global rank 0 under a launcher (`accelerate launch`)."""
    return int(os.environ.get("RANK", "0")) == 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="franca-hf", description=__doc__, epilog=GRAMMAR)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (
        _add_convert,
        _add_extract,
        _add_push,
        _add_index,
        _add_search,
        _add_visualize,
        _add_pretrain,
        _add_rasa,
        _add_knn,
        _add_eval,
        _add_fit_pca,
        _add_releases,
    ):
        add_command(commands)
    return parser


def _add_convert(commands: argparse._SubParsersAction) -> None:
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


def _add_extract(commands: argparse._SubParsersAction) -> None:
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
        choices=FEATURE_DTYPES,
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


def _add_push(commands: argparse._SubParsersAction) -> None:
    push = commands.add_parser("push", help="upload a Franca folder (with a fresh model card) to the Hub")
    push.add_argument("folder", help="folder written by convert, the trainer or rasa")
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--base-model", help="Hub id this model derives from (model card metadata)")
    push.add_argument("--endpoint", help="Hub address (default $HF_ENDPOINT or https://huggingface.co)")
    push.set_defaults(run=_push)


def _add_index(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser("index", help="a Matryoshka retrieval index of images or of an extract folder")
    index.add_argument("images", nargs="+", help="image files or folders, or one folder written by `franca-hf extract`")
    _add_model_flags(
        index,
        required=False,
        help="HF folder, Hub id, or release name (for an extract folder: optional, checked against the features)",
    )
    index.add_argument("--out", required=True, help="index folder")
    index.add_argument("--ann", choices=ANN_KINDS, help="first stage: exact, HNSW graph, IVF-PQ (default auto)")
    index.add_argument("--hnsw-m", type=int, help="HNSW neighbours per node (default 32)")
    index.add_argument("--ef-construction", type=int, help="HNSW candidate list while building (default 40)")
    index.add_argument("--ef-search", type=int, help="HNSW search list (default 64; at least the shortlist)")
    index.add_argument("--nlist", type=int, help="IVF cells (default: a power of two near 4 sqrt(rows))")
    index.add_argument("--nprobe", type=int, help="IVF cells visited per query (default 64)")
    index.add_argument(
        "--pq-bytes", type=int, help="bytes per row of the IVF-PQ code (default: half the first-stage width)"
    )
    index.add_argument(
        "--exact-below", type=int, help="rows from which --ann auto builds an ANN first stage (default 200000)"
    )
    index.add_argument(
        "--half-scan",
        action=argparse.BooleanOptionalAction,
        help="exact scans of a few queries read a half-precision copy, then settle the top k in float32 (default on)",
    )
    index.add_argument(
        "--bound-scan",
        action=argparse.BooleanOptionalAction,
        help="exact scans of a few queries over a cached table read a narrow table of bounds in the rows' principal "
        "axes first, then settle the top k in float32 (default on)",
    )
    index.add_argument("--append", action="store_true", help="add the extract folder's new shards to the index --out")
    index.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    index.add_argument("--allow-other-model", action="store_true", help="skip the model fingerprint check")
    _add_runtime_flags(index, batch_size=32)
    index.set_defaults(run=_index)


def _add_search(commands: argparse._SubParsersAction) -> None:
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


def _add_visualize(commands: argparse._SubParsersAction) -> None:
    visualize = commands.add_parser(
        "visualize", help="the image and PCA maps of its patch features (raw, and RASA-debiased when available)"
    )
    visualize.add_argument("image", help="an image file")
    _add_model_flags(visualize, help="a Franca folder, Hub id or release")
    visualize.add_argument("--out", required=True, help="the picture written, in its suffix's format (.png, .jpg, ...)")
    visualize.add_argument(
        "--size", type=int, help="resize + center-crop side in pixels, at least 2 patches (default: the model's)"
    )
    visualize.set_defaults(run=_visualize)


def _add_training_command(
    commands: argparse._SubParsersAction,
    name: str,
    run,
    config: tuple[str | None, str],
    settings: tuple[str, str],
    **texts: str,
) -> None:
    """A command of the training grammar (`GRAMMAR`): a recipe, `--config` (default, help), then any number of
    key=value settings, a positional (dest, help); `texts` are add_parser's help, description and epilog."""
    command = commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **texts)
    command.add_argument("--config", default=config[0], help=config[1])
    command.add_argument(settings[0], nargs="*", help=settings[1])
    command.set_defaults(run=run)


def _add_pretrain(commands: argparse._SubParsersAction) -> None:
    _add_training_command(
        commands,
        "pretrain",
        _pretrain,
        config=("demo", "a bundled recipe (demo, vitb14_in21k, ...) or a YAML file"),
        settings=("overrides", "section.key=value, e.g. optim.total_steps=200 (model takes any FrancaConfig field)"),
        help="pretrain with Accelerate: --config demo|vitb14_in21k|... [section.key=value ...]",
        description="""\
Franca pretraining with Accelerate: DINO + iBOT with nested Matryoshka heads, Sinkhorn-Knopp targets, KoLeo,
CyclicMask, an EMA teacher and multi-crop, from one CPU to many GPUs (docs/pretraining.md).

    accelerate launch -m franca_hf.cli pretrain --config demo [section.key=value ...]
    franca-hf pretrain --config vitb14_in21k data.source=/data/in21k run.output_dir=runs/b14
""",
    )


def _add_rasa(commands: argparse._SubParsersAction) -> None:
    _add_training_command(
        commands,
        "rasa",
        _rasa,
        config=(None, "a YAML file of settings (key: value), applied before the key=value ones"),
        settings=("settings", "key=value, e.g. model=runs/demo/teacher data=demo out=rasa"),
        help="learn RASA position directions on a frozen Franca or DINOv2 backbone",
        description="""\
RASA post-training: learn the directions that carry absolute patch position and remove them, on a frozen ViT.

    franca-hf rasa model=runs/demo/teacher data=demo out=runs/demo/teacher_rasa steps=8
    accelerate launch -m franca_hf.cli rasa model=facebook/dinov2-base data=/voc out=dinov2_rasa

Step t trains a fresh bias-free Linear(D, 2) + sigmoid on the currently debiased final-normed patch tokens to regress
the normalised grid coordinates (row / (rows - 1), col / (cols - 1)) with MSE (AdamW without weight decay, cosine lr
to 0), then freezes it into the chain. After every step a fresh linear probe, fitted on half of the held-out images
and scored on the other half, gives the R² of position still linearly decodable; the mean cosine similarity between
raw and debiased tokens shows how much else changed. Progress is saved after every step; a rerun resumes.

Output: for a FrancaModel, an HF folder whose `debiased_patch_tokens` use the whole chain; for DINOv2 models, a
`rasa_directions.safetensors` file to use with `franca_hf.rasa.RasaDirections`.
""",
        epilog=textwrap.fill(
            f"Settings (key=value): {', '.join(f.name for f in dataclasses.fields(RasaRunSettings))}. model, data "
            "and out are required."
        ),
    )


def _add_knn(commands: argparse._SubParsersAction) -> None:
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


def _add_eval(commands: argparse._SubParsersAction) -> None:
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
    segmentation.add_argument("--figure", help="where --show draws, in its suffix's format (default segmentation.png)")


def _add_fit_pca(commands: argparse._SubParsersAction) -> None:
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


def _add_releases(commands: argparse._SubParsersAction) -> None:
    releases = commands.add_parser("releases", help="list the official Franca releases")
    releases.set_defaults(run=_releases)


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


def _with_flag(error: Exception, parser: argparse.ArgumentParser, command: str) -> str:
    """The message of a usage error, followed by the flag of `command` that sets the setting it names, if one does:
    library messages name settings (`dim=48 ...`), the command line spells them as flags (`(--dim)`)."""
    setting = getattr(error, "setting", None)
    if setting is None:
        return str(error)
    (subcommand,) = _subparsers(parser)  # argparse has no public lookup of a subcommand's actions by dest
    actions = _actions(subcommand.choices[command])
    flags = [action.option_strings[0] for action in actions if action.dest == setting and action.option_strings]
    return f"{error} ({flags[0]})" if flags else str(error)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments of `parser` and of its subcommands (`eval linear`, `eval seg`)."""
    nested = [_actions(choice) for subcommands in _subparsers(parser) for choice in subcommands.choices.values()]
    return [*parser._actions, *(action for actions in nested for action in actions)]


def _command_name(args: argparse.Namespace) -> str:
    """The command as typed: `eval linear` for a command with protocols."""
    protocol = getattr(args, "protocol", None)
    return f"{args.command} {protocol}" if protocol else args.command


# commands whose rerun takes up an interrupted run where it stopped (committed shards, checkpoints, saved steps)
RESUMING_COMMANDS = ("extract", "pretrain", "rasa")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as error:
        report(_command_name(args), _with_flag(error, parser, args.command))
        return 2
    except RunStoppedError as error:
        report(_command_name(args), error, kind="stopped")
        return 3
    except KeyboardInterrupt:
        resumes = args.command in RESUMING_COMMANDS
        report(
            _command_name(args),
            "interrupted" + ("; rerun the same command to go on from what it saved." if resumes else "."),
            kind="stopped",
        )
        return 130  # a shell's code for a command stopped by SIGINT


if __name__ == "__main__":
    sys.exit(main())

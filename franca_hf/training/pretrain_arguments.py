"""The arguments of `franca-hf pretrain` (`python -m franca_hf.cli pretrain`): cheap to import, for the command
line's help and usage errors (the training itself: `franca_hf.training.pretrain`)."""

import argparse

DESCRIPTION = """Franca pretraining with Accelerate: DINO + iBOT with nested Matryoshka heads, Sinkhorn-Knopp targets, KoLeo,
CyclicMask, an EMA teacher and multi-crop, from one CPU to many GPUs.

    accelerate launch -m franca_hf.cli pretrain --config demo [section.key=value ...]
    franca-hf pretrain --config vitb14_in21k data.source=/data/in21k run.output_dir=runs/b14
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `franca-hf pretrain` (and `python -m franca_hf.cli pretrain`)."""
    parser.add_argument("--config", default="demo", help="a bundled recipe (demo, vitb14_in21k, ...) or a YAML file")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="section.key=value, e.g. optim.total_steps=200 (model takes any FrancaConfig field)",
    )

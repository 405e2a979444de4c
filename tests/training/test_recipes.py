"""The bundled recipes against the official Franca runs (benchmarks/recipe_table.py, docs/pretraining.md): the
table in the docs is the one the official files and the recipes give, every difference has a stated reason, the
release recipes blur as the official transforms do, and a drift of a recipe, a source or the table is caught."""

import runpy
import shutil

import pytest

from franca_hf.training import OFFICIAL_BLUR_PROBABILITIES, PAPER_BLUR_PROBABILITIES
from franca_hf.training.config import load_config
from franca_hf.training.pipeline import make_augmentation

from ..conftest import REPO_ROOT

OFFICIAL = REPO_ROOT / "tests" / "reference" / "official_franca"
DOCS = REPO_ROOT / "docs" / "pretraining.md"
RELEASE_RECIPES = [
    "vitb14_in21k",
    "vitl14_in21k",
    "vitg14_in21k",
    "vitl14_laion",
    "vitg14_laion",
    "highres_518_official",
]


@pytest.fixture(scope="module")
def table():
    """The script's functions (a script, not a module of the package)."""
    return runpy.run_path(str(REPO_ROOT / "benchmarks" / "recipe_table.py"))


def test_the_docs_table_is_the_one_the_official_sources_and_recipes_give(table, capsys):
    rows = table["all_rows"](OFFICIAL)
    assert table["problems"](rows) == []
    assert table["main"](["--official", str(OFFICIAL), "--docs", str(DOCS), "--check"]) == 0
    assert [release.recipe for release in rows] == [*RELEASE_RECIPES, "highres_518_official"]
    follows = {(release.name, row.setting): row.follows for release, rows_ in rows.items() for row in rows_}
    # the deliberate differences are rows of the table
    for recipe in RELEASE_RECIPES:
        assert follows[(recipe, "precision")] == follows[(recipe, "iBOT Sinkhorn rows")] == "deliberate"
    assert follows[("vitg14_in21k", "DINO head (nesting, prototypes, hidden, bottleneck)")] == "deliberate"


def test_official_values_are_read_as_the_official_code_reads_them(table):
    """Values read by hand from valeoai/Franca (the yaml over ssl_default_config.yaml, the slurm scripts,
    training.md), against what the script parses."""
    releases = {release.name: release for release in table["RELEASES"]}
    laion_l = table["read_official"](OFFICIAL, releases["vitl14_laion"])
    assert (laion_l.gpus, laion_l.config["optim"]["base_lr"], laion_l.config["train"]["OFFICIAL_EPOCH_LENGTH"]) == (
        128,
        1e-3,
        1250,
    )
    assert laion_l.training_md["global batch"].value == 3072 and laion_l.training_md["GPUs"].value == 64
    assert laion_l.training_md["peak lr"].agrees_with(2e-4 * 3**0.5)  # 3.46e-4 printed as 3.5e-4
    assert not laion_l.training_md["peak lr"].agrees_with(3.6e-4)
    b14 = table["read_official"](OFFICIAL, releases["vitb14_in21k"])
    assert (b14.config["optim"]["epochs"], b14.config["optim"]["warmup_epochs"], b14.gpus) == (800, 128, 64)
    assert b14.training_md["iterations"].value == 625_000 and b14.training_md["GPUs"].value == 32
    g14 = table["read_official"](OFFICIAL, releases["vitg14_in21k"])
    assert "MRL" not in g14.config["dino"] and g14.gpus == 96
    finetune = table["read_official"](OFFICIAL, releases["highres_518_official"])
    assert (finetune.gpus, finetune.training_md, finetune.config["train"]["OFFICIAL_EPOCH_LENGTH"]) == (None, {}, 200)


def test_release_recipes_blur_as_the_official_transforms_and_the_paper_is_one_setting_away():
    for name in RELEASE_RECIPES:
        assert make_augmentation(load_config(name)).blur_probabilities == OFFICIAL_BLUR_PROBABILITIES == (0.0, 0.9, 0.5)
        paper = make_augmentation(load_config(name, ["crops.blur=paper"]))
        assert paper.blur_probabilities == PAPER_BLUR_PROBABILITIES == (1.0, 0.1, 0.5)
    for name in ("highres_364", "highres_518", "demo"):  # the paper's stages and the demo keep the paper's blur
        assert load_config(name).crops.blur == "paper"


def test_a_drifted_recipe_source_or_table_is_caught(table, tmp_path, monkeypatch, capsys):
    # a recipe that no longer follows the source its row names
    load = table["load_config"]
    drifted = {"vitl14_laion": ["optim.base_lr=2.0e-4"], "vitg14_laion": ["crops.global_scale=[0.48,1.0]"]}
    monkeypatch.setitem(
        table["release_rows"].__globals__,
        "load_config",
        lambda name, overrides: load(name, [*overrides, *drifted.get(name, [])]),
    )
    drifted_releases = [release for release in table["RELEASES"] if release.recipe in drifted]
    found = table["problems"]({release: table["release_rows"](OFFICIAL, release) for release in drifted_releases})
    assert found == [
        "vitl14_laion: base lr (per 1024 images): the recipe's 2e-4 differs from official yaml / code 1e-3, and "
        "DECISIONS says nothing",
        "vitl14_laion: peak lr: the recipe's 4e-4 (2e-4 x sqrt(4096 / 1024)) does not follow launch script "
        "(2e-3 (1e-3 x sqrt(4096 / 1024)))",
        "vitg14_laion: global crops (size, scale): the recipe's (224, (0.48, 1)) differs from official yaml / code "
        "(224, (0.45, 1)), and DECISIONS says nothing",
    ]
    monkeypatch.undo()

    # official sources that change: a new value nobody decided on, a decision no longer needed, a script that
    # launches another yaml
    sources = tmp_path / "official"
    shutil.copytree(OFFICIAL, sources)
    laion_g = sources / "franca/configs/train/LAION/vitg14.yaml"
    laion_g.write_text(laion_g.read_text().replace("  - 0.45\n  - 1.0", "  - 0.5\n  - 1.0"))
    vitl = sources / "franca/configs/train/IN21K/vitl14.yaml"
    vitl.write_text(
        vitl.read_text().replace("epochs: 16", "epochs: 500").replace("warmup_epochs: 8", "warmup_epochs: 80")
    )
    assert table["main"](["--official", str(sources), "--docs", str(DOCS), "--check"]) == 1
    message = capsys.readouterr().err.splitlines()
    assert message[0] == "The recipes and the official sources disagree where no decision says why:"
    assert message[1:] == [
        "  vitl14_in21k: iterations: every source now agrees; drop the DECISIONS entry",
        "  vitl14_in21k: warmup: every source now agrees; drop the DECISIONS entry",
        "  vitg14_laion: global crops (size, scale): the recipe's (224, (0.45, 1)) differs from official yaml / code "
        "(224, (0.5, 1)), and DECISIONS says nothing",
    ]
    script = sources / "scripts/In-21K/franca-B.sh"
    script.write_text(script.read_text().replace("IN21K/vitb14.yaml", "IN21K/vitl14.yaml"))
    with pytest.raises(ValueError, match="franca-B.sh trains franca/configs/train/IN21K/vitl14.yaml, not .*vitb14"):
        table["all_rows"](sources)

    # a table edited by hand
    page = tmp_path / "pretraining.md"
    page.write_text(DOCS.read_text().replace("| 4e-4 (2e-4 x sqrt(4096 / 1024)) |", "| 3.5e-4 |", 1))
    assert table["main"](["--official", str(OFFICIAL), "--docs", str(page), "--check"]) == 1
    assert "the recipe table is not the one the sources give" in capsys.readouterr().err
    assert table["main"](["--official", str(OFFICIAL), "--docs", str(page)]) == 0  # rewrites it
    assert page.read_text() == DOCS.read_text()

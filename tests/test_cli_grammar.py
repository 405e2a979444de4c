"""The command line's one rule for settings, stated in `franca-hf --help` and true of every command, and the training
commands' recipe and key=value settings reaching the library call the command makes (no training here: the library
functions are replaced by ones that record what they are given)."""

import argparse
import json
import logging

import pytest

from franca_hf.cli import GRAMMAR, _with_flag, build_parser, main
from franca_hf.errors import RunStoppedError, UsageError
from franca_hf.rasa.settings import RasaRunSettings
from franca_hf.training.config import load_config

TRAINING_COMMANDS = {"pretrain", "rasa"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subcommands.choices)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The training commands configure logging for their process; keep that out of the other tests."""
    level = logging.getLogger("franca_hf").level
    yield
    logging.getLogger("franca_hf").setLevel(level)


def test_help_states_the_rule(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert " ".join(GRAMMAR.split()) in " ".join(capsys.readouterr().out.split())
    assert GRAMMAR == (
        "Training commands (pretrain, rasa) take a recipe (--config) and key=value settings; every other command "
        "takes --flags."
    )


def test_the_rule_is_true_of_every_command():
    commands = _commands()
    assert TRAINING_COMMANDS < set(commands)
    for name, parser in commands.items():
        actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        options = {flag for a in actions for flag in a.option_strings}
        positionals = [a for a in actions if not a.option_strings]
        if name in TRAINING_COMMANDS:  # a recipe, then any number of key=value settings
            assert options == {"--config"}, name
            assert [a.nargs for a in positionals] == ["*"], name
        else:  # settings are --flags; positionals are only inputs (images, a checkpoint, a folder) or a subcommand
            assert all(flag.startswith("--") or flag == "-h" for flag in options), name
            assert all(
                a.dest in {"images", "checkpoint", "folder", "queries", "image", "protocol"} for a in positionals
            )


def test_pretrain_passes_the_recipe_and_its_overrides_to_train(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        "franca_hf.training.pretrain.train", lambda config, config_name: calls.append((config, config_name))
    )
    overrides = ["optim.total_steps=70", f"run.output_dir={tmp_path}", "crops.local_number=4"]
    assert main(["pretrain", "--config", "demo", *overrides]) == 0
    [(config, name)] = calls
    assert name == "demo" and config == load_config("demo", overrides)
    assert (config.optim.total_steps, config.run.output_dir, config.crops.local_number) == (70, str(tmp_path), 4)
    assert config != load_config("demo")  # the overrides changed something the comparison above could miss


def test_pretrain_reports_a_bad_setting_in_one_line_before_training(monkeypatch, capsys):
    monkeypatch.setattr("franca_hf.training.pretrain.train", lambda *a, **k: pytest.fail("trained on a bad recipe"))
    assert main(["pretrain", "--config", "demo", "optim.total_stepz=7"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("franca-hf pretrain: error: override 'optim.total_stepz=7': unknown key optim.total_stepz")
    assert main(["pretrain", "--config", "no_such_recipe"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("franca-hf pretrain: error: No config 'no_such_recipe': give a YAML file or one of [")
    assert line.endswith("(--config)")  # the setting is the command's one flag


def test_a_run_that_stops_itself_exits_3_with_one_line(monkeypatch, capsys):
    from franca_hf.training.metrics import NonFiniteLossError

    def stop(config, config_name):
        raise NonFiniteLossError("Non-finite loss at step 3; the last good checkpoint is kept.")

    monkeypatch.setattr("franca_hf.training.pretrain.train", stop)
    assert isinstance(NonFiniteLossError(""), RunStoppedError)
    assert main(["pretrain", "--config", "demo"]) == 3
    assert capsys.readouterr().err.splitlines() == [
        "franca-hf pretrain: stopped: Non-finite loss at step 3; the last good checkpoint is kept."
    ]


def test_rasa_passes_its_settings_file_and_key_values_to_rasa_and_prints_the_report(monkeypatch, tmp_path, capsys):
    from franca_hf.rasa.train import RasaReport

    calls = []

    def record(settings: RasaRunSettings) -> RasaReport:
        calls.append(settings)
        return RasaReport(probe_r2=[0.9, 0.2], cosine_to_raw=[1.0, 0.95], train_loss=[0.04])

    monkeypatch.setattr("franca_hf.rasa.train.rasa", record)
    recipe = tmp_path / "rasa.yaml"
    recipe.write_text("steps: 3\nlr: 0.01\ncrop_scale: [0.5, 1.0]\nmodel: from_the_file\n")
    settings = ["model=runs/teacher", "data=demo", f"out={tmp_path / 'out'}", "steps=2", "orthogonal=false"]
    assert main(["rasa", "--config", str(recipe), *settings, "max_images=32", "split=validation"]) == 0
    expected = RasaRunSettings(
        model="runs/teacher",  # key=value after the file
        data="demo",
        out=str(tmp_path / "out"),
        steps=2,
        lr=0.01,
        crop_scale=[0.5, 1.0],
        orthogonal=False,
        max_images=32,
        split="validation",
    )
    assert calls == [expected]
    assert json.loads(capsys.readouterr().out) == {"probe_r2": [0.9, 0.2], "cosine_to_raw": [1.0, 0.95]}


def test_a_setting_named_by_a_usage_error_gets_its_flag_also_under_a_protocol():
    parser = build_parser()
    named = UsageError("epochs must be at least 1; got 0.", setting="epochs")
    assert _with_flag(named, parser, "eval") == "epochs must be at least 1; got 0. (--epochs)"  # eval linear/seg
    assert _with_flag(UsageError("dim=48 is not allowed.", setting="dim"), parser, "search").endswith("(--dim)")
    # key=value settings are named as typed: nothing to add
    assert _with_flag(UsageError("steps must be >= 1, got 0.", setting="steps"), parser, "rasa").endswith("got 0.")

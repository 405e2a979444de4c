"""The official step-by-step RASA chain reproduces the official code's debiased tokens, and the deprecated module
path of RASA training still works."""

from franca_hf.conversion.checkpoint import load_rasa_weights
from franca_hf.rasa import official_rasa_chain

from ..conftest import RASA_CHECKPOINT, REFERENCE_SIZES


def test_official_chain_matches_the_official_outputs(reference):
    weights = load_rasa_weights(RASA_CHECKPOINT, 128)
    for size in REFERENCE_SIZES:
        debiased = official_rasa_chain(reference[f"{size}.patch"], weights)
        assert (debiased - reference[f"{size}.patch_rasa"]).abs().max() <= 1e-5


def test_the_old_module_path_of_rasa_training_still_works():
    import franca_hf.rasa.train as current
    import franca_hf.training.rasa as deprecated

    assert deprecated.train_rasa is current.train_rasa and deprecated.main is current.main
    assert deprecated.RasaSettings is current.RasaSettings
    from franca_hf.rasa import probe

    for name in ("evaluate_chain", "grid_coordinates", "linear_probe_r2", "probe_r2"):
        assert getattr(deprecated, name) is getattr(probe, name)

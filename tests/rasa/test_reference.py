"""The official step-by-step RASA chain reproduces the official code's debiased tokens."""

from franca_hf.conversion.checkpoint import load_rasa_weights
from franca_hf.rasa import official_rasa_chain

from ..conftest import RASA_CHECKPOINT, REFERENCE_SIZES


def test_official_chain_matches_the_official_outputs(reference):
    weights = load_rasa_weights(RASA_CHECKPOINT, 128)
    for size in REFERENCE_SIZES:
        debiased = official_rasa_chain(reference[f"{size}.patch"], weights)
        assert (debiased - reference[f"{size}.patch_rasa"]).abs().max() <= 1e-5

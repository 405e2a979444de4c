"""Deprecated location of RASA training: use `franca_hf.rasa.train` (`franca-hf rasa`). Kept so that old imports
of its public names and `accelerate launch -m franca_hf.training.rasa` keep working; `evaluation_transform` is gone
(the held-out images go through `make_image_processor` now) and `held_out_tokens` takes the
`franca_hf.rasa.train` arguments."""

import sys

from ..rasa.probe import evaluate_chain, grid_coordinates, linear_probe_r2, probe_r2  # noqa: F401
from ..rasa.train import *  # noqa: F403
from ..rasa.train import main

if __name__ == "__main__":
    sys.exit(main())

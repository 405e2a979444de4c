"""Deprecated location of RASA training: use `franca_hf.rasa.train` (`franca-hf rasa`). Kept so that old imports
and `accelerate launch -m franca_hf.training.rasa` keep working."""

import sys

from ..rasa.train import *  # noqa: F403
from ..rasa.train import main

if __name__ == "__main__":
    sys.exit(main())

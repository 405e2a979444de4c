"""Test launcher: a module run unchanged, with every release name standing for the tiny reference checkpoint.

What the `tiny_releases` fixture of tests/conftest.py does in the test process, for the processes a launcher such as
torchrun starts: the release table keeps its names, tags and files, and expects the tiny reference architecture
(128 wide, 4 blocks, 7 x 7 position table), so that downloading and converting "a release" runs on the tiny
checkpoint served from a local folder or a loopback server (`FRANCA_HF_RELEASE_URL`):

    torchrun ... tests/training/release_launcher.py -m franca_hf.cli extract --model franca_vitb14_In21K ...
"""

import dataclasses
import sys

from launching import run_as_main

from franca_hf.conversion.releases import RELEASES
from franca_hf.modeling import FRANCA_PRESETS

if __name__ == "__main__":
    FRANCA_PRESETS["tiny_reference"] = (128, 4, 2)
    for name, release in RELEASES.items():
        RELEASES[name] = dataclasses.replace(release, preset="tiny_reference", grid=7)
    run_as_main(sys.argv[1:])

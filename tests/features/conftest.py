"""Image folders for the extraction tests: the example photos with two unreadable files, and small generated sets."""

import shutil
import struct
import zlib
from pathlib import Path

import datasets
import pytest
from PIL import Image

from ..conftest import EXAMPLE_IMAGES


@pytest.fixture()
def photos(tmp_path) -> Path:
    """The example photos plus two bad files that must be skipped: garbage, and a PNG whose header claims
    20000 x 20000 pixels (PIL refuses it as a decompression bomb, an error that is not an OSError)."""
    folder = tmp_path / "photos"
    shutil.copytree(EXAMPLE_IMAGES, folder, ignore=shutil.ignore_patterns("*.md"))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    size = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    png = chunk(b"IHDR", size) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return folder


def make_images(folder: Path, count: int, broken: int = 0, size: int = 24) -> list[str]:
    """`count` distinct small PNGs (and `broken` unreadable files) in `folder`; returns the readable paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        Image.new("RGB", (size, size), (i % 256, (7 * i) % 256, (i // 256 * 40) % 256)).save(path)
        paths.append(str(path))
    for i in range(broken):
        (folder / f"broken_{i}.png").write_bytes(b"not a png")
    return paths


def extract_command(images, model, out, *extra: str) -> list[str]:
    """`franca-hf extract` arguments, decoding in the calling process (the worker path has its own tests)."""
    return ["extract", str(images), "--model", str(model), "--out", str(out), "--num-workers", "0", *extra]


def load_rows(folder: Path) -> datasets.Dataset:
    """An extraction folder opened the way users open it."""
    return datasets.load_dataset(str(folder), split="train")

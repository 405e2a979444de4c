"""The official Franca release files: names, URLs, resumable cached downloads and the split ViT-g archives.

Files live at `<base_url>/<tag>/<stem>.pth` (RASA heads `<stem>_rasa.pth`); ViT-g comes as three parts
`<stem>_chunked.tar.gz.part_aa/ab/ac` that concatenate into one tar.gz holding the .pth. The base URL is a setting
(`FRANCA_HF_RELEASE_URL` or the `base_url` argument) so that a mirror, or a loopback server in tests, can serve the
same layout. Downloads go to `FRANCA_HF_CACHE` (default `~/.cache/franca_hf`).
"""

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DownloadError, UsageError

if TYPE_CHECKING:
    from ..modeling import FrancaConfig

DEFAULT_RELEASE_URL = "https://github.com/valeoai/Franca/releases/download"
VIT_G_PART_SUFFIXES = ("aa", "ab", "ac")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Release:
    """One published Franca backbone.

    Attributes:
        stem: file stem, also the release name users type (`franca_vitb14_In21K`).
        tag: GitHub release tag holding the files.
        preset: architecture preset.
        grid: side of the stored position table (37 for 518 px, 16 for 224 px); None where not documented.
        has_rasa: whether a RASA head `<stem>_rasa.pth` is published.
        dataset: pretraining data, for the model card.
        chunked: published as tar.gz parts (the ViT-g files).
    """

    stem: str
    tag: str
    preset: str
    grid: int | None
    has_rasa: bool
    dataset: str
    chunked: bool = False

    def expected_config(self) -> "FrancaConfig":
        """The config this release converts to, as far as this table tells before anything is downloaded: its
        preset's architecture with Franca's Matryoshka dims, and `rasa_steps` 1 standing for a published RASA head
        (conversion reads the head's own count). Enough to judge a request (`dim`, `debiased`) before the download."""
        from ..modeling import FrancaConfig

        grid = {"position_grid_size": self.grid} if self.grid is not None else {}
        return FrancaConfig.from_preset(self.preset, ffn_type="swiglu", rasa_steps=int(self.has_rasa), **grid)

    def architecture_mismatches(self, values: dict) -> list[str]:
        """What in `values` (`infer_config_values` of some weights) differs from this release's architecture: the
        preset's width, depth and patch 14 with a SwiGLU FFN, and the position grid where documented. Empty when the
        weights can be this release."""
        from ..modeling import preset_architecture

        preset = preset_architecture(self.preset)
        expected = {"hidden_size": preset.hidden_size, "num_hidden_layers": preset.num_hidden_layers}
        expected.update(patch_size=14, ffn_type="swiglu")
        if self.grid is not None:
            expected["position_grid_size"] = self.grid
        return [
            f"{key} {values.get(key)} (expected {value})" for key, value in expected.items() if values.get(key) != value
        ]


_IN21K = "ImageNet-21K"
_LAION = "LAION-600M (LAION-COCO)"
RELEASES: dict[str, Release] = {
    r.stem: r
    for r in (
        Release("franca_vitb14_In21K", "v1.0.0", "vit_base", 37, True, _IN21K),
        Release("franca_vitb14_In21K_224", "v1.1.0", "vit_base", 16, False, _IN21K),
        Release("franca_vitb14_Dinov2_In21K", "v1.1.0", "vit_base", 16, False, _IN21K),
        Release("franca_vitb14_Dinov2_In21K_518", "v1.1.0", "vit_base", 37, True, _IN21K),
        Release("franca_vitl14_Laion600M", "v1.0.0", "vit_large", 37, True, _LAION),
        Release("franca_vitl14_Laion600M_224", "v1.1.0", "vit_large", 16, False, _LAION),
        Release("franca_vitl14_Dinov2_In21K", "v1.1.0", "vit_large", 16, False, _IN21K),
        Release("franca_vitl14_Dinov2_In21K_518", "v1.1.0", "vit_large", 37, True, _IN21K),
        Release("franca_vitl14_Laion_518", "v1.1.0", "vit_large", 37, True, _LAION),
        Release("franca_vitg14_Laion600M", "v1.0.0", "vit_giant2", 16, True, _LAION, chunked=True),
        # Listed in the July-2025 README (spelled In21k) but not by the current official loader.
        Release("franca_vitl14_In21k", "v1.0.0", "vit_large", None, False, _IN21K),
        Release("franca_vitg14_In21k", "v1.0.0", "vit_giant2", None, False, _IN21K, chunked=True),
    )
}


def release_table() -> str:
    """The official releases, one line each: name, tag, preset, position table side, RASA head, data."""
    lines = []
    for release in RELEASES.values():
        grid = f"{release.grid * 14}px" if release.grid else "?"
        lines.append(
            f"{release.stem:34s} {release.tag}  {release.preset:10s} table {grid:6s} "
            f"RASA {'yes' if release.has_rasa else 'no '}  {release.dataset}"
        )
    return "\n".join(lines)


def check_rasa_published(release: Release) -> None:
    """A UsageError, listing the releases that have one, unless `release` has a published RASA head."""
    if not release.has_rasa:
        with_rasa = [r.stem for r in RELEASES.values() if r.has_rasa]
        raise UsageError(f"{release.stem} has no published RASA head; releases with one: {', '.join(with_rasa)}.")


def get_release(name: str) -> Release:
    """Look a release up by its stem; the error lists every known name."""
    if name not in RELEASES:
        raise UsageError(f"Unknown Franca release {name!r}. Known releases: {', '.join(RELEASES)}.")
    return RELEASES[name]


def cache_dir(override: str | Path | None = None) -> Path:
    """Where downloads and converted folders are kept: `override`, `$FRANCA_HF_CACHE` or `~/.cache/franca_hf`."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get("FRANCA_HF_CACHE", Path.home() / ".cache" / "franca_hf"))


def release_base_url(override: str | None = None) -> str:
    return (override or os.environ.get("FRANCA_HF_RELEASE_URL") or DEFAULT_RELEASE_URL).rstrip("/")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, destination: str | Path, progress: bool = True) -> Path:
    """Download `url` to `destination`, resuming a previous partial download, with a progress bar.

    Bytes go to `<destination>.partial`; a restart asks the server for the missing range (HTTP Range) and starts
    over if the server ignores it. The file appears under its final name only once complete.
    """
    from tqdm.auto import tqdm

    destination = Path(destination)
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the partial file already holds every byte
            os.replace(partial, destination)
            return destination
        raise DownloadError(f"Downloading {url} failed: HTTP {error.code} {error.reason}.") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(
            f"Downloading {url} failed: {error}. Check the network or FRANCA_HF_RELEASE_URL."
        ) from error
    with response:
        resumed = offset and response.status == 206
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(partial, "ab" if resumed else "wb") as handle,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=destination.name, disable=not progress
            ) as bar,
        ):
            try:
                while chunk := response.read(_CHUNK_BYTES):
                    handle.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise DownloadError(
                    f"Download of {url} was interrupted after {handle.tell()} bytes ({error}); run again to resume."
                ) from error
    if total is not None and partial.stat().st_size != total:
        raise DownloadError(
            f"Download of {url} stopped at {partial.stat().st_size} of {total} bytes; run again to resume."
        )
    os.replace(partial, destination)
    return destination


def _extract_single_pth(archive: Path, destination: Path) -> Path:
    """Unpack the one `.pth` member of a tar.gz into `destination` (regular files only, no path traversal)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".pth")]
        if len(members) != 1:
            raise DownloadError(f"{archive.name} should hold exactly one .pth file, found {[m.name for m in members]}.")
        source = tar.extractfile(members[0])
        partial = destination.with_name(destination.name + ".partial")
        with source, open(partial, "wb") as handle:
            shutil.copyfileobj(source, handle, _CHUNK_BYTES)
    os.replace(partial, destination)
    return destination


def fetch_release_file(
    name: str,
    rasa: bool = False,
    base_url: str | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Local path of a release's backbone (or RASA head) `.pth`, downloading it into the cache on first use.

    For ViT-g the three tar.gz parts are downloaded, joined and unpacked; the parts are deleted afterwards.
    """
    release = get_release(name)
    if rasa:
        check_rasa_published(release)
    folder = cache_dir(cache) / "downloads" / release.tag
    base = f"{release_base_url(base_url)}/{release.tag}"
    filename = f"{release.stem}_rasa.pth" if rasa else f"{release.stem}.pth"
    target = folder / filename
    if target.is_file():
        return target
    if rasa or not release.chunked:
        return download_file(f"{base}/{filename}", target, progress=progress)
    parts = [
        download_file(
            f"{base}/{release.stem}_chunked.tar.gz.part_{s}",
            folder / f"{release.stem}_chunked.tar.gz.part_{s}",
            progress,
        )
        for s in VIT_G_PART_SUFFIXES
    ]
    archive = folder / f"{release.stem}_chunked.tar.gz"
    joined = archive.with_name(archive.name + ".partial")
    with open(joined, "wb") as handle:
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, handle, _CHUNK_BYTES)
    os.replace(joined, archive)
    _extract_single_pth(archive, target)
    for leftover in (*parts, archive):
        leftover.unlink()
    return target

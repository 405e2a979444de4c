"""Every code block of README.md and docs/*.md runs here: each ```python block as written, each command of each
```bash block in a scaled-down form. One test per block, `README.md:16[bash]`; pytest's summary counts the blocks
run and lists the skipped ones with their reasons (`-ra`).

A small collector rather than a plugin. pytest-markdown-docs (maintained) runs Python blocks only, and
pytest-codeblocks runs shell blocks verbatim in a subprocess; the shell commands of these pages need what neither
does: scaling down (a 500-step pretraining becomes 2 steps, the table `SCALED_DOWN`), stand-ins for what a reader
has and the tests must not fetch (the table `STANDINS`, release names, `hf:` datasets, the Hub), and running
`franca-hf` in this process (a new process costs 5-10 s of imports on 2 cores; `accelerate launch` keeps its own
processes).

Marking. A block that cannot run here says why in its fence info string, visible in the Markdown source:
```bash skip="needs 8 GPUs"``` (GitHub and other CommonMark renderers highlight by the first word). Fences without a
language (output listings) are not code and are not collected.

How a page runs. Its blocks run in order in one sandbox folder (its working directory) and, for Python, one
namespace, so a block can use what an earlier one made; running one block alone (`-k`) runs the earlier blocks of
its page first. Shell lines are split on `&&`; `[...]` groups of a usage synopsis are left out; the setup steps of a
fresh machine (`python3 -m venv`, `pip install`) are not run (the suite runs in the installed environment) and
`.venv/bin/` prefixes are dropped. `franca-hf` runs in this process, `python benchmarks/<script>.py` too,
`accelerate launch` as a subprocess.

Stand-ins. Before each command or Python block, every name of `STANDINS` it reads that the sandbox lacks is put
there (a command's outputs, `--out` and `*.output_dir=`, never are, nor anything at or under what an earlier
command of the page wrote: a command that should have made it and did not fails the block). Release names resolve through a pre-filled
conversion cache (`$FRANCA_HF_CACHE/converted/<name>[_rasa]/float32`, see `convert_release`): a random Franca
folder with a release's interface (D 768, patch 14, 224-px processor, Matryoshka dims 48...768, 9 RASA steps) but
4 narrow blocks, since the pages use the release's dims (`--dim 192`, `dim=48`) that the 128-wide tiny reference lacks.
Conversions that would download (`convert --release ... --out`) find the tiny reference (tests/reference/tiny) in
the download cache, with the releases' architecture set to it as in `tests/conftest.py`. `hf:beans` is a
`save_to_disk` folder of the example photos (`HUB_DATASETS`). The Hub, the datasets Hub and the release URL point
at a loopback fake Hub (tests/conversion/fake_hub.py), which takes uploads and answers every download with 404:
nothing is fetched from the network.
"""

import dataclasses
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import EXAMPLE_IMAGES, RASA_CHECKPOINT, REPO_ROOT, TEACHER_CHECKPOINT
from .conversion.fake_hub import FakeHub

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
OPENING_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
SKIP = re.compile(r'\bskip="(?P<reason>[^"]+)"')

# Appended to a command (a `--flag value` replaces the flag's value, a `key=value` setting comes last and wins).
SCALED_DOWN = {
    "pretrain": "optim.total_steps=2 optim.warmup_steps=0 optim.batch_size_per_device=8 data.demo_num_images=130 "
    "data.num_workers=0 eval.knn_max_images=130 run.log_every=1",  # a PCA basis of the 128-dim demo needs 129
    "rasa": "steps=2 epochs=1 batch_size=16 held_out_images=8 max_images=32 num_workers=0",
    "knn": "--max-images 32 --num-workers 0",
    "eval": "--max-images 40 --epochs 1 --batch-size 8",
    "fit-pca": "--max-images 200 --num-workers 0",
    "extract": "--num-workers 0",
    "index": "--num-workers 0",
    "benchmarks/retrieval.py": "--size 2000 --clusters 20 --queries 64 --single-queries 4 --batches 1 16 --rounds 1",
    "benchmarks/scan_memory.py": "--shapes 2000x16 --queries 4 --rounds 1",
}
# `hf:<name>` datasets of the pages -> a function writing a `save_to_disk` stand-in into the given folder.
HUB_DATASETS = {"hf:beans": lambda folder: _save_photo_dataset(folder, split="validation")}
# Commands of a fresh machine's setup: the suite runs in the installed environment.
SETUP_COMMANDS = (("python3", "-m", "venv"), ("python", "-m", "venv"), ("pip", "install"))
OUTPUT_FLAGS = ("--out",)
OUTPUT_SETTINGS = ("out=", "run.output_dir=")


@dataclasses.dataclass(frozen=True)
class CodeBlock:
    page: str  # relative to the repository
    line: int  # line of the opening fence (1-based)
    language: str  # "python" or "bash"
    info: str  # the fence's info string
    source: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}[{self.language}]"

    @property
    def skip_reason(self) -> str | None:
        match = SKIP.search(self.info)
        return match["reason"] if match else None


def read_code_blocks(page: Path) -> list[CodeBlock]:
    """The fenced blocks of a CommonMark page whose language is Python or a shell."""
    blocks, opening, body = [], None, []
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if opening is None:
            opening = OPENING_FENCE.match(line)
            start, body = number, []
            continue
        fence = opening["fence"]
        if re.fullmatch(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*", line):
            info = opening["info"].strip()
            language = LANGUAGES.get(info.split()[0].lower() if info else "")
            if language:
                text = "\n".join(body) + "\n"
                name = str(page.relative_to(REPO_ROOT)) if page.is_relative_to(REPO_ROOT) else page.name
                blocks.append(CodeBlock(name, start, language, info, text))
            opening = None
        else:
            body.append(line[len(opening["indent"]) :] if line.startswith(opening["indent"]) else line.lstrip())
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in read_code_blocks(page)]


def shell_commands(source: str) -> list[list[str]]:
    """The commands of a shell block: lines joined at `\\`, comments dropped, split at `&&`, `[...]` left out."""
    commands = []
    for line in source.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if any(word in ("|", "||", ";", ">", "<", "&") for word in words):
            raise ValueError(f"the docs tests run simple commands joined by &&, not {line!r}")
        command, optional = [], False
        for word in [*words, "&&"]:
            if word == "&&":
                if command:
                    commands.append(command)
                command = []
            elif word.startswith("[") or optional:
                optional = not word.endswith("]")
            else:
                command.append(word)
    return commands


def command_key(argv: list[str]) -> str:
    """What `SCALED_DOWN` knows a command by: the franca-hf subcommand (also under `accelerate launch -m`), or the
    script of `python <script>`."""
    if argv[0] == "franca-hf":
        return argv[1]
    if argv[0] == "accelerate":
        return argv[argv.index("-m") + 2]  # -m franca_hf.cli COMMAND
    return argv[1]


def scaled_down(argv: list[str]) -> list[str]:
    """`argv` with its `SCALED_DOWN` words."""
    argv = list(argv)
    extra = SCALED_DOWN.get(command_key(argv), "").split()
    while extra:
        word = extra.pop(0)
        if word.startswith("--"):
            values = []
            while extra and not extra[0].startswith("--") and "=" not in extra[0]:
                values.append(extra.pop(0))
            if word in argv:
                at = argv.index(word) + 1
                end = at
                while end < len(argv) and not argv[end].startswith("-") and "=" not in argv[end]:
                    end += 1
                argv[at:end] = values
            else:
                argv += [word, *values]
        else:
            argv.append(word)
    return argv


def command_inputs(argv: list[str]) -> list[str]:
    """The words of a command that may name existing files: not its outputs, values of settings included."""
    inputs = []
    for previous, word in zip(["", *argv], argv, strict=False):
        if previous in OUTPUT_FLAGS or word.startswith(OUTPUT_SETTINGS):
            continue
        inputs.append(word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word)
    return inputs


def command_outputs(argv: list[str]) -> list[str]:
    """The paths a command writes: the values of its output flags and settings."""
    return [
        word.split("=", 1)[1] if previous not in OUTPUT_FLAGS else word
        for previous, word in zip(["", *argv], argv, strict=False)
        if previous in OUTPUT_FLAGS or word.startswith(OUTPUT_SETTINGS)
    ]


# ---------------------------------------------------------------------------------------------------- stand-ins


def _save_photo_dataset(folder: Path, split: str) -> None:
    """The example photos (64 px) as a labelled `datasets` dataset with one split, written with `save_to_disk`."""
    import datasets
    from PIL import Image

    photos = sorted(EXAMPLE_IMAGES.glob("*.jpg"))
    images = [Image.open(path).convert("RGB").resize((64, 64)) for path in photos]
    features = datasets.Features(
        {"image": datasets.Image(), "labels": datasets.ClassLabel(names=["angular_leaf_spot", "bean_rust", "healthy"])}
    )
    rows = datasets.Dataset.from_dict({"image": images, "labels": [i % 3 for i in range(len(images))]}, features)
    datasets.DatasetDict({split: rows}).save_to_disk(str(folder))


def _random_franca_folder(folder: Path, **config) -> Path:
    from franca_hf import FrancaConfig, FrancaModel
    from franca_hf.conversion.export import save_model_folder

    torch.manual_seed(0)
    model = FrancaModel(FrancaConfig(**config)).eval()
    if model.rasa is not None:
        model.rasa.position_weights.data.normal_()
    return save_model_folder(model, folder)


class StandIns:
    """What the pages assume a reader has, made once per session in `root` (see the module docstring)."""

    def __init__(self, root: Path, hub_url: str):
        self.root, self.hub_url = root, hub_url
        self.cache = root / "franca_hf_cache"
        self._made: dict[str, Path] = {}
        self._fill_release_caches()
        self.hub_datasets = {}
        for name, write in HUB_DATASETS.items():
            folder = root / "hub_datasets" / name.removeprefix("hf:")
            write(folder)
            self.hub_datasets[name] = f"hf:{folder}"

    def _fill_release_caches(self) -> None:
        from franca_hf.conversion.releases import RELEASES

        shape = dict(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, mlp_ratio=1.0, patch_size=14)
        shape.update(position_grid_size=16, image_size=224)
        plain = _random_franca_folder(self.root / "release_standin", **shape)
        with_rasa = _random_franca_folder(self.root / "release_standin_rasa", rasa_steps=9, **shape)
        for release in RELEASES.values():
            variants = [(release.stem, plain)] + ([(f"{release.stem}_rasa", with_rasa)] if release.has_rasa else [])
            for name, folder in variants:
                entry = self.cache / "converted" / name / "float32"
                entry.parent.mkdir(parents=True, exist_ok=True)
                entry.symlink_to(folder, target_is_directory=True)
            downloads = self.cache / "downloads" / release.tag
            downloads.mkdir(parents=True, exist_ok=True)
            (downloads / f"{release.stem}.pth").symlink_to(TEACHER_CHECKPOINT)
            if release.has_rasa:
                (downloads / f"{release.stem}_rasa.pth").symlink_to(RASA_CHECKPOINT)

    def make(self, name: str) -> Path:
        """The session's copy of stand-in `name` (made on first use)."""
        if name not in self._made:
            self._made[name] = STANDINS[name](self.root / "made" / name, self)
        return self._made[name]

    def provide(self, sandbox: Path, words: list[str] | str, produced: set[str] = frozenset()) -> None:
        """Copy into `sandbox` every stand-in that `words` (command inputs, or a Python block's text) name and the
        sandbox lacks, except where an earlier command of the page wrote (`produced`): what it should have made is
        never stood in for."""
        for name in STANDINS:
            if any(name == out.rstrip("/") or name.startswith(out.rstrip("/") + "/") for out in produced):
                continue
            named = (
                re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w.-])", words)
                if isinstance(words, str)
                else any(word.rstrip("/") == name or word.startswith(name + "/") for word in words)
            )
            target = sandbox / name
            if named and not target.exists():
                source = self.make(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, target, symlinks=True)
                else:
                    shutil.copy(source, target)


def _as_is(source: Path):
    """A file or folder of the repository, copied as it is."""

    def make(target: Path, standins: StandIns) -> Path:
        return source

    return make


def _demo_teacher(target: Path, standins: StandIns) -> Path:
    """The README's demo teacher's architecture (patch 8, 32 px, D 128, 4 heads), random, 2 blocks."""
    return _random_franca_folder(
        target,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=8,
        position_grid_size=4,
        image_size=32,
    )


def _photo_folder(target: Path, standins: StandIns) -> Path:
    target.mkdir(parents=True)
    for photo in EXAMPLE_IMAGES.glob("*.jpg"):
        shutil.copy(photo, target / photo.name)
    return target


def _extracted_features(target: Path, standins: StandIns) -> Path:
    """A `franca-hf extract` folder: 64 demo images through the demo teacher stand-in (the retrieval benchmark
    needs more rows than the example photos)."""
    from franca_hf.cli import main
    from franca_hf.data.demo import load_demo_dataset

    images = target.with_name("demo_images")
    load_demo_dataset("test", num_images=64).save_to_disk(str(images))
    teacher = str(standins.make("runs/demo/teacher"))
    assert main(["extract", f"hf:{images}", "--model", teacher, "--out", str(target), "--num-workers", "0"]) == 0
    return target


# name in the sandbox -> make(target, standins) returning the path to copy there
STANDINS = {
    "runs/demo/teacher": _demo_teacher,
    "photos": _photo_folder,
    "query.jpg": _as_is(EXAMPLE_IMAGES / "chelsea_cat.jpg"),
    "photo.jpg": _as_is(EXAMPLE_IMAGES / "astronaut.jpg"),
    "examples": _as_is(REPO_ROOT / "examples"),
    "path/to/teacher_checkpoint.pth": _as_is(TEACHER_CHECKPOINT),
    "path/to/rasa_head.pth": _as_is(RASA_CHECKPOINT),
    "features": _extracted_features,
    "benchmarks": _as_is(REPO_ROOT / "benchmarks"),
    "docs": _as_is(REPO_ROOT / "docs"),  # a copy: commands that rewrite a page rewrite the copy
    "tests/reference/official_franca": _as_is(REPO_ROOT / "tests" / "reference" / "official_franca"),
}


# ---------------------------------------------------------------------------------------------------- running


@pytest.fixture(scope="session")
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture(scope="session")
def standins(tmp_path_factory, fake_hub) -> StandIns:
    return StandIns(tmp_path_factory.mktemp("docs_standins"), fake_hub.url)


def _isolate(patch: pytest.MonkeyPatch, cache: Path, hub_url: str) -> None:
    """Release names from `cache`, every Hub and release URL at the loopback fake Hub."""
    import datasets
    import huggingface_hub

    patch.setenv("FRANCA_HF_CACHE", str(cache))
    patch.setenv("FRANCA_HF_RELEASE_URL", hub_url)
    patch.setenv("HF_ENDPOINT", hub_url)  # for subprocesses
    patch.setenv("HF_TOKEN", "hf_docs_test")
    patch.setattr(huggingface_hub.constants, "ENDPOINT", hub_url)
    patch.setattr(
        huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    patch.setattr(datasets.config, "HF_ENDPOINT", hub_url)
    patch.setattr(datasets.config, "HUB_DATASETS_URL", hub_url + "/datasets/{repo_id}/resolve/{revision}/{path}")


class PageRun:
    """One page's sandbox, Python namespace and the blocks already run there."""

    def __init__(self, page: str, sandbox: Path):
        self.page, self.sandbox = page, sandbox
        self.namespace: dict = {"__name__": "__docs__"}
        self.done: set[int] = set()
        self.produced: set[str] = set()  # what the page's commands wrote (`command_outputs`)


@pytest.fixture(scope="session")
def page_runs(tmp_path_factory) -> dict[str, PageRun]:
    root = tmp_path_factory.mktemp("docs_sandboxes")
    return {
        page: PageRun(page, root / page.replace("/", "_")) for page in dict.fromkeys(block.page for block in ALL_BLOCKS)
    }


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(block, id=block.id, marks=[pytest.mark.skip(reason=f"{block.id}: {block.skip_reason}")])
        if block.skip_reason
        else pytest.param(block, id=block.id)
        for block in ALL_BLOCKS
    ],
)
def test_doc_block(block: CodeBlock, page_runs, standins, monkeypatch, tiny_releases):
    run = page_runs[block.page]
    run.sandbox.mkdir(exist_ok=True)
    monkeypatch.chdir(run.sandbox)
    _isolate(monkeypatch, standins.cache, standins.hub_url)
    for earlier in ALL_BLOCKS:
        if earlier.page == block.page and earlier.line < block.line and not earlier.skip_reason:
            if earlier.line not in run.done:
                try:
                    _run_block(earlier, run, standins)
                except Exception as error:
                    raise AssertionError(f"{earlier.id}, which comes before this block, failed: {error}") from error
    _run_block(block, run, standins)


def _run_block(block: CodeBlock, run: PageRun, standins: StandIns) -> None:
    run.done.add(block.line)
    if block.language == "python":
        source = block.source
        for name, local in standins.hub_datasets.items():
            source = source.replace(name, local)
        standins.provide(run.sandbox, source, run.produced)
        # line numbers of the page in tracebacks
        code = compile("\n" * block.line + source, str(REPO_ROOT / block.page), "exec")
        exec(code, run.namespace)
        return
    for argv in shell_commands(block.source):
        argv = [argv[0].removeprefix(".venv/bin/"), *argv[1:]]
        if any(tuple(argv[: len(setup)]) == setup for setup in SETUP_COMMANDS):
            continue
        argv = [standins.hub_datasets.get(word, word) for word in scaled_down(argv)]
        standins.provide(run.sandbox, command_inputs(argv), run.produced)
        _run_command(argv, run.sandbox)
        run.produced.update(command_outputs(argv))


def _run_command(argv: list[str], sandbox: Path) -> None:
    shown = shlex.join(argv)
    if argv[0] == "franca-hf":
        from franca_hf.cli import main

        try:
            status = main(argv[1:])
        except SystemExit as exit_:  # argparse
            status = exit_.code
        assert status == 0, f"`{shown}` exited with {status} (its stderr is above)"
    elif argv[0] == "accelerate":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        launcher = str(Path(sys.executable).with_name("accelerate"))
        result = subprocess.run(
            [launcher, *argv[1:]], cwd=sandbox, env=env, capture_output=True, text=True, timeout=600
        )
        output = (result.stdout + result.stderr)[-4000:]
        assert result.returncode == 0, f"`{shown}` exited with {result.returncode}:\n{output}"
    elif argv[0] in ("python", "python3") and argv[1].endswith(".py"):
        saved = sys.argv, list(sys.path), torch.get_num_threads()
        sys.argv, sys.path[0:0] = argv[1:], [str(Path(argv[1]).parent)]
        try:
            runpy.run_path(argv[1], run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (None, 0), f"`{shown}` exited with {exit_.code}"
        finally:
            sys.argv, sys.path[:] = saved[0], saved[1]
            torch.set_num_threads(saved[2])
    else:
        raise AssertionError(f'the docs tests have no runner for `{shown}`: add one, or mark the block skip="..."')


def test_the_collector_reads_blocks_commands_and_scale_downs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        'Text\n```bash skip="needs 8 GPUs"\naccelerate launch x\n```\n~~~python\nx = 1\n~~~\n```\noutput\n```\n'
        "  ```sh\n  .venv/bin/franca-hf knn --model m --max-images 2000 && franca-hf push f --repo-id a/b [--private]"
        " [--revision v1]  # a comment\n  franca-hf rasa model=m out=o \\\n      steps=8\n  ```\n"
    )
    gpu, python, shell = read_code_blocks(page)
    assert (gpu.id, gpu.skip_reason, python.id, python.source, shell.id) == (
        "page.md:2[bash]",
        "needs 8 GPUs",
        "page.md:5[python]",
        "x = 1\n",
        "page.md:11[bash]",
    )
    knn, push, rasa = shell_commands(shell.source)
    assert push == ["franca-hf", "push", "f", "--repo-id", "a/b"]
    assert scaled_down(["franca-hf", *knn[1:]])[3:] == ["m", "--max-images", "32", "--num-workers", "0"]
    assert scaled_down(rasa)[-6:] == SCALED_DOWN["rasa"].split()  # after the page's steps=8: they win
    assert command_inputs(rasa) == ["franca-hf", "rasa", "m", "8"]  # out=o is an output

"""transformers' own model-test mixins, from the source distribution of the installed transformers.

`load_common_tests()` downloads `transformers==<installed version>` as a source distribution from the package index
(`pip download --no-binary`), unpacks it once into a cache (`$FRANCA_HF_TRANSFORMERS_TESTS`, default
`~/.cache/franca_hf/transformers-tests/<version>`) and imports its `tests/` folder as the package
`transformers_tests`, so that `transformers_tests.test_modeling_common.ModelTesterMixin` and friends are the very
code transformers tests its own models with.

The source distribution ships the common test files but not three sibling modules they import. Those names are
provided here, and nothing else is changed:

* `exporters.test_export.ExportTesterMixin`: a base class of `ModelTesterMixin` that carries transformers' export
  tests. Their file (`tests/exporters/test_export.py`) is not in the source distribution and cannot be fetched here
  (no GitHub), so those tests do not run; here it is an empty base class. franca_hf's own export tests
  (`tests/modeling/test_export.py`: `torch.export`, ONNX with onnxruntime, `torch.compile`, and the installed
  `transformers.exporters.DynamoExporter`) take their place.
* `generation.test_utils.GenerationTesterMixin`: only used in `issubclass` checks for generative models.
* `utils.test_configuration_utils.config_common_kwargs`: non-default values of the attributes every
  `PreTrainedConfig` has, for `ConfigTester.check_config_arguments_init`.

`PipelineTesterMixin` loads its tiny models from `$TRANSFORMERS_TINY_MODEL_PATH` (set by `prepare_tiny_models`, a
local folder instead of the Hub) and its per-task test class from `tests.pipelines`, which resolves to this
project's `tests/pipelines` (the source distribution does not ship transformers' own).
"""

import importlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"
COMMON_FILES = ("test_modeling_common.py", "test_backbone_common.py", "test_configuration_common.py")


class SuiteUnavailable(RuntimeError):
    """The source distribution could not be obtained (no package index, no cache)."""


def cache_root() -> Path:
    default = Path.home() / ".cache" / "franca_hf" / "transformers-tests" / transformers.__version__
    return Path(os.environ.get("FRANCA_HF_TRANSFORMERS_TESTS", default))


def source_tree() -> Path:
    """The unpacked `transformers-<version>` source tree (downloaded and unpacked on first use)."""
    version = transformers.__version__
    root = cache_root()
    tree = root / f"transformers-{version}"
    if all((tree / "tests" / name).is_file() for name in (*COMMON_FILES, "__init__.py")):
        link_installed_sources(tree)
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as staging:
        command = [
            sys.executable, "-m", "pip", "download", f"transformers=={version}",
            "--no-binary", ":all:", "--no-deps", "--quiet", "--dest", staging,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        archives = list(Path(staging).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise SuiteUnavailable(
                f"Could not download the transformers {version} source distribution from the package index "
                f"(`{' '.join(command[2:])}` exited {result.returncode}: {result.stderr.strip()[-500:]})."
            )
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(f"transformers-{version}/tests/")]
            archive.extractall(staging, members=members, filter="data")
        unpacked = Path(staging) / f"transformers-{version}"
        # the repository's tests/ is a package with an empty __init__.py (test_configuration_common imports it)
        (unpacked / "tests" / "__init__.py").touch()
        (unpacked / "src").mkdir()
        link_installed_sources(unpacked)
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(unpacked, tree)
    return tree


def link_installed_sources(tree: Path) -> None:
    """Point `tree/src/transformers` at the transformers package of this interpreter: test_pipeline_mixin imports the
    sources next to its tests, the installed package being the same files. The cache is shared by every environment
    with this version, so a link left by another one (whose environment may since be deleted) is replaced, atomically.
    """
    link, installed = tree / "src" / "transformers", Path(transformers.__file__).parent
    if link.is_symlink() and link.resolve() == installed.resolve():
        return
    staging = link.with_name(f".transformers-{os.getpid()}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(installed, target_is_directory=True)
    os.replace(staging, link)


def _provide(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


class ExportTesterMixin:
    """Stands in for transformers' export tests (see the module docstring)."""


class GenerationTesterMixin:
    """Franca does not generate; transformers only checks subclassing of this marker."""


# Non-default values of every attribute of a 5.x `PreTrainedConfig()` that a caller may set.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["FrancaModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


def load_common_tests() -> types.ModuleType:
    """Import the source distribution's `tests/` as `transformers_tests` (cached across calls)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    tree = source_tree()
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True))
    package.__path__ = [str(tree / "tests")]
    sys.modules[PACKAGE] = package
    for name in ("exporters", "generation", "utils"):
        _provide(f"{PACKAGE}.{name}", __path__=[])
    _provide(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _provide(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _provide(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    return package


def prepare_tiny_models(root: Path, models: dict) -> Path:
    """Write tiny models where `PipelineTesterMixin` looks for them and point it there.

    Args:
        root: a folder to create (`<root>/reports/tiny_model_summary.json`, `<root>/<model_type>/<ClassName>/`).
        models: class -> (model instance, image processor) to save.
    """
    summary = {}
    for model_class, (model, processor) in models.items():
        folder = root / model.config.model_type / model_class.__name__
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        summary[model_class.__name__] = {
            "tokenizer_classes": [],
            "processor_classes": [type(processor).__name__],
            "model_classes": [model_class.__name__],
        }
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "tiny_model_summary.json").write_text(json.dumps(summary))
    os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(root)
    return root

"""FrancaModel and FrancaBackbone under transformers' own model test suite.

Shaped like transformers' `tests/models/dinov2/test_modeling_dinov2.py`: the same tester layout, the same mixins
(`ModelTesterMixin`, `PipelineTesterMixin`, `BackboneTesterMixin`, `ConfigTester`, loaded from the transformers
source distribution, see `transformers_suite.py`) and only the skips that file has. Every test runs twice: without
and with RASA weights. The pipeline tests run on tiny local models saved by this module.
"""

import atexit
import os
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.testing_utils import torch_device

from franca_hf import FrancaBackbone, FrancaConfig, FrancaModel
from franca_hf.modeling.image_processing_franca import make_image_processor

from .transformers_suite import SuiteUnavailable, link_installed_sources, load_common_tests, prepare_tiny_models

try:
    load_common_tests()
except SuiteUnavailable as error:  # a failure, not a skip: this suite is how the model is held to transformers' own
    if os.environ.get("FRANCA_HF_SKIP_TRANSFORMERS_SUITE") != "1":
        pytest.fail(
            f"transformers' model test suite is unavailable: {error} (it is downloaded from the package index; "
            "offline, set FRANCA_HF_SKIP_TRANSFORMERS_SUITE=1 to skip it)",
            pytrace=False,
        )
    pytest.skip(f"transformers' model test suite is unavailable: {error}", allow_module_level=True)


class FrancaModelTester:
    def __init__(
        self,
        parent,
        batch_size=13,
        image_size=30,
        patch_size=2,
        num_channels=3,
        is_training=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=0.02,
        attn_implementation="eager",
        mask_ratio=0.5,
        rasa_steps=0,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.initializer_range = initializer_range
        self.attn_implementation = attn_implementation
        self.mask_ratio = mask_ratio
        self.rasa_steps = rasa_steps

        # the sequence is the CLS token and the patches
        num_patches = (image_size // patch_size) ** 2
        self.seq_length = num_patches + 1
        self.num_masks = int(self.mask_ratio * self.seq_length)
        self.mask_length = num_patches

    def prepare_config_and_inputs(self):
        from transformers_tests.test_modeling_common import floats_tensor

        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def get_config(self):
        return FrancaConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            position_grid_size=self.image_size // self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            initializer_range=self.initializer_range,
            rasa_steps=self.rasa_steps,
            attn_implementation=self.attn_implementation,
        )

    def create_and_check_model(self, config, pixel_values):
        model = FrancaModel(config=config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))

    def create_and_check_backbone(self, config, pixel_values):
        model = FrancaBackbone(config=config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), len(config.out_indices))
        expected_size = self.image_size // config.patch_size
        self.parent.assertListEqual(
            list(result.feature_maps[0].shape), [self.batch_size, model.channels[0], expected_size, expected_size]
        )
        self.parent.assertEqual(len(model.channels), len(config.out_indices))

        # without out_indices: the last stage
        config.out_indices = None
        model = FrancaBackbone(config=config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertListEqual(
            list(result.feature_maps[0].shape), [self.batch_size, model.channels[0], expected_size, expected_size]
        )
        self.parent.assertEqual(len(model.channels), 1)

        # without the final LayerNorm and the reshape: all tokens, CLS included (as Dinov2Backbone)
        config.apply_layernorm = False
        config.reshape_hidden_states = False
        model = FrancaBackbone(config=config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertListEqual(
            list(result.feature_maps[0].shape), [self.batch_size, self.seq_length, self.hidden_size]
        )

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


# The pipeline mixin reads where its tiny models are when it is imported: save them first.
_TINY_MODELS = Path(tempfile.mkdtemp(prefix="franca-tiny-models-"))
atexit.register(shutil.rmtree, _TINY_MODELS, ignore_errors=True)
_tiny_config = FrancaModelTester(None, image_size=28, patch_size=14, rasa_steps=2).get_config()
prepare_tiny_models(_TINY_MODELS, {FrancaModel: (FrancaModel(_tiny_config), make_image_processor(28, 32))})

from transformers_tests.test_backbone_common import BackboneTesterMixin  # noqa: E402
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin  # noqa: E402
from transformers_tests.test_pipeline_mixin import PipelineTesterMixin  # noqa: E402


class FrancaModelTest(ModelTesterMixin, PipelineTesterMixin, unittest.TestCase):
    """Here we also overwrite some of the tests of test_modeling_common.py, as Franca does not use input_ids,
    inputs_embeds, attention_mask and seq_length."""

    all_model_classes = (FrancaModel, FrancaBackbone)
    pipeline_model_mapping = {"image-feature-extraction": FrancaModel}
    rasa_steps = 0

    test_resize_embeddings = False

    @classmethod
    def setUpClass(cls):
        # The suite recognises base models (no loss, no training tests) by transformers' in-tree model tables, where
        # Dinov2Model is listed; Franca registers with the Auto classes at run time. List it there too, as Dinov2.
        for table, name in ((MODEL_MAPPING_NAMES, "FrancaModel"), (MODEL_FOR_BACKBONE_MAPPING_NAMES, "FrancaBackbone")):
            patch = mock.patch.dict(table, {FrancaConfig.model_type: name})
            patch.start()
            cls.addClassCleanup(patch.stop)

    def setUp(self):
        self.model_tester = FrancaModelTester(self, rasa_steps=self.rasa_steps)
        self.config_tester = ConfigTester(
            self, config_class=FrancaConfig, has_text_modality=False, hidden_size=36, num_attention_heads=4
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="Franca does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Franca does not support feedforward chunking")
    def test_feed_forward_chunking(self):
        pass

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsNotNone(model.get_input_embeddings())
            self.assertIsNone(model.get_output_embeddings())

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())


class FrancaModelWithRasaTest(FrancaModelTest):
    rasa_steps = 3


class FrancaBackboneTest(unittest.TestCase, BackboneTesterMixin):
    all_model_classes = (FrancaBackbone,)
    config_class = FrancaConfig
    has_attentions = False
    rasa_steps = 0

    def setUp(self):
        self.model_tester = FrancaModelTester(self, rasa_steps=self.rasa_steps)


class FrancaBackboneWithRasaTest(FrancaBackboneTest):
    rasa_steps = 3


def test_a_cached_tree_is_linked_to_this_environments_transformers(tmp_path):
    """The unpacked tests are cached per transformers version, for every environment: a link to the sources of
    another environment, deleted since (a CI run's), is replaced by one to this interpreter's package."""
    import transformers

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "transformers").symlink_to(tmp_path / "deleted-venv" / "transformers")
    link_installed_sources(tmp_path)
    assert (tmp_path / "src" / "transformers").resolve() == Path(transformers.__file__).parent.resolve()
    assert (tmp_path / "src" / "transformers" / "__init__.py").is_file()
    assert [p.name for p in (tmp_path / "src").iterdir()] == ["transformers"]  # no staging link left

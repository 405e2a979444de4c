"""The per-task class `PipelineTesterMixin.test_pipeline_image_feature_extraction` looks up as
`tests.pipelines.test_pipelines_image_feature_extraction.ImageFeatureExtractionPipelineTests`.

transformers' own class of that name is not part of its source distribution; this one plays its role for Franca
(see `tests/modeling/test_transformers_suite.py`): it builds the pipeline around the mixin's tiny model and checks
that the pipeline returns the model's own outputs, one per image, with and without pooling.
"""

import torch
from PIL import Image
from transformers import ImageFeatureExtractionPipeline

from ..conftest import EXAMPLE_IMAGES


class ImageFeatureExtractionPipelineTests:
    def get_test_pipeline(
        self, model, tokenizer=None, image_processor=None, feature_extractor=None, processor=None, dtype="float32"
    ):
        extractor = ImageFeatureExtractionPipeline(
            model=model, image_processor=image_processor, processor=processor, dtype=dtype
        )
        images = [Image.open(EXAMPLE_IMAGES / name).convert("RGB") for name in ("coffee.jpg", "astronaut.jpg")]
        return extractor, images

    def run_pipeline_test(self, extractor, images):
        model, processor = extractor.model, extractor.image_processor
        pixels = processor(images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
        with torch.no_grad():
            expected = model(pixels)
        tokens = extractor(images[0], return_tensors=True)
        pooled = extractor(images, return_tensors=True, pool=True)
        assert tokens.shape == (1, *expected.last_hidden_state.shape[1:])
        torch.testing.assert_close(tokens[0], expected.last_hidden_state[0])
        assert len(pooled) == 2
        torch.testing.assert_close(torch.cat(pooled), expected.pooler_output)
        as_lists = extractor(images)
        assert len(as_lists) == 2 and len(as_lists[0][0]) == expected.last_hidden_state.shape[1]

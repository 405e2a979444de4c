"""The authors' evaluation transform as a transformers image processor, beside the model it feeds (as transformers
places `image_processing_*.py` beside `modeling_*.py`), and the ImageNet statistics every Franca transform uses.

Not copied into model folders: a folder holds the processor's `preprocessor_config.json`, which `AutoImageProcessor`
reads without this module.
"""

from transformers import BitImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

IMAGENET_MEAN = tuple(IMAGENET_DEFAULT_MEAN)  # (0.485, 0.456, 0.406)
IMAGENET_STD = tuple(IMAGENET_DEFAULT_STD)  # (0.229, 0.224, 0.225)
# Crops below this side (the demo's 32-px synthetic images) are not given the 256/224 border: it would cut several
# of their few pixels, and the images were drawn at the crop size.
SMALL_CROP = 64


def make_image_processor(crop_size: int = 224, resize_size: int | None = None) -> BitImageProcessor:
    """The authors' evaluation transform: resize the shorter side (bicubic), center crop, ImageNet mean/std.

    `resize_size` defaults to `crop_size * 256 / 224` (256 for 224-px crops), and to `crop_size` itself for crops
    under `SMALL_CROP` pixels.
    """
    resize_size = resize_size or (crop_size if crop_size < SMALL_CROP else round(crop_size * 256 / 224))
    return BitImageProcessor(
        size={"shortest_edge": resize_size},
        crop_size={"height": crop_size, "width": crop_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )

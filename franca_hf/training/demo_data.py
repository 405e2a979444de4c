"""Moved to `franca_hf.data.demo`; this name stays importable."""

from ..data.demo import DEMO_CLASSES, DEMO_IMAGE_SIZE, generate_demo_images, load_demo_dataset

__all__ = ["DEMO_CLASSES", "DEMO_IMAGE_SIZE", "generate_demo_images", "load_demo_dataset"]

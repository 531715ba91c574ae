"""Image and video pipelines."""
from .sd_image import SDImagePipeline

__all__ = ["SDImagePipeline"]

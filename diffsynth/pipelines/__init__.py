"""Image and video pipelines."""
from .sd_image import SDImagePipeline
from .sd_video import SDVideoPipeline

__all__ = ["SDImagePipeline", "SDVideoPipeline"]

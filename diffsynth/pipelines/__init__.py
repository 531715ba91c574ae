"""Image and video pipelines and the resumable config runner."""
from .runner import SDVideoPipelineRunner
from .sd_image import SDImagePipeline
from .sdxl_image import SDXLImagePipeline
from .sd_video import SDVideoPipeline

__all__ = ["SDImagePipeline", "SDXLImagePipeline", "SDVideoPipeline", "SDVideoPipelineRunner"]

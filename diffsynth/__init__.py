"""DiffSynth Studio, disk-cache edition.

``from diffsynth import ModelManager, SDImagePipeline, ...`` as in DiffSynth-Studio.
"""
from .controlnets import Annotator, ControlNetConfigUnit, ControlNetUnit, MultiControlNetManager
from .models import *  # noqa: F401,F403  (the original's public names)
from .models import __all__ as _models_all
from .data import VideoData, crop_and_resize, save_frames, save_video
from .pipelines import SDImagePipeline, SDVideoPipeline, SDVideoPipelineRunner, SDXLImagePipeline
from .progress import ProgressEvent
from .prompts import BeautifulPrompt, SDPrompter, SDXLPrompter, Translator, tokenize_long_prompt
from .schedulers import EnhancedDDIMScheduler

__version__ = "0.1.0"
__all__ = [*_models_all, "Annotator", "ControlNetConfigUnit", "ControlNetUnit", "MultiControlNetManager", "SDImagePipeline", "SDXLImagePipeline", "SDVideoPipeline", "SDVideoPipelineRunner", "VideoData", "crop_and_resize", "save_frames", "save_video", "ProgressEvent", "SDPrompter", "SDXLPrompter", "BeautifulPrompt", "Translator", "tokenize_long_prompt", "EnhancedDDIMScheduler"]

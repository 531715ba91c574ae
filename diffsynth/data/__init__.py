"""Video and image-folder readers (lazy) and frame writers (streaming); see ``video.py``."""
from .images import crop_and_resize, natural_sort_key, search_for_images
from .video import LowMemoryImageFolder, LowMemoryVideo, UnreadableVideoError, VideoData
from .writers import save_frames, save_video

__all__ = [
    "VideoData",
    "save_video",
    "save_frames",
    "crop_and_resize",
    "search_for_images",
    "natural_sort_key",
    "LowMemoryVideo",
    "LowMemoryImageFolder",
    "UnreadableVideoError",
]

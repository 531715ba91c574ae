"""Networks, checkpoint conversion, detection and the model manager."""
from .errors import ModelFileError
from .model_manager import ModelManager
from .sd_controlnet import ControlNetConfig, SDControlNet
from .sd_motion import MotionModuleConfig, SDMotionModel
from .sd_text_encoder import CLIPTextConfig, SDTextEncoder
from .sd_unet import SDUNet, SDUNetConfig
from .sd_vae import SDVAEConfig, SDVAEDecoder, SDVAEEncoder
from .sdxl_text_encoder import OpenCLIPTextConfig, SDXLTextEncoder, SDXLTextEncoder2
from .sdxl_unet import SDXLUNet, SDXLVAEDecoder, SDXLVAEEncoder
from .state_dict import load_state_dict

__all__ = [
    "CLIPTextConfig",
    "ControlNetConfig",
    "SDControlNet",
    "ModelFileError",
    "ModelManager",
    "MotionModuleConfig",
    "SDMotionModel",
    "SDTextEncoder",
    "SDUNet",
    "SDUNetConfig",
    "SDVAEConfig",
    "SDVAEDecoder",
    "SDVAEEncoder",
    "OpenCLIPTextConfig",
    "SDXLTextEncoder",
    "SDXLTextEncoder2",
    "SDXLUNet",
    "SDXLVAEDecoder",
    "SDXLVAEEncoder",
    "load_state_dict",
]

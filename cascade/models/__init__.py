"""Models with the reference's names, configs and checkpoint keys."""
from .autoencoders import AutoencoderKL, VQModel
from .prior_transformer import PriorTransformer
from .text_proj import UnCLIPTextProjModel
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel
from .wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

__all__ = ["AutoencoderKL", "PaellaVQModel", "PriorTransformer", "UNet2DConditionModel", "UNet2DModel",
           "UnCLIPTextProjModel", "VQModel", "WuerstchenDiffNeXt", "WuerstchenPrior"]

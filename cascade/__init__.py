"""cascade: cascaded text-to-image diffusion (Kandinsky 2.2, unCLIP/Karlo, Würstchen v2, SD x2 latent
upscaler) with the reference library's API and checkpoints. Names load on first use, so `import cascade`
stays fast."""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "cascade.pipelines.core": ["DiffusionPipeline", "ImagePipelineOutput"],
    "cascade.pipelines.auto": ["AutoPipelineForText2Image", "AutoPipelineForImage2Image", "AutoPipelineForInpainting"],
    "cascade.pipelines.kandinsky": [
        "KandinskyPriorPipelineOutput", "KandinskyV22PriorPipeline", "KandinskyV22PriorEmb2EmbPipeline",
        "KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline", "KandinskyV22InpaintPipeline",
        "KandinskyV22ControlnetPipeline", "KandinskyV22ControlnetImg2ImgPipeline", "KandinskyV22CombinedPipeline",
        "KandinskyV22Img2ImgCombinedPipeline", "KandinskyV22InpaintCombinedPipeline",
    ],
    "cascade.pipelines.wuerstchen": [
        "WuerstchenPriorPipeline", "WuerstchenDecoderPipeline", "WuerstchenCombinedPipeline",
        "WuerstchenPriorPipelineOutput", "DEFAULT_STAGE_C_TIMESTEPS",
    ],
    "cascade.pipelines.unclip": ["UnCLIPPipeline", "UnCLIPImageVariationPipeline"],
    "cascade.pipelines.latent_upscale": ["StableDiffusionLatentUpscalePipeline", "StableDiffusionPipelineOutput"],
    "cascade.models": ["UNet2DConditionModel", "UNet2DModel", "UnCLIPTextProjModel", "VQModel", "PriorTransformer",
                       "AutoencoderKL", "WuerstchenPrior", "WuerstchenDiffNeXt", "PaellaVQModel"],
    "cascade.schedulers": ["DDPMScheduler", "DDIMScheduler", "UnCLIPScheduler", "DDPMWuerstchenScheduler",
                           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                           "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'cascade' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

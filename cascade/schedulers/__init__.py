"""Noise schedulers with the reference's API and `scheduler_config.json` format."""
from .base import Scheduler, SchedulerOutput, randn_tensor
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from .unclip import UnCLIPScheduler
from .wuerstchen import DDPMWuerstchenScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "DDPMWuerstchenScheduler", "DPMSolverMultistepScheduler",
           "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "Scheduler",
           "SchedulerOutput", "UnCLIPScheduler", "UniPCMultistepScheduler", "randn_tensor"]

# The short sampler names people know (AUTOMATIC1111, ComfyUI): the class, and what its config changes.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "use_karras_sigmas": False}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                       "use_karras_sigmas": True}),
    "dpm++sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unclip": ("UnCLIPScheduler", {}),
    "wuerstchen": ("DDPMWuerstchenScheduler", {}),
}


def scheduler_for(name: str, config) -> Scheduler:
    """The sampler `name` (a key of SAMPLERS) on the noise schedule of `config` (another scheduler's config);
    keys the class does not have are ignored, as `X.from_config(other.config)` does."""
    import sys

    if name not in SAMPLERS:
        raise ValueError(f"scheduler: unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    class_name, overrides = SAMPLERS[name]
    cls = getattr(sys.modules[__name__], class_name, None)
    if cls is None:
        raise ValueError(f"scheduler: {name!r} ({class_name}) is not available in this version of cascade")
    return cls.from_config(config, **overrides)


def samplers_for(pipeline) -> list[str]:
    """The sampler names a pipeline (or pipeline class) takes for its main denoising stage: Würstchen runs
    only its own continuous-time DDPM; every other family runs any sampler over its discrete beta schedule
    (unCLIP also its own UnCLIPScheduler)."""
    name = pipeline.__name__ if isinstance(pipeline, type) else type(pipeline).__name__
    if name.startswith("Wuerstchen"):
        return ["wuerstchen"]
    general = [n for n in SAMPLERS if n not in ("unclip", "wuerstchen")]
    return general + ["unclip"] if name.startswith("UnCLIP") else general

"""Noise schedulers with the reference's API and `scheduler_config.json` format."""
from .base import Scheduler, SchedulerOutput, randn_tensor
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .euler import EulerDiscreteScheduler
from .unclip import UnCLIPScheduler
from .wuerstchen import DDPMWuerstchenScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "DDPMWuerstchenScheduler", "EulerDiscreteScheduler", "Scheduler",
           "SchedulerOutput", "UnCLIPScheduler", "randn_tensor"]

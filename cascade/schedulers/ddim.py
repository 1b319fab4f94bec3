"""DDIM: the non-Markovian sampler of Song et al. (2021); eta interpolates to DDPM."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import ClipConfig, Plan, Scheduler, spaced_timesteps


@dataclasses.dataclass(frozen=True)
class DDIMSchedulerConfig(ClipConfig):
    set_alpha_to_one: bool = True


class DDIMScheduler(Scheduler):
    config_class = DDIMSchedulerConfig

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if not self.config.set_alpha_to_one:
            self.final_alpha_cumprod = self.alphas_cumprod[0]

    def plan(self, num_inference_steps: int, device=None) -> Plan:
        T = self.config.num_train_timesteps
        if num_inference_steps > T:
            raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than {T}, the "
                             "number of timesteps the model was trained with.")
        ts = torch.from_numpy(spaced_timesteps(self.config, num_inference_steps).astype(np.int64))
        return Plan(ts.to(device), self.levels_for(ts), num_inference_steps=num_inference_steps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' first")
        prev, x0 = self.transition(model_output, timestep, self.num_inference_steps, sample, eta,
                                   use_clipped_model_output, generator, variance_noise)
        return self.output(prev, x0, return_dict)

    def update(self, plan, out, i, x, generator=None, eta: float = 0.0, **_):
        return self.transition(out[:, : x.shape[1]], plan.timesteps[i], plan.num_inference_steps, x, eta,
                               False, generator, None)

    def transition(self, model_output, timestep, n, sample, eta, use_clipped_model_output, generator,
                   variance_noise):
        a_t = self.alpha_bar(timestep)
        a_prev = self.alpha_bar(timestep - self.config.num_train_timesteps // n)
        x0, eps = self.x0_and_eps(model_output, sample, a_t)
        x0 = self.clip(x0)
        # Song et al. (2021) eq. 16: sigma_t = eta * sqrt(beta_tilde_t).
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        if use_clipped_model_output:
            eps = (sample - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise.")
            if variance_noise is None:
                variance_noise = self.noise_like(model_output, generator)
            prev = prev + std * variance_noise
        return prev, x0

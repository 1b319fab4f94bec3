"""DDPM: ancestral sampling of Ho et al. (2020), with the variance choices of Nichol & Dhariwal (2021)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import ClipConfig, Plan, Scheduler, posterior_std, spaced_timesteps

LEARNED = ("learned", "learned_range")


@dataclasses.dataclass(frozen=True)
class DDPMSchedulerConfig(ClipConfig):
    variance_type: str = "fixed_small"

    choices = {**ClipConfig.choices,
               "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", *LEARNED)}


class DDPMScheduler(Scheduler):
    config_class = DDPMSchedulerConfig

    def plan(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> Plan:
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            if list(timesteps) != sorted(set(timesteps), reverse=True) or timesteps[0] >= T:
                raise ValueError(f"`timesteps` must be strictly descending and start below {T}.")
            steps = np.array(timesteps, dtype=np.int64)
        else:
            if num_inference_steps > T:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than {T}, "
                                 "the number of timesteps the model was trained with.")
            steps = spaced_timesteps(self.config, num_inference_steps).astype(np.int64)
        ts = torch.from_numpy(steps)
        prev = torch.cat([ts[1:], torch.tensor([-1])])
        return Plan(ts.to(device), self.levels_for(ts), num_inference_steps=num_inference_steps,
                    memory={"prev": prev})

    def previous_timestep(self, timestep):
        plan = getattr(self, "_plan", None)
        if plan is None:
            return timestep - 1
        i = (plan.timesteps == timestep).nonzero(as_tuple=True)[0][0]
        return plan.memory["prev"][i]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        prev, x0 = self.transition(model_output, timestep, self.previous_timestep(timestep), sample, generator)
        return self.output(prev, x0, return_dict)

    def update(self, plan, out, i, x, generator=None, **_):
        return self.transition(out, plan.timesteps[i], plan.memory["prev"][i], x, generator)

    def transition(self, model_output, t, t_prev, sample, generator):
        """The posterior step from t to t_prev."""
        kind = self.config.variance_type
        predicted = None
        if kind in LEARNED and model_output.shape[1] == 2 * sample.shape[1]:
            model_output, predicted = torch.split(model_output, sample.shape[1], dim=1)
        model_output = model_output[:, : sample.shape[1]]
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        alpha = a_t / a_prev
        beta = 1 - alpha
        x0 = self.clip(self.x0_and_eps(model_output, sample, a_t)[0])
        # Mean of the posterior q(x_{t-1} | x_t, x0), Ho et al. (2020) eq. 7.
        prev = (a_prev**0.5 * beta) / (1 - a_t) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a_t) * sample
        if t > 0:
            noise = self.noise_like(model_output, generator)
            var = torch.clamp((1 - a_prev) / (1 - a_t) * beta, min=1e-20)
            prev = prev + posterior_std(var, beta, kind, predicted) * noise
        return prev, x0

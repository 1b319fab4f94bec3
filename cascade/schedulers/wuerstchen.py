"""Würstchen's DDPM on a continuous cosine schedule; timesteps are floats in [0, 1]."""
from __future__ import annotations

import dataclasses

import torch

from ..config import Config
from .base import Plan, Scheduler, randn_tensor


@dataclasses.dataclass(frozen=True)
class DDPMWuerstchenSchedulerConfig(Config):
    scaler: float = 1.0
    s: float = 0.008


class DDPMWuerstchenScheduler(Scheduler):
    config_class = DDPMWuerstchenSchedulerConfig

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """Nichol & Dhariwal (2021) eq. 17 on continuous t, with t warped by `scaler`, kept off 0 and 1."""
        scaler = self.config.scaler
        if scaler > 1:
            t = 1 - (1 - t) ** scaler
        elif scaler < 1:
            t = t**scaler
        s = torch.tensor([self.config.s], device=t.device)
        f0 = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
        return (torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / f0).clamp(0.0001, 0.9999)

    def alphas_for(self, timesteps, like):
        return self.alpha_bar(timesteps.to(like.device))

    def schedule(self, num_inference_steps=None, timesteps=None, device=None) -> torch.Tensor:
        if timesteps is None:
            timesteps = torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.Tensor(timesteps).to(device)
        return timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps=None, device=None):
        self.timesteps = self.schedule(num_inference_steps, timesteps, device)

    def plan(self, num_inference_steps=None, device=None, timesteps=None) -> Plan:
        # The last timestep (0) is only the target of the final step.
        ts = self.schedule(num_inference_steps, timesteps, device)
        return Plan(ts[:-1], num_inference_steps=len(ts) - 1, memory={"prev": ts[1:]})

    def previous_timestep(self, t: torch.Tensor) -> torch.Tensor:
        i = (self.timesteps - t[0]).abs().argmin().item()
        return self.timesteps[i + 1][None].expand(t.shape[0])

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        prev = self.transition(model_output, timestep, self.previous_timestep(timestep), sample, generator)
        return self.output(prev, None, return_dict)

    def update(self, plan, out, i, x, generator=None, **_):
        t, t_prev = (plan.timesteps[i: i + 1].expand(x.shape[0]), plan.memory["prev"][i: i + 1].expand(x.shape[0]))
        return self.transition(out, t, t_prev, x, generator), None

    def transition(self, model_output, timestep, t_prev, sample, generator):
        shape = (timestep.shape[0], *[1] * (sample.ndim - 1))
        a_t, a_prev = self.alpha_bar(timestep).view(shape), self.alpha_bar(t_prev).view(shape)
        alpha = a_t / a_prev
        mu = (1.0 / alpha).sqrt() * (sample - (1 - alpha) * model_output / (1 - a_t).sqrt())
        noise = randn_tensor(mu.shape, generator, model_output.device, model_output.dtype)
        std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt() * noise
        prev = mu + std * (t_prev != 0).float().view(shape)  # no noise on the step that lands on 0
        return prev.to(model_output.dtype)

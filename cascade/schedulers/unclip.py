"""UnCLIP: DDPM on the cosine schedule, stepping between any two timesteps the caller names."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import Config
from .base import Plan, Scheduler, posterior_std


@dataclasses.dataclass(frozen=True)
class UnCLIPSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    variance_type: str = "fixed_small_log"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"

    choices = {"variance_type": ("fixed_small_log", "learned_range"),
               "prediction_type": ("epsilon", "sample"), "beta_schedule": ("squaredcos_cap_v2",)}


class UnCLIPScheduler(Scheduler):
    config_class = UnCLIPSchedulerConfig

    def plan(self, num_inference_steps: int, device=None) -> Plan:
        # Evenly spaced over [0, T - 1], both ends included.
        n = num_inference_steps
        if n < 2:  # both ends are included, so one step has no spacing (the reference divides by zero)
            raise ValueError(f"num_inference_steps must be at least 2 for UnCLIPScheduler, got {n}")
        ratio = (self.config.num_train_timesteps - 1) / (n - 1)
        ts = torch.from_numpy((np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64))
        return Plan(ts.to(device), self.levels_for(ts), num_inference_steps=n)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, prev_timestep=None,
             generator=None, return_dict: bool = True):
        return self.output(*self.transition(model_output, timestep, sample, prev_timestep, generator), return_dict)

    def update(self, plan, out, i, x, generator=None, **_):
        nxt = plan.timesteps[i + 1] if i + 1 < len(plan.timesteps) else None
        return self.transition(out, plan.timesteps[i], x, nxt, generator)

    def transition(self, model_output, t, sample, prev_timestep, generator):
        """The posterior step from t to `prev_timestep` (t - 1 when not given)."""
        kind = self.config.variance_type
        predicted = None
        if kind == "learned_range" and model_output.shape[1] == 2 * sample.shape[1]:
            model_output, predicted = torch.split(model_output, sample.shape[1], dim=1)
        model_output = model_output[:, : sample.shape[1]]
        t_prev = t - 1 if prev_timestep is None else prev_timestep
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        if t_prev == t - 1:  # the table's own betas, for bit-parity with the reference
            beta, alpha = self.betas[t], self.alphas[t]
        else:
            beta = 1 - a_t / a_prev
            alpha = 1 - beta
        x0 = self.clip(self.x0_and_eps(model_output, sample, a_t)[0])
        prev = (a_prev**0.5 * beta) / (1 - a_t) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a_t) * sample
        if t > 0:
            noise = self.noise_like(model_output, generator)
            var = (1 - a_prev) / (1 - a_t) * beta
            var = torch.clamp(var, min=1e-20) if kind == "fixed_small_log" else var
            prev = prev + posterior_std(var, beta, kind, predicted) * noise
        return prev, x0

"""Samplers over sigma = sqrt((1 - alpha_bar) / alpha_bar), x kept at x0 + sigma * noise: Euler and Heun
(Karras et al. 2022, algorithms 1 and 2) and Euler ancestral (k-diffusion's `sample_euler_ancestral`)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import Config
from .base import BetaConfig, Plan, Scheduler, spaced_timesteps, table_sigmas


@dataclasses.dataclass(frozen=True)
class SigmaConfig(BetaConfig):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    choices = {**BetaConfig.choices, "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None)}


@dataclasses.dataclass(frozen=True)
class EulerDiscreteSchedulerConfig(SigmaConfig):
    interpolation_type: str = "linear"
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    choices = {**SigmaConfig.choices, "interpolation_type": ("linear",), "timestep_type": ("discrete",),
               "final_sigmas_type": ("zero",)}


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteSchedulerConfig(BetaConfig):
    timestep_spacing: str = "linspace"


@dataclasses.dataclass(frozen=True)
class HeunDiscreteSchedulerConfig(Config):
    """The reference's Heun has no zero-SNR rescaling, so it does not share BetaConfig's fields."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    choices = SigmaConfig.choices


def karras_sigmas(sigmas: np.ndarray, n: int, sigma_min=None, sigma_max=None, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: interpolate sigma^(1/rho) linearly between the extremes."""
    lo = (sigma_min if sigma_min is not None else sigmas[-1].item()) ** (1 / rho)
    hi = (sigma_max if sigma_max is not None else sigmas[0].item()) ** (1 / rho)
    return (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of a sigma, interpolating log-sigma between table entries."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.cumsum(log_sigma - log_sigmas[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def x0_of(kind: str, out: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """The model's clean-sample estimate at noise level sigma, x at scale sqrt(sigma^2 + 1)."""
    if kind == "sample":
        return out
    if kind == "epsilon":
        return x - sigma * out
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


class SigmaScheduler(Scheduler):
    """What the sigma samplers share: the sigma table, the schedule, input scaling and noising."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24  # keep sigma finite at the zero-SNR end
        self.sigmas = torch.cat([torch.from_numpy(table_sigmas(self.alphas_cumprod)).flip(0), torch.zeros(1)])
        T = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).float()

    @property
    def init_noise_sigma(self):
        return self.init_sigma(None)

    def init_sigma(self, plan):
        sigma = (self.sigmas if plan is None else plan.sigmas).max()
        return sigma if self.config.timestep_spacing in ("linspace", "trailing") else (sigma**2 + 1) ** 0.5

    def schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) of n steps, on Karras et al.'s spacing if asked."""
        t = spaced_timesteps(self.config, n, rounded=False).astype(np.float32)
        table = table_sigmas(self.alphas_cumprod)
        sigmas = np.interp(t, np.arange(0, len(table)), table)
        if self.config.get("use_karras_sigmas"):
            sigmas = karras_sigmas(sigmas, n, self.config.get("sigma_min"), self.config.get("sigma_max"))
            t = np.array([sigma_to_t(s, np.log(table)) for s in sigmas])
        return t, sigmas

    def plan(self, num_inference_steps: int, device=None) -> Plan:
        t, sigmas = self.schedule(num_inference_steps)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32))
        return Plan(torch.from_numpy(t.astype(np.float32)).to(device), sigmas[:-1], sigmas,
                    num_inference_steps=num_inference_steps)

    def scale(self, plan, x, i):
        return x / ((plan.levels[i] ** 2 + 1) ** 0.5)

    @staticmethod
    def mix(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0 + noise * sigma

    def noise_to(self, plan, x0, noise, i):
        return self.mix(x0, noise, plan.levels[i].to(x0.device, x0.dtype))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The stateful API's noising: the level of `timesteps` in the schedule, or of the begin index."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        if self.begin_index is None:
            schedule = self.timesteps.to(original_samples.device)
            index = []
            for t in timesteps.to(original_samples.device):
                hits = (schedule == t).nonzero()
                index.append(hits[1 if len(hits) > 1 else 0].item())
        else:
            index = [self.step_index if self.step_index is not None else self.begin_index] * timesteps.shape[0]
        sigma = sigmas[index].flatten().view(-1, *[1] * (original_samples.ndim - 1))
        return self.mix(original_samples, noise, sigma)

    rejects_integer_timesteps = False

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if self.rejects_integer_timesteps and isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(f"{type(self).__name__}.step takes one of `scheduler.timesteps`, not an index.")
        return super().step(model_output, timestep, sample, *args, **kwargs)


class EulerDiscreteScheduler(SigmaScheduler):
    config_class = EulerDiscreteSchedulerConfig
    rejects_integer_timesteps = True  # its timesteps are floats: an integer is a loop index passed by mistake

    def update(self, plan, out, i, x, generator=None, s_churn: float = 0.0, s_tmin: float = 0.0,
               s_tmax: float = float("inf"), s_noise: float = 1.0, **_):
        out, sigma, sample = out[:, : x.shape[1]], plan.sigmas[i], x.to(torch.float32)  # no learned variance
        # Churn: raise the noise level to sigma_hat by adding fresh noise before the Euler step.
        gamma = min(s_churn / (len(plan.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = self.noise_like(out, generator)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        kind = self.config.prediction_type
        x0 = x0_of(kind, out, sample, sigma_hat if kind == "epsilon" else sigma)
        prev = sample + (sample - x0) / sigma_hat * (plan.sigmas[i + 1] - sigma_hat)
        return prev.to(out.dtype), x0


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler down to sigma_down, then fresh noise up to the next level (k-diffusion's ancestral step)."""

    config_class = EulerAncestralDiscreteSchedulerConfig
    rejects_integer_timesteps = True

    def update(self, plan, out, i, x, generator=None, **_):
        out, sigma, sigma_to, sample = out[:, : x.shape[1]], plan.sigmas[i], plan.sigmas[i + 1], x.to(torch.float32)
        x0 = x0_of(self.config.prediction_type, out, sample, sigma)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        # Clamped: from a huge first sigma (cosine schedules reach 2e4) rounding can make the difference < 0.
        sigma_down = (sigma_to**2 - sigma_up**2).clamp(min=0) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        prev = prev + self.noise_like(out, generator) * sigma_up
        return prev.to(out.dtype), x0


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun's second-order method: every level but the last is evaluated twice (Karras et al. algorithm 1)."""

    config_class = HeunDiscreteSchedulerConfig
    order = 2

    def plan(self, num_inference_steps: int, device=None) -> Plan:
        one = super().plan(num_inference_steps, device)
        t, s = one.timesteps, one.sigmas
        sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        return Plan(torch.cat([t[:1], t[1:].repeat_interleave(2)]), sigmas[:-1], sigmas,
                    num_inference_steps=num_inference_steps, order=2)

    def update(self, plan, out, i, x, generator=None, **_):
        memory, kind, out = plan.memory, self.config.prediction_type, out[:, : x.shape[1]]
        first = "dt" not in memory
        sigma, sigma_next = (plan.sigmas[i], plan.sigmas[i + 1]) if first else (plan.sigmas[i - 1], plan.sigmas[i])
        x0 = x0_of(kind, out, x, sigma if first else sigma_next)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            derivative, dt = (x - x0) / sigma, sigma_next - sigma
            memory.update(derivative=derivative, dt=dt, sample=x)
        else:
            derivative = (memory.pop("derivative") + (x - x0) / sigma_next) / 2
            dt, x = memory.pop("dt"), memory.pop("sample")
        return x + derivative * dt, x0

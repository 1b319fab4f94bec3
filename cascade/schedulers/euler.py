"""Euler sampler over sigma = sqrt((1 - alpha_bar) / alpha_bar): Karras et al. (2022), algorithm 2."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import BetaConfig, Scheduler, spaced_timesteps


@dataclasses.dataclass(frozen=True)
class EulerDiscreteSchedulerConfig(BetaConfig):
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    choices = {**BetaConfig.choices, "interpolation_type": ("linear",), "timestep_type": ("discrete",),
               "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
               "final_sigmas_type": ("zero",)}


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


class EulerDiscreteScheduler(Scheduler):
    config_class = EulerDiscreteSchedulerConfig

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keep sigma finite at the zero-SNR end
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        T = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).float()
        self.step_index = self.begin_index = None

    @property
    def init_noise_sigma(self):
        sigma = self.sigmas.max()
        return sigma if self.config.timestep_spacing in ("linspace", "trailing") else (sigma**2 + 1) ** 0.5

    def set_begin_index(self, begin_index: int = 0):
        self.begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device=None):
        self.num_inference_steps = n = num_inference_steps
        t = spaced_timesteps(self.config, n, rounded=False).astype(np.float32)
        table = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        sigmas = np.interp(t, np.arange(0, len(table)), table)
        if self.config.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, n, self.config.sigma_min, self.config.sigma_max)
            t = np.array([sigma_to_t(s, np.log(table)) for s in sigmas])
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(t.astype(np.float32)).to(device)
        self.step_index = self.begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        hits = (schedule == timestep).nonzero()
        # The second hit if there are two, so a schedule entered mid-way (img2img) skips no sigma.
        return hits[1 if len(hits) > 1 else 0].item()

    def current_sigma(self, timestep):
        """The sigma of this step; the first call locates `timestep` in the schedule (or uses begin_index)."""
        if self.step_index is None and self.begin_index is not None:
            self.step_index = self.begin_index
        elif self.step_index is None:
            t = timestep.to(self.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
            self.step_index = self.index_for_timestep(t)
        return self.sigmas[self.step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        return sample / ((self.current_sigma(timestep) ** 2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("EulerDiscreteScheduler.step takes one of `scheduler.timesteps`, not an index.")
        sigma = self.current_sigma(timestep)
        sample = sample.to(torch.float32)
        # Churn: raise the noise level to sigma_hat by adding fresh noise before the Euler step.
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = self.noise_like(model_output, generator)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        kind = self.config.prediction_type
        if kind == "sample":
            x0 = model_output
        elif kind == "epsilon":
            x0 = sample - sigma_hat * model_output
        else:
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        prev = sample + (sample - x0) / sigma_hat * (self.sigmas[self.step_index + 1] - sigma_hat)
        self.step_index += 1
        return self.output(prev.to(model_output.dtype), x0, return_dict)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        if self.begin_index is None:
            schedule = self.timesteps.to(original_samples.device)
            index = [self.index_for_timestep(t, schedule) for t in timesteps.to(original_samples.device)]
        else:
            start = self.step_index if self.step_index is not None else self.begin_index
            index = [start] * timesteps.shape[0]
        sigma = sigmas[index].flatten().view(-1, *[1] * (original_samples.ndim - 1))
        return original_samples + noise * sigma

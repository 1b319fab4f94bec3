"""What every scheduler shares: beta schedules, alpha_bar, x0/eps conversion, clipping, noise, output."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from ..config import Config, Configurable, read_json, write_json
from ..loading import resolve

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclasses.dataclass(frozen=True)
class BetaConfig(Config):
    """The discrete-time fields DDPM, DDIM and Euler share."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    choices = {"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
               "prediction_type": PREDICTION_TYPES, "timestep_spacing": ("leading", "trailing", "linspace")}


@dataclasses.dataclass(frozen=True)
class ClipConfig(BetaConfig):
    """DDPM and DDIM also clip or threshold the predicted x0."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0


@dataclasses.dataclass
class Plan:
    """One call's walk over a schedule, made by `Scheduler.plan` and never shared between calls.

    `timesteps[i]` is where the model is evaluated at step i (a second-order sampler evaluates a timestep
    twice), `levels[i]` is that evaluation's noise level as sigma = sqrt((1 - alpha_bar) / alpha_bar) (what
    k-diffusion-style model wrappers need), `sigmas` is a sigma sampler's own table (one longer: it ends at
    the final level), and `memory` holds what a multistep sampler carries from one evaluation to the next.
    """

    timesteps: torch.Tensor
    levels: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None
    num_inference_steps: int | None = None
    order: int = 1
    memory: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.timesteps)

    def start(self, strength: float) -> int:
        """Image-to-image: the first evaluation when only `strength` of the schedule is re-run."""
        n = self.num_inference_steps or len(self.timesteps)
        return max(n - min(int(n * strength), n), 0) * self.order


@dataclasses.dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def __getitem__(self, i):
        return getattr(self, i) if isinstance(i, str) else self.to_tuple()[i]


def cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """squaredcos_cap_v2: Nichol & Dhariwal (2021), eq. 17, betas capped at max_beta."""
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023, algorithm 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(c) -> torch.Tensor:
    n = c.num_train_timesteps
    if c.get("trained_betas") is not None:
        betas = torch.tensor(c.trained_betas, dtype=torch.float32)
    elif c.beta_schedule == "linear":
        betas = torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float32)
    elif c.beta_schedule == "scaled_linear":
        betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(n)
    return zero_terminal_snr(betas) if c.get("rescale_betas_zero_snr") else betas


def spaced_timesteps(c, n: int, rounded: bool = True) -> np.ndarray:
    """Inference timesteps, descending, per `timestep_spacing` (Lin et al. 2023, table 2)."""
    T = c.num_train_timesteps
    if c.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n)
        return (t.round() if rounded else t)[::-1].copy()
    if c.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy() + c.steps_offset
    return np.round(np.arange(T, 0, -T / n)) - 1


def table_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The noise level of every training timestep, as the reference computes it (in float32)."""
    return np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Gaussian noise drawn exactly as the reference draws it, so a seed gives the same numbers.

    A CPU generator draws on the CPU and the result moves to `device`; a list of generators draws one
    batch element each.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    gens = generator if isinstance(generator, list) else [generator]
    rand_device = device
    if gens[0] is not None and gens[0].device.type != device.type:
        if gens[0].device.type != "cpu":
            raise ValueError(f"Cannot generate a {device} tensor from a {gens[0].device.type} generator.")
        rand_device = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(tuple(shape), generator=gens[0], device=rand_device, dtype=dtype).to(device)
    one = (1, *shape[1:])
    noise = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in gens]
    return torch.cat(noise).to(device)


def posterior_std(var, beta, variance_type: str, predicted=None):
    """The std of q(x_{t-1} | x_t, x0) per variance type; `var` is beta_tilde, `beta` is 1 - alpha_t."""
    if variance_type == "fixed_small":
        return var**0.5
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(var))
    if variance_type == "fixed_large":
        return beta**0.5
    if variance_type == "learned":
        return predicted**0.5
    frac = (predicted + 1) / 2  # learned_range: interpolate log-variances (Nichol & Dhariwal 2021, eq. 15)
    return torch.exp(0.5 * (frac * torch.log(beta) + (1 - frac) * torch.log(var)))


class Scheduler(Configurable):
    """Base of all schedulers: config, loading and saving, the alpha_bar table and the shared math."""

    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: Config | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.num_inference_steps = None
        self.final_alpha_cumprod = torch.tensor(1.0)
        if "num_train_timesteps" in self.config:
            self.betas = make_betas(self.config)
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
            self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, cache_dir=None,
                        revision=None, local_files_only=None, token=None, **overrides):
        pattern = f"{subfolder}/*" if subfolder else "*"
        folder = resolve(pretrained_model_name_or_path, subfolder, [pattern], cache_dir=cache_dir,
                         revision=revision, local_files_only=local_files_only, token=token)
        path = Path(folder) / cls.config_name
        # Keys of other schedulers are ignored, as the reference does: configs on the Hub carry some.
        return cls(cls.config_class.from_dict(read_json(path), str(path), strict=False, **overrides))

    def save_pretrained(self, save_directory, **_) -> None:
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_json(Path(save_directory) / self.config_name, self.config_dict())

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- the sampling contract: pure functions of (config, tables, the call's Plan); the loop is
    # cascade.pipelines.sampling.denoise.
    def plan(self, num_inference_steps: int | None = None, device=None, **kw) -> Plan:
        raise NotImplementedError

    def scale(self, plan: Plan, x: torch.Tensor, i: int) -> torch.Tensor:
        """The model's input at evaluation i (sigma samplers keep x at scale sqrt(sigma^2 + 1))."""
        return x

    def update(self, plan: Plan, out: torch.Tensor, i: int, x: torch.Tensor, generator=None, **opts):
        """One evaluation's step: (x at the next evaluation, predicted x0 or None)."""
        raise NotImplementedError

    def noise_to(self, plan: Plan, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x0 noised to the level of evaluation i, as the model expects x there."""
        return self.add_noise(x0, noise, plan.timesteps[i: i + 1].repeat(x0.shape[0]))

    def init_sigma(self, plan: Plan):
        """The scale of the pure noise a call starts from."""
        return self.init_noise_sigma

    def levels_for(self, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps.long().cpu()]
        return ((1 - a) / a) ** 0.5

    # --- the reference's stateful API, for people who drive a scheduler by hand: one Plan kept on the object
    # and a cursor over it. Pipelines never use it: two calls at once would share the cursor.
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kw):
        self._plan = self.plan(num_inference_steps, device, **kw)
        self.timesteps, self.num_inference_steps = self._plan.timesteps, self._plan.num_inference_steps
        if self._plan.sigmas is not None:
            self.sigmas = self._plan.sigmas
        self._cursor = self.begin_index = None

    def set_begin_index(self, begin_index: int = 0):
        self.begin_index = begin_index

    @property
    def step_index(self):
        return getattr(self, "_cursor", None)

    def here(self, timestep) -> int:
        """The evaluation the stateful API is at: located from `timestep` on the first call (the second match
        if the schedule repeats it, as img2img enters mid-way), then a cursor."""
        if getattr(self, "_plan", None) is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' first")
        if self.step_index is None:
            if self.begin_index is not None:
                self._cursor = self.begin_index
            else:
                t = timestep.to(self.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
                hits = (self.timesteps == t).nonzero()
                self._cursor = len(self.timesteps) - 1 if len(hits) == 0 else hits[min(1, len(hits) - 1)].item()
        return self._cursor

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        if getattr(self, "_plan", None) is None:
            return sample
        return self.scale(self._plan, sample, self.here(timestep))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **opts):
        i = self.here(timestep)
        prev, x0 = self.update(self._plan, model_output, i, sample, generator, **opts)
        self._cursor = i + 1
        return self.output(prev, x0, return_dict)

    @staticmethod
    def noise_like(model_output: torch.Tensor, generator) -> torch.Tensor:
        return randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)

    def alpha_bar(self, t):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def x0_and_eps(self, model_output, sample, a_t):
        """The predicted clean sample and noise, whatever the model predicts."""
        b_t = 1 - a_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - b_t**0.5 * model_output) / a_t**0.5, model_output
        if kind == "sample":
            return model_output, (sample - a_t**0.5 * model_output) / b_t**0.5
        return a_t**0.5 * sample - b_t**0.5 * model_output, a_t**0.5 * model_output + b_t**0.5 * sample

    def clip(self, x0: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.get("thresholding"):
            return self.threshold(x0)
        return x0.clamp(-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else x0

    def threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022): clip to a per-sample quantile s >= 1, divide by s."""
        # quantile needs float32 or float64, and clamp has no CPU half kernel
        flat = x0.reshape(x0.shape[0], -1).to(torch.promote_types(x0.dtype, torch.float32))
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)

    def alphas_for(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The forward process q(x_t | x0)."""
        a = self.alphas_for(timesteps, original_samples).flatten()
        a = a.view(-1, *[1] * (original_samples.ndim - 1))
        return (a**0.5 * original_samples + (1 - a) ** 0.5 * noise).to(original_samples.dtype)

    @staticmethod
    def output(prev_sample, pred_original_sample=None, return_dict: bool = True):
        out = SchedulerOutput(prev_sample, pred_original_sample)
        return out if return_dict else out.to_tuple()

"""Multistep exponential integrators over lambda = log(alpha / sigma): DPM-Solver++ (Lu et al. 2022,
arXiv 2211.01095, algorithm 2 and its SDE variant) and UniPC (Zhao et al. 2023, arXiv 2302.04867, the
B(h) predictor-corrector). x stays variance-preserving: x = alpha * x0 + sigma_vp * noise."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import BetaConfig, Plan, table_sigmas
from .euler import SigmaScheduler, karras_sigmas, sigma_to_t

UNSET = (False, None)


@dataclasses.dataclass(frozen=True)
class MultistepConfig(BetaConfig):
    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    timestep_spacing: str = "linspace"
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    choices = {**BetaConfig.choices, "solver_order": (1, 2, 3), "use_exponential_sigmas": UNSET,
               "use_beta_sigmas": UNSET, "use_flow_sigmas": UNSET, "use_dynamic_shifting": UNSET,
               "final_sigmas_type": ("zero", "sigma_min")}


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig(MultistepConfig):
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    euler_at_final: bool = False
    use_lu_lambdas: bool = False
    lambda_min_clipped: float = float("-inf")
    variance_type: str | None = None

    # The reference maps UniPC's solver types to midpoint; the deprecated noise-predicting variants are not here.
    choices = {**MultistepConfig.choices, "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
               "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"), "use_lu_lambdas": UNSET}


@dataclasses.dataclass(frozen=True)
class UniPCMultistepSchedulerConfig(MultistepConfig):
    predict_x0: bool = True
    solver_type: str = "bh2"
    disable_corrector: tuple = ()
    solver_p: None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    choices = {**MultistepConfig.choices, "solver_type": ("bh1", "bh2", "midpoint", "heun", "logrho"),
               "solver_p": (None,), "shift_terminal": (None,)}


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the variance-preserving process at noise-to-signal ratio sigma."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    alpha, s = alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(s)


class MultistepScheduler(SigmaScheduler):
    """Schedule, noising and model-output conversion that DPM-Solver++ and UniPC share."""

    last_timestep_clip = False  # DPM-Solver can stop the schedule where lambda falls under lambda_min_clipped

    def timestep_grid(self, n: int) -> np.ndarray:
        c, T = self.config, self.config.num_train_timesteps
        last = T
        if self.last_timestep_clip:
            lambdas = torch.log(self.alphas_cumprod**0.5) - torch.log((1 - self.alphas_cumprod) ** 0.5)
            last = T - torch.searchsorted(torch.flip(lambdas, [0]), c.lambda_min_clipped).item()
        if c.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if c.timestep_spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
        return np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1

    def plan(self, num_inference_steps: int, device=None) -> Plan:
        c, n = self.config, num_inference_steps
        t, table = self.timestep_grid(n), table_sigmas(self.alphas_cumprod)
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(np.flip(table).copy(), n, c.get("sigma_min"), c.get("sigma_max"))
            t = np.array([sigma_to_t(s, np.log(table)) for s in sigmas])
            t = t.round() if self.round_karras_timesteps() else t
            last = sigmas[-1]
        else:
            sigmas = np.interp(t, np.arange(0, len(table)), table)
            last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        sigmas = np.concatenate([sigmas, [0 if c.final_sigmas_type == "zero" else last]]).astype(np.float32)
        sigmas = torch.from_numpy(sigmas)
        return Plan(torch.from_numpy(t).to(device=device, dtype=torch.int64), sigmas[:-1], sigmas,
                    num_inference_steps=len(t))

    def round_karras_timesteps(self) -> bool:
        return True

    def init_sigma(self, plan):  # init_noise_sigma follows (SigmaScheduler's property reads this)
        return 1.0

    def scale(self, plan, x, i):
        return x

    @staticmethod
    def mix(x0, noise, sigma):
        alpha, s = alpha_sigma(sigma)
        return alpha * x0 + s * noise

    def data_estimate(self, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The model's x0 estimate at this level (thresholded if configured)."""
        alpha, s = alpha_sigma(sigma)
        kind = self.config.prediction_type
        x0 = (x - s * out) / alpha if kind == "epsilon" else out if kind == "sample" else alpha * x - s * out
        return self.threshold(x0) if self.config.thresholding else x0


class DPMSolverMultistepScheduler(MultistepScheduler):
    config_class = DPMSolverMultistepSchedulerConfig
    last_timestep_clip = True

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.solver_type not in ("midpoint", "heun"):
            self.register_to_config(solver_type="midpoint")

    def round_karras_timesteps(self) -> bool:
        return self.config.beta_schedule != "squaredcos_cap_v2"

    def update(self, plan, out, i, x, generator=None, variance_noise=None, **_):
        c, memory, n = self.config, plan.memory, len(plan.timesteps)
        outputs = memory.setdefault("outputs", [])
        final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        second_last = i == n - 2 and c.lower_order_final and n < 15
        out = out[:, : x.shape[1]]
        x0 = self.data_estimate(out, x, plan.sigmas[i])
        outputs[:] = (outputs + [x0])[-c.solver_order:]
        sample, noise = x.to(torch.float32), None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = (variance_noise.to(x.device, torch.float32) if variance_noise is not None
                     else self.noise_like(out.float(), generator))
        warm = memory.get("warm", 0)
        order = 1 if c.solver_order == 1 or warm < 1 or final else 2 if c.solver_order == 2 or warm < 2 or second_last else 3
        memory["warm"] = min(warm + 1, c.solver_order)
        prev = self.solve(plan.sigmas[i + 1], plan.sigmas[i - order + 1: i + 1].flip(0), outputs[::-1][:order],
                          sample, noise)
        return prev.to(out.dtype), x0

    def solve(self, sigma_to, sigmas_from, outputs, x, noise):
        """DPM-Solver++ of order len(outputs) from the levels `sigmas_from` to `sigma_to`, with `outputs` the
        x0 estimates at those levels, newest first (Lu et al. 2022, eqs. 8-9 and the SDE of section 5).
        The arithmetic keeps the reference's grouping: a tiny random model amplifies one rounding step."""
        alpha_t, sigma_t = alpha_sigma(sigma_to)
        lam = [log_snr(s) for s in sigmas_from]
        h = log_snr(sigma_to) - lam[0]
        ratio = sigma_t / alpha_sigma(sigmas_from[0])[1]
        d = self.differences(outputs, [(lam[k] - lam[k + 1]) / h for k in range(len(lam) - 1)])
        if noise is None:
            e = torch.exp(-h) - 1.0
            x_t = ratio * x - alpha_t * e * d[0]
            if len(d) == 2 and self.config.solver_type == "midpoint":
                return x_t - 0.5 * (alpha_t * e) * d[1]
            if len(d) >= 2:
                x_t = x_t + alpha_t * (e / h + 1.0) * d[1]
            return x_t - alpha_t * ((e + h) / h**2 - 0.5) * d[2] if len(d) == 3 else x_t
        e = 1 - torch.exp(-2.0 * h)
        x_t = ratio * torch.exp(-h) * x + alpha_t * e * d[0]
        if len(d) == 2 and self.config.solver_type == "midpoint":
            x_t = x_t + 0.5 * (alpha_t * e) * d[1]
        elif len(d) >= 2:
            x_t = x_t + alpha_t * (e / (-2.0 * h) + 1.0) * d[1]
        if len(d) == 3:
            x_t = x_t + alpha_t * ((e - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d[2]
        return x_t + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

    @staticmethod
    def differences(outputs, r):
        """[D0, D1(, D2)]: the estimate and its scaled divided differences over the lambda steps r."""
        if len(outputs) == 1:
            return [outputs[0]]
        d1_0 = 1.0 / r[0] * (outputs[0] - outputs[1])
        if len(outputs) == 2:
            return [outputs[0], d1_0]
        d1_1 = 1.0 / r[1] * (outputs[1] - outputs[2])
        return [outputs[0], d1_0 + r[0] / (r[0] + r[1]) * (d1_0 - d1_1), 1.0 / (r[0] + r[1]) * (d1_0 - d1_1)]


class UniPCMultistepScheduler(MultistepScheduler):
    config_class = UniPCMultistepSchedulerConfig

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.solver_type not in ("bh1", "bh2"):
            self.register_to_config(solver_type="bh2")

    def update(self, plan, out, i, x, generator=None, **_):
        c, memory, n = self.config, plan.memory, len(plan.timesteps)
        outputs = memory.setdefault("outputs", [])
        m = self.converted(out[:, : x.shape[1]], x, plan.sigmas[i])
        if i > 0 and (i - 1) not in c.disable_corrector and "last" in memory:
            # UniC: refine the previous step's result with this evaluation (free: no extra model call).
            x = self.bh_update(plan.sigmas, i - 1, i, outputs, memory["last"], memory["order"], m)
        outputs[:] = (outputs + [m])[-c.solver_order:]
        order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
        memory["order"] = order = min(order, memory.get("warm", 0) + 1)
        memory["last"] = x
        memory["warm"] = min(memory.get("warm", 0) + 1, c.solver_order)
        return self.bh_update(plan.sigmas, i, i + 1, outputs, x, order), None

    def converted(self, out, x, sigma):
        if self.config.predict_x0:
            return self.data_estimate(out, x, sigma)
        alpha, s = alpha_sigma(sigma)
        kind = self.config.prediction_type
        return out if kind == "epsilon" else (x - alpha * out) / s if kind == "sample" else alpha * out + s * x

    def bh_update(self, sigmas, s_i, t_i, outputs, x, order, model_t=None):
        """UniP (model_t None) or UniC of `order` from level s_i to t_i; outputs[-1] is the estimate at s_i
        and outputs[-1-k] the one k levels earlier."""
        x0_mode = self.config.predict_x0
        alpha_t, sigma_t = alpha_sigma(sigmas[t_i])
        alpha_s, sigma_s = alpha_sigma(sigmas[s_i])
        lam_s = log_snr(sigmas[s_i])
        h = log_snr(sigmas[t_i]) - lam_s
        m0 = outputs[-1]
        rks = [(log_snr(sigmas[s_i - k]) - lam_s) / h for k in range(1, order)]
        d1s = [(outputs[-1 - k] - m0) / r for k, r in zip(range(1, order), rks)]
        rks = torch.stack(rks + [torch.ones(())])
        hh = -h if x0_mode else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        b_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        rows, b = [], []
        for k in range(1, order + 1):
            rows.append(rks ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = torch.stack(rows), torch.stack(b)
        scale, ratio = (alpha_t, sigma_t / sigma_s) if x0_mode else (sigma_t, alpha_t / alpha_s)
        x_t = ratio * x - scale * h_phi_1 * m0
        if model_t is None:
            if d1s:
                rhos = torch.full((1,), 0.5, dtype=x.dtype) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
                x_t = x_t - scale * b_h * sum(r * d for r, d in zip(rhos.to(x.dtype), d1s))
        else:
            rhos = torch.full((1,), 0.5, dtype=x.dtype) if order == 1 else torch.linalg.solve(R, b).to(x.dtype)
            corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
            x_t = x_t - scale * b_h * (corr + rhos[-1] * (model_t - m0))
        return x_t.to(x.dtype)

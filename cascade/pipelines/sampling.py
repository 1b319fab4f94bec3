"""The one sampling loop, guidance, and where a call's latents start.

The contract (k-diffusion's, in the reference's vocabulary): a call asks its scheduler for a `Plan`
(`scheduler.plan(steps)`), a fresh per-call object holding the evaluation points, their noise levels and
any multistep memory; the loop evaluates `model(x_in, t, sigma)`, told the timestep and the noise level of
that evaluation, and lets `scheduler.update` step. Nothing about a call is stored on the scheduler or the
pipeline, so one pipeline can run several calls at once.
"""
from __future__ import annotations

import torch

from ..schedulers.base import Plan, randn_tensor


def denoise(model, scheduler, plan: Plan, x, generator=None, on_step=None, progress=iter, start: int = 0):
    """Walk the reverse process over `plan` from evaluation `start`; the only sampling loop in cascade.
    `on_step(i, t, x)` sees i counted from `start`, as the reference's loops count a shortened schedule."""
    levels = plan.levels if plan.levels is not None else [None] * len(plan)
    for i in progress(range(start, len(plan))):
        t = plan.timesteps[i]
        x = scheduler.update(plan, model(scheduler.scale(plan, x, i), t, levels[i]), i, x, generator)[0]
        if on_step is not None:
            x = on_step(i - start, t, x)
    return x


def cfg(uncond, cond, scale):
    return uncond + scale * (cond - uncond)


def guided(model, scale, combine=cfg, cond_first=False, learned_variance=False):
    """Wrap model(x, t, sigma), whose conditioning is batched [uncond, cond], into one guided forward."""
    if scale <= 1:
        return model

    def fn(x, *at):
        out = model(torch.cat([x, x]), *at)
        if learned_variance:  # guide the mean only; the reference keeps the conditional variance
            out, var = out.split(x.shape[1], dim=1)
            var = var.chunk(2)[0 if cond_first else 1]
        first, second = out.chunk(2)
        cond, uncond = (first, second) if cond_first else (second, first)
        out = combine(uncond, cond, scale)
        return torch.cat([out, var], dim=1) if learned_variance else out

    return fn


def prepare_latents(shape, generator, latents, dtype, device, sigma=1.0):
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"generator: got a list of {len(generator)}, the batch has {shape[0]} samples")
    if latents is None:
        latents = randn_tensor(shape, generator, device, dtype)
    elif tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents: expected shape {tuple(shape)}, got {tuple(latents.shape)}")
    return latents.to(device) * sigma


def start_latents(scheduler, plan: Plan, shape, generator, latents, dtype, device):
    """Pure noise at the plan's first level (the sampler's initial scale)."""
    return prepare_latents(shape, generator, latents, dtype, device, scheduler.init_sigma(plan))


def noised_start(scheduler, plan: Plan, x0, strength, generator):
    """img2img: noise x0 to where `strength` of the schedule remains; returns (latents, first evaluation)."""
    start = plan.start(strength)
    if start >= len(plan):
        raise ValueError(f"strength={strength} with num_inference_steps={plan.num_inference_steps} leaves no step")
    noise = randn_tensor(x0.shape, generator, x0.device, x0.dtype)
    return scheduler.noise_to(plan, x0, noise, start), start

"""DeepCache (Ma, Fang and Wang 2023, arXiv 2312.00858): the deep features of a UNet change slowly from
one denoising step to the next, so at most steps only the shallow levels run and the input of the
shallow up path is the one the last full step computed.

What is configuration and what is state: a `DeepCache` (interval, branch) sits on the UNet as a plain
setting; the features and the count of forward calls live in a per-call scope (a context variable that
every pipeline `__call__` opens), so two threads running one pipeline never see each other's cache and
nothing outlives a call. The UNet counts its own forward calls within the scope: call k runs in full
when k % cache_interval == 0. A second-order sampler (Heun) evaluates the model twice per step, and
both evaluations count. Outside any scope (the UNet called directly) every forward runs in full; a
custom sampling loop opens one with `with call_scope():`.

A setting on the UNet applies to every call of every pipeline holding it. For one call's own choice (a
server's per-request option), `with using(settings):` (or a pipeline's `deepcache(...)` block) overrides
it for the calls this thread makes inside the block, None meaning off; other threads are untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from contextvars import ContextVar

import torch

_SCOPE: ContextVar[dict | None] = ContextVar("cascade_deepcache_scope", default=None)
_UNSET = object()
_OVERRIDE: ContextVar = ContextVar("cascade_deepcache_override", default=_UNSET)

SUPPORTED = ("the Kandinsky 2.2 decoder pipelines (text-to-image, img2img, inpainting, ControlNet) and their "
             "combined pipelines, UnCLIPPipeline, UnCLIPImageVariationPipeline and "
             "StableDiffusionLatentUpscalePipeline")


@dataclasses.dataclass(frozen=True)
class DeepCache:
    """Run the whole UNet every `cache_interval` forward calls; in between only levels 0 to
    `cache_branch_id` (0: the outermost, full-resolution level), each level's down and up blocks whole."""

    cache_interval: int = 3
    cache_branch_id: int = 0

    def check(self, levels: int) -> None:
        interval, branch = self.cache_interval, self.cache_branch_id
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"cache_interval must be an int >= 1, got {interval!r}")
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= levels - 2:
            raise ValueError(f"cache_branch_id must be an int from 0 to {levels - 2} (the UNet has {levels} "
                             f"levels; the deepest is always cached), got {branch!r}")


@dataclasses.dataclass
class Slot:
    """One model's cache within one call."""

    calls: int = 0
    features: torch.Tensor | None = None

    def reuse(self, x: torch.Tensor, interval: int) -> bool:
        """Counts this forward call; whether it may take the cached features (the shallow output `x` of a
        call with another batch or size cannot, and runs in full)."""
        k, self.calls = self.calls, self.calls + 1
        f = self.features
        return k % interval != 0 and f is not None and f.shape[0] == x.shape[0] and f.shape[2:] == x.shape[2:]


@contextlib.contextmanager
def call_scope():
    """A fresh, empty cache for every model called inside; nested scopes (a combined pipeline calling its
    decoder) each start empty."""
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def per_call(call):
    """A pipeline `__call__` that runs in its own DeepCache scope."""

    @functools.wraps(call)
    def run(*args, **kwargs):
        with call_scope():
            return call(*args, **kwargs)

    return run


def slot(model: torch.nn.Module) -> Slot | None:
    """This call's cache for `model`, or None outside any scope."""
    scope = _SCOPE.get()
    return None if scope is None else scope.setdefault(model, Slot())


@contextlib.contextmanager
def using(settings: DeepCache | None):
    """`settings` (None: off) instead of the UNets' own, for the calls made in this context."""
    token = _OVERRIDE.set(settings)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def settings_for(own: DeepCache | None) -> DeepCache | None:
    """What a UNet whose own setting is `own` runs with in the current context."""
    override = _OVERRIDE.get()
    return own if override is _UNSET else override

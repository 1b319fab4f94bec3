"""CPU offload for any pipeline: whole models, or every weight-holding submodule, brought to the execution
device only for their own forward. Hooks live on the modules, so pipelines sharing components share them."""
from __future__ import annotations

import functools
from itertools import chain

import torch
from torch import nn

from ..deepcache import per_call
from .checks import checked


def to_device(value, device):
    """Tensors inside args/kwargs (lists, tuples, dicts too) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def move_own(module: nn.Module, device) -> None:
    """Move only the tensors this module holds itself (not its children's)."""
    for t in chain(module.parameters(recurse=False), module.buffers(recurse=False)):
        t.data = t.data.to(device)


def released(call):
    """A pipeline call that leaves no offloaded model on the device."""

    @functools.wraps(call)
    def run(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            self.maybe_free_model_hooks()

    return run


def execution_device(device="cuda", gpu_id=None) -> torch.device:
    device = torch.device(device)
    if gpu_id is not None and device.index is None and device.type != "cpu":
        device = torch.device(device.type, gpu_id)
    return device


class EntryHook:
    """A pre-hook on `encode`/`decode`, which autoencoders expose besides forward."""

    def __init__(self, module: nn.Module, name: str, hook):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            args, kwargs = hook(module, args, kwargs)
            return original(*args, **kwargs)

        self.module, self.name = module, name
        setattr(module, name, wrapped)

    def remove(self):
        self.module.__dict__.pop(self.name, None)


def pre_hooks(module: nn.Module, hook) -> list:
    entries = [EntryHook(module, n, hook) for n in ("encode", "decode") if hasattr(module, n)]
    return [module.register_forward_pre_hook(hook, with_kwargs=True), *entries]


class OffloadMixin:
    """`enable_model_cpu_offload` / `enable_sequential_cpu_offload` for DiffusionPipeline."""

    _offload_device: torch.device | None = None
    _offload_active: list = []  # the model on the device under model offload (shared with derived pipelines)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:  # each call also gets its own DeepCache scope (cascade/deepcache.py)
            # and its arguments checked before any model runs (checks.py)
            cls.__call__ = released(per_call(checked(cls.__dict__["__call__"])))

    def maybe_free_model_hooks(self) -> None:
        """Send the last model of a model-offloaded call back to the CPU, as the reference does after a call."""
        while self._offload_active:
            self._offload_active.pop().to("cpu")

    def _hooks(self) -> list:
        if "_offload_hooks" not in self.__dict__:
            self._offload_hooks = []
        return self._offload_hooks

    def remove_all_hooks(self) -> None:
        for h in self._hooks():
            h.remove()
        self._hooks().clear()
        self._offload_device = None

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda"):
        """Each model moves to `device` when its forward is called, and the previous one back to the CPU."""
        self.remove_all_hooks()
        target = execution_device(device, gpu_id)
        active: list[nn.Module] = []
        self._offload_active = active

        def bring(module, args, kwargs):
            if not active or active[0] is not module:
                if active:
                    active.pop().to("cpu")
                module.to(target)
                active.append(module)
            return to_device(args, target), to_device(kwargs, target)

        for module in self.modules().values():
            module.to("cpu")
            self._hooks().extend(pre_hooks(module, bring))
        self._offload_device = target

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda"):
        """Weights stay on the CPU; each submodule holding weights visits `device` for its own forward."""
        self.remove_all_hooks()
        target = execution_device(device, gpu_id)

        def bring(module, args, kwargs):
            move_own(module, target)
            return to_device(args, target), to_device(kwargs, target)

        def send_back(module, args, output):
            move_own(module, "cpu")

        for model in self.modules().values():
            model.to("cpu")
            for sub in model.modules():
                if next(chain(sub.parameters(recurse=False), sub.buffers(recurse=False)), None) is not None:
                    self._hooks().append(sub.register_forward_pre_hook(bring, with_kwargs=True))
                    self._hooks().append(sub.register_forward_hook(send_back))
        self._offload_device = target

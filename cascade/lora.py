"""LoRA adapters on any model's nn.Linear layers, read and written in the reference's (PEFT) file format.

An adapter adds `scaling * B(A(x))` to a layer's output through a forward hook; fusing adds
`(B @ A) * scaling` to the weight and keeps the original, so unfusing restores it bit for bit. Adapters live
beside the layers (`layer.lora`), so a model's own state dict, saving and loading are untouched.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.functional import linear

from .loading import resolve

LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # the adapter's peft LoraConfig, as JSON in the safetensors header


class Adapter:
    """One adapter of one layer: lora_A (rank, in), lora_B (out, rank), alpha; active unless set otherwise."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, rslora: bool = False):
        self.down, self.up, self.alpha, self.rslora = down, up, alpha, rslora
        self.active, self.merged = True, False
        self.set_weight(1.0)

    def set_weight(self, weight: float) -> None:
        rank = self.down.shape[0]  # peft's order of operations, so outputs match the reference's bit for bit
        self.scaling = weight * self.alpha / (math.sqrt(rank) if self.rslora else rank)


def add_adapters(layer: nn.Linear, args, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    for a in layer.lora.values():
        if a.active and not a.merged:
            out = out + linear(linear(x, a.down.to(x)), a.up.to(x)) * a.scaling
    return out


def lora_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora")}


def adapter_names(model: nn.Module) -> list[str]:
    return sorted({n for layer in lora_layers(model).values() for n in layer.lora})


def inject_adapter(model: nn.Module, state: dict, adapter_name: str | None = None,
                   metadata: dict | None = None) -> str:
    """Add the adapter in `state` (`<module>.lora_A.weight` / `lora_B.weight` keys) to `model`; its name."""
    if not hasattr(model, "text_model"):  # transformers' flattened CLIP text; older files keep the prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    modules, meta = dict(model.named_modules()), metadata or {}
    targets = {k.rsplit(".lora_", 1)[0] for k in state}
    bad = [k for k in state if not re.search(r"\.lora_[AB]\.weight$", k)]
    bad += [k for k in ("use_dora", "lora_bias") if meta.get(k)]
    bad += [t for t in targets if not isinstance(modules.get(t), nn.Linear)
            or {f"{t}.lora_A.weight", f"{t}.lora_B.weight"} - set(state)]
    name = adapter_name or f"default_{len(adapter_names(model))}"
    if bad or name in adapter_names(model):
        raise ValueError(f"LoRA: {sorted(bad)[:4]} are not plain LoRA on Linear layers" if bad else
                         f"LoRA: adapter name {name!r} is already in use")
    for t in sorted(targets):
        layer, down, up = modules[t], state[f"{t}.lora_A.weight"], state[f"{t}.lora_B.weight"]
        if down.shape[1] != layer.in_features or up.shape != (layer.out_features, down.shape[0]):
            raise ValueError(f"LoRA: {t}: A {tuple(down.shape)} / B {tuple(up.shape)} do not fit {layer}")
        # peft's alpha patterns match a module name or a dotted suffix; no metadata: alpha = rank, scaling 1.
        alphas = [v for k, v in meta.get("alpha_pattern", {}).items() if re.match(rf"(.*\.)?({k})$", t)]
        alpha = (alphas or [meta.get("lora_alpha", down.shape[0])])[0]
        if not hasattr(layer, "lora"):
            layer.lora, layer.lora_original = {}, None
            layer.lora_hook = layer.register_forward_hook(add_adapters)
        rslora = bool(meta.get("use_rslora"))
        layer.lora[name] = Adapter(down.detach().clone(), up.detach().clone(), alpha, rslora)
    set_adapters(model, [name], [1.0])  # as in the reference, the adapter loaded last is the one active
    return name


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """An adapter's weights under the reference's keys (peft's get_peft_model_state_dict), to save."""
    name, out = adapter_name or adapter_names(model)[0], {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora:
            a = layer.lora[name]
            out.update({f"{path}.lora_A.weight": a.down, f"{path}.lora_B.weight": a.up})
    return out


def adapter_metadata(model: nn.Module, adapter_name: str | None = None) -> dict:
    """The adapter's peft LoraConfig fields, which the reference saves beside the weights."""
    name = adapter_name or adapter_names(model)[0]
    found = {p: layer.lora[name] for p, layer in lora_layers(model).items() if name in layer.lora}
    ranks, alphas = {p: a.down.shape[0] for p, a in found.items()}, {p: a.alpha for p, a in found.items()}
    r, alpha = (Counter(d.values()).most_common(1)[0][0] for d in (ranks, alphas))
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(found),
            "use_rslora": any(a.rslora for a in found.values()),
            "rank_pattern": {f"^{p}": v for p, v in ranks.items() if v != r},
            "alpha_pattern": {f"^{p}": v for p, v in alphas.items() if v != alpha}}


def set_adapters(model: nn.Module, names: list[str], weights: list[float]) -> None:
    """Activate `names` alone, each at its weight (a factor on alpha / rank)."""
    for layer in lora_layers(model).values():
        for n, a in layer.lora.items():
            a.active = n in names
            if a.active:
                a.set_weight(weights[names.index(n)])


def fuse(model: nn.Module, lora_scale: float = 1.0, names: list[str] | None = None, safe: bool = False):
    """Add active adapters to the weights; as in the reference, `lora_scale` stays on them after unfusing."""
    for layer in lora_layers(model).values():
        for n, a in layer.lora.items():
            if (n in names if names is not None else a.active) and not a.merged:
                if layer.lora_original is None:  # in host memory: exact unfusing costs no accelerator memory
                    layer.lora_original = layer.weight.detach().to("cpu", copy=True)
                a.scaling *= lora_scale
                up, down = (t.to(layer.weight.device, torch.float32) for t in (a.up, a.down))
                w = layer.weight.float() + (up @ down) * a.scaling
                if safe and not torch.isfinite(w).all():
                    raise ValueError(f"LoRA: fusing {n!r} gives non-finite weights")
                with torch.no_grad():
                    layer.weight.copy_(w)
                a.merged = True


def unfuse(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        if layer.lora_original is not None:
            with torch.no_grad():
                layer.weight.copy_(layer.lora_original)
        layer.lora_original = None
        for a in layer.lora.values():
            a.merged = False


def unload(model: nn.Module) -> None:
    unfuse(model)
    for layer in lora_layers(model).values():
        layer.lora_hook.remove()
        del layer.lora, layer.lora_original, layer.lora_hook


def read_lora_file(path_or_dict, weight_name=None, subfolder=None, **hub) -> tuple[dict, dict | None]:
    """(state dict, adapter metadata or None) from a dict, a safetensors file, a folder or a Hub repo."""
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), None
    path = Path(path_or_dict)
    if not path.is_file():
        folder = resolve(path_or_dict, subfolder, [weight_name or "*.safetensors"], **hub)
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        path = folder / (weight_name or (found[0] if len(found) == 1 else LORA_WEIGHT_NAME_SAFE))
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return load_file(str(path)), json.loads(raw) if raw else None


class LoraLoaderMixin:
    """The reference's pipeline LoRA methods over `_lora_loadable_modules`. Files prefix each component's keys
    with its name; the first component is the one the reference's arguments call `unet`."""

    _lora_loadable_modules: tuple[str, ...] = ()

    def lora_models(self, components=None) -> dict[str, nn.Module]:
        unknown = sorted(set(components or ()) - set(self._lora_loadable_modules))
        if unknown:
            raise ValueError(f"LoRA: {unknown} are not among {self._lora_loadable_modules}")
        names = components or self._lora_loadable_modules
        return {n: m for n in names if (m := getattr(self, n, None)) is not None}

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("use_safetensors", "low_cpu_mem_usage")}
        state, metadata = read_lora_file(pretrained_model_name_or_path_or_dict, **kwargs)
        models = self.lora_models()
        stray = [k for k in state if k.split(".", 1)[0] not in models]
        if stray or not state:
            raise ValueError(f"LoRA: keys must start with a component of {list(models)}; got "
                             f"{stray[:3] or 'no keys'}")
        for c, model in models.items():
            meta = {k[len(c) + 1:]: v for k, v in (metadata or {}).items() if k.startswith(c + ".")}
            part = {k[len(c) + 1:]: v for k, v in state.items() if k.startswith(c + ".")}
            if part:
                inject_adapter(model, part, adapter_name, meta or None)

    @classmethod
    def save_lora_weights(cls, save_directory, unet_lora_layers=None, text_encoder_lora_layers=None,
                          weight_name=None, unet_lora_adapter_metadata=None,
                          text_encoder_lora_adapter_metadata=None, **kwargs):
        """Layers are state dicts (see `adapter_state_dict`), metadata as `adapter_metadata` gives. Always
        safetensors; the reference's distributed-training arguments (save_function, ...) are ignored."""
        parts = {cls._lora_loadable_modules[0]: (unet_lora_layers, unet_lora_adapter_metadata),
                 "text_encoder": (text_encoder_lora_layers, text_encoder_lora_adapter_metadata)}
        state = {f"{c}.{k}": v.contiguous() for c, (sd, _) in parts.items() for k, v in (sd or {}).items()}
        meta = {f"{c}.{k}": v for c, (_, m) in parts.items() for k, v in (m or {}).items()}
        if not state:
            raise ValueError("LoRA: pass at least one of unet_lora_layers and text_encoder_lora_layers")
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        header = {"format": "pt", **({METADATA_KEY: json.dumps(meta, sort_keys=True)} if meta else {})}
        save_file(state, str(Path(save_directory) / (weight_name or LORA_WEIGHT_NAME_SAFE)), metadata=header)

    def fuse_lora(self, components=None, lora_scale=1.0, safe_fusing=False, adapter_names=None, **kwargs):
        for model in self.lora_models(components).values():
            fuse(model, lora_scale, adapter_names, safe_fusing)

    def unfuse_lora(self, components=None, **kwargs):
        for model in self.lora_models(components).values():
            unfuse(model)

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Activate the named adapters alone, each at its weight (a number, or a dict per component)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        missing = set(names) - {n for v in self.get_list_adapters().values() for n in v}
        if missing or len(weights) != len(names):
            raise ValueError(f"LoRA: unknown adapters {sorted(missing)}, or not one weight per name {names}")
        for c, model in self.lora_models().items():
            ws = [w.get(c) if isinstance(w, dict) else w for w in weights]
            set_adapters(model, names, [1.0 if w is None else w for w in ws])

    def unload_lora_weights(self):
        for model in self.lora_models().values():
            unload(model)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {c: names for c, m in self.lora_models().items() if (names := adapter_names(m))}

"""The x2 latent upscaler's original single-file checkpoint (k-diffusion's layout, which the reference's
scripts/convert_k_upscaler_to_diffusers.py reads) -> a UNet2DConditionModel."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import read_json
from .loading import load_into, no_init
from .models import UNet2DConditionModel

# Our module -> the original's; a tuple (name, i, n) is the i-th of n chunks of a fused original weight.
TOP = {"conv_in": "proj_in", "time_proj": "timestep_embed", "time_embedding.linear_1": "mapping.0",
       "time_embedding.linear_2": "mapping.2", "time_embedding.cond_proj": "mapping_cond",
       "conv_out": "proj_out"}
RESNET = {"norm1.linear": "main.0.mapper", "conv1": "main.2", "norm2.linear": "main.4.mapper",
          "conv2": "main.6", "conv_shortcut": "skip"}
SELF_ATTENTION = {"norm1.linear": "norm_in.mapper", "attn1.to_q": ("qkv_proj", 0, 3),
                  "attn1.to_k": ("qkv_proj", 1, 3), "attn1.to_v": ("qkv_proj", 2, 3),
                  "attn1.to_out.0": "out_proj"}
CROSS_ATTENTION = {"norm2.linear": "norm_dec.mapper", "attn2.norm_cross": "norm_enc", "attn2.to_q": "q_proj",
                   "attn2.to_k": ("kv_proj", 0, 2), "attn2.to_v": ("kv_proj", 1, 2),
                   "attn2.to_out.0": "out_proj"}
BLOCK_MODULE = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")


def original_module(unet: UNet2DConditionModel, module: str) -> tuple[str, int, int]:
    """Where one of our modules sits in the original: its key prefix, chunk index and chunk count.

    k-diffusion's levels are flat sequences: per layer a resnet, self-attention (deepest level only), then
    cross-attention; a down level starts with its parameter-free downsampler."""
    if module in TOP:
        return "inner_model." + TOP[module], 0, 1
    side, b, kind, j, rest = BLOCK_MODULE.fullmatch(module).groups()
    attentions = getattr(unet, f"{side}_blocks")[int(b)].attentions
    per_layer = 1 if attentions is None else 3 if hasattr(attentions[0], "attn1") else 2
    first = per_layer * int(j) + (side == "down")
    if kind == "resnets":
        name, index = RESNET[rest], first
    elif rest in SELF_ATTENTION:
        name, index = SELF_ATTENTION[rest], first + 1
    else:
        name, index = CROSS_ATTENTION[rest], first + per_layer - 1
    name, i, n = (name, 0, 1) if isinstance(name, str) else name
    return f"inner_model.u_net.{side[0]}_blocks.{b}.{index}.{name}", i, n


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a k-diffusion .pth/.ckpt (weights under `model_ema`, else `state_dict` or
    `model`)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_ema", "state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def convert_upscaler_checkpoint(unet: UNet2DConditionModel, original: dict, source: str) -> dict:
    """Our state dict from the original's (extra original keys are ignored, as the reference does)."""
    state, missing = {}, []
    for key, expected in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        prefix, i, n = original_module(unet, module)
        name = f"{prefix}.{param}"
        if name not in original:
            missing.append(name)
            continue
        part = original[name].chunk(n)[i]
        if part.numel() != expected.numel():
            raise ValueError(f"{source}: {name} has shape {tuple(original[name].shape)}, which does not fit "
                             f"{key} {tuple(expected.shape)}")
        state[key] = part.reshape(expected.shape)
    if missing:
        raise ValueError(f"{source}: not an x2 latent upscaler checkpoint of this configuration; "
                         f"missing keys: {list(dict.fromkeys(missing))}")
    return state


def load_upscaler_unet(path, config_file: Path, torch_dtype: torch.dtype | None = None):
    config = UNet2DConditionModel.config_class.from_dict(read_json(config_file), str(config_file))
    with torch.device("meta"), no_init():
        unet = UNet2DConditionModel(config)
    state = convert_upscaler_checkpoint(unet, read_checkpoint(Path(path)), str(path))
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) for k, v in state.items()}
    load_into(unet, state, str(path))
    return unet.eval()

"""The unconditional UNet of unCLIP's super-resolution stages: the conditional UNet without conditioning."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import Config
from .layers import ModelOutput
from .unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(Config):
    sample_size: int | tuple | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"  # read by AttnDownBlock2D only (as upsample_type by AttnUpBlock2D)
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    # Karlo's super-resolution UNets (resnet blocks, a mid block of two resnets), the reference's defaults
    # and its unCLIP test UNets (a mid block with attention).
    choices = {
        "down_block_types": ("ResnetDownsampleBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("ResnetUpsampleBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        "mid_block_type": (None, "UNetMidBlock2D"), "add_attention": (False, True), "act_fn": ("silu",),
        "time_embedding_type": ("positional",), "class_embed_type": (None,), "num_class_embeds": (None,),
        "resnet_time_scale_shift": ("default", "scale_shift"), "downsample_type": ("conv", "resnet"),
        "upsample_type": ("conv", "resnet"), "attn_norm_num_groups": (None,),
    }

    def check(self, source: str = "config") -> None:
        super().check(source)
        for key, attn in (("downsample_type", "AttnDownBlock2D"), ("upsample_type", "AttnUpBlock2D")):
            kinds = self.down_block_types if key == "downsample_type" else self.up_block_types
            if getattr(self, key) != "conv" and attn in kinds:
                raise ValueError(f"{source}: {key}={getattr(self, key)!r} with {attn} is not supported")
        if len({len(self.down_block_types), len(self.block_out_channels), len(self.up_block_types)}) != 1:
            raise ValueError(f"{source}: down_block_types, up_block_types and block_out_channels must "
                             f"have one entry per level")

    def __getattr__(self, name: str):
        """What the conditional UNet's builder reads and this model lacks: its defaults (no conditioning)."""
        field = UNet2DConditionConfig.__dataclass_fields__.get(name)
        if field is None or field.default is dataclasses.MISSING:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        return field.default


@dataclasses.dataclass
class UNet2DOutput(ModelOutput):
    sample: torch.Tensor


class UNet2DModel(UNet2DConditionModel):
    """Karlo's super-resolution UNets (`super_res_first`, `super_res_last`): the input is the noisy image
    concatenated with the upscaled decoder image, hence twice the image channels."""

    config_class = UNet2DConfig

    def build_blocks(self, time_dim: int) -> None:
        super().build_blocks(time_dim)
        if self.mid_block is not None and not self.config.add_attention:
            self.mid_block.attentions = nn.ModuleList([None] * len(self.mid_block.attentions))

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        if class_labels is not None:
            raise ValueError("class_labels need class_embed_type or num_class_embeds, not supported here")
        x = super().forward(sample, timestep, return_dict=False)[0]
        return UNet2DOutput(sample=x) if return_dict else (x,)

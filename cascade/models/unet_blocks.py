"""One down, one up and one mid block for every UNet and autoencoder, chosen by the reference's type names.

A block owns `resnets`, `attentions` and `downsamplers`/`upsamplers`, exactly the checkpoint keys; the
tables say which attention and which resampler each type name stands for.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D

# norm: the resnets' time_embedding_norm, None for the model's own (MoVQ decodes with "spatial" norms under
# the same type names). attention: None, "self" (autoencoders: one head, residual) or "added_kv" (unCLIP and
# Kandinsky: the context's keys and values go before the sample's own). resampler: "conv" (strided conv /
# nearest + conv) or "resnet" (a ResnetBlock2D with down=True / up=True).
DOWN_BLOCKS = {  # type name: (norm, attention, resampler)
    "DownEncoderBlock2D": (None, None, "conv"),
    "AttnDownEncoderBlock2D": (None, "self", "conv"),
    "ResnetDownsampleBlock2D": (None, None, "resnet"),
    "SimpleCrossAttnDownBlock2D": (None, "added_kv", "resnet"),
}
UP_BLOCKS = {  # type name: (norm, attention, resampler, concatenates the down path's skip features)
    "UpDecoderBlock2D": (None, None, "conv", False),
    "AttnUpDecoderBlock2D": (None, "self", "conv", False),
    "ResnetUpsampleBlock2D": (None, None, "resnet", True),
    "SimpleCrossAttnUpBlock2D": (None, "added_kv", "resnet", True),
}
MID_BLOCKS = {  # type name: (norm, attention)
    "UNetMidBlock2D": (None, "self"),
    "UNetMidBlock2DSimpleCrossAttn": (None, "added_kv"),
}


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """What a model tells all of its blocks; `dataclasses.replace` gives per-block variants."""

    temb_channels: int | None = None
    groups: int = 32
    eps: float = 1e-6
    act_fn: str = "silu"
    time_embedding_norm: str = "default"  # or "scale_shift", "spatial"
    output_scale_factor: float = 1.0
    skip_time_act: bool = False
    dropout: float = 0.0
    attention_head_dim: int | None = None  # None: one head over all channels
    cross_attention_dim: int | None = None
    only_cross_attention: bool = False
    cross_attention_norm: str | None = None
    downsample_padding: int = 1
    add_attention: bool = True


def with_norm(o: BlockOptions, norm: str | None) -> BlockOptions:
    return o if norm is None else dataclasses.replace(o, time_embedding_norm=norm)


def make_resnet(o: BlockOptions, in_channels: int, out_channels: int, **resample) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels, out_channels, o.temb_channels, o.groups, o.eps, o.time_embedding_norm,
                         o.act_fn, o.output_scale_factor, o.skip_time_act, dropout=o.dropout, **resample)


def make_attention(kind: str | None, channels: int, o: BlockOptions) -> Attention | None:
    if kind is None or not o.add_attention:
        return None
    head_dim = o.attention_head_dim or channels
    if kind == "self":  # the reference group-normalises here only beside "default" resnets
        norm = o.time_embedding_norm
        return Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=True, eps=o.eps,
                         rescale_output_factor=o.output_scale_factor, residual_connection=True,
                         norm_num_groups=o.groups if norm == "default" else None,
                         spatial_norm_dim=o.temb_channels if norm == "spatial" else None)
    return Attention(channels, cross_attention_dim=channels, heads=channels // head_dim, dim_head=head_dim,
                     bias=True, added_kv_proj_dim=o.cross_attention_dim, norm_num_groups=o.groups,
                     only_cross_attention=o.only_cross_attention, cross_attention_norm=o.cross_attention_norm)


def attention_list(kind: str | None, channels: int, o: BlockOptions, n: int) -> nn.ModuleList | None:
    layers = [make_attention(kind, channels, o) for _ in range(n)]
    return None if layers[0] is None else nn.ModuleList(layers)


def make_resampler(kind: str, direction: str, channels: int, o: BlockOptions) -> nn.ModuleList:
    if kind == "resnet":
        layer = make_resnet(o, channels, channels, **{direction: True})
    elif direction == "down":
        layer = Downsample2D(channels, padding=o.downsample_padding)
    else:
        layer = Upsample2D(channels)
    return nn.ModuleList([layer])


class DownBlock(nn.Module):
    """`num_layers` resnets (each followed by attention if the type has it), then an optional downsampler."""

    def __init__(self, block_type: str, in_channels: int, out_channels: int, num_layers: int, o: BlockOptions,
                 add_downsample: bool = True):
        super().__init__()
        norm, attention, resampler = DOWN_BLOCKS[block_type]
        o = with_norm(o, norm)
        self.resnets = nn.ModuleList(make_resnet(o, in_channels if i == 0 else out_channels, out_channels)
                                     for i in range(num_layers))
        self.attentions = attention_list(attention, out_channels, o, num_layers)
        self.downsamplers = make_resampler(resampler, "down", out_channels, o) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        """Returns the output and the features the up path takes as skip connections."""
        x, states = hidden_states, ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, encoder_hidden_states, attention_mask, temb)
            states += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, temb)
            states += (x,)
        return x, states


class UpBlock(nn.Module):
    """Like DownBlock, upsampling; UNet types concatenate a skip feature before each resnet."""

    def __init__(self, block_type: str, in_channels: int, out_channels: int, num_layers: int, o: BlockOptions,
                 add_upsample: bool = True, prev_output_channel: int | None = None):
        super().__init__()
        norm, attention, resampler, self.skip = UP_BLOCKS[block_type]
        o = with_norm(o, norm)
        resnets = []
        for i in range(num_layers):
            if self.skip:  # the first resnet takes the level below, the last the block's input skip
                cin = (prev_output_channel if i == 0 else out_channels) + (
                    in_channels if i == num_layers - 1 else out_channels)
            else:
                cin = in_channels if i == 0 else out_channels
            resnets.append(make_resnet(o, cin, out_channels))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = attention_list(attention, out_channels, o, num_layers)
        self.upsamplers = make_resampler(resampler, "up", out_channels, o) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple = (),
                temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states
        for i, resnet in enumerate(self.resnets):
            if self.skip:
                x = torch.cat([x, res_hidden_states_tuple[-1 - i]], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, encoder_hidden_states, attention_mask, temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, temb)
        return x


class MidBlock(nn.Module):
    """resnet, then `num_layers` x (attention, resnet) at constant width."""

    def __init__(self, block_type: str, channels: int, o: BlockOptions, num_layers: int = 1):
        super().__init__()
        norm, attention = MID_BLOCKS[block_type]
        o = with_norm(o, norm)
        self.resnets = nn.ModuleList(make_resnet(o, channels, channels) for _ in range(num_layers + 1))
        self.attentions = nn.ModuleList(make_attention(attention, channels, o) for _ in range(num_layers))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x, encoder_hidden_states, attention_mask, temb)
            x = resnet(x, temb)
        return x

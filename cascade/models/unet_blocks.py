"""One down, one up and one mid block for every UNet and autoencoder, chosen by the reference's type names.

A block owns `resnets`, `attentions` and `downsamplers`/`upsamplers`, exactly the checkpoint keys; the
tables say which attention and which resampler each type name stands for.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .layers import AdaGroupNorm, Attention, Downsample2D, KResample2D, ResnetBlock2D, Upsample2D

# norm: the resnets' time_embedding_norm, None for the model's own (MoVQ decodes with "spatial" norms under
# the same type names). attention: None, "self" (autoencoders and mid blocks: residual, group-normed beside
# "default" resnets only), "grouped" (UNet2DModel's attention blocks: "self", always group-normed),
# "added_kv" (unCLIP and Kandinsky: the context's keys and values go before the sample's own) or "k"
# (KAttentionBlock). resampler:
# "conv" (strided conv / nearest + conv), "resnet" (a ResnetBlock2D with down=True / up=True) or "k" (the
# k-diffusion UNet's filter; these blocks also pass skips in its layout, see DownBlock / k_up_layout).
DOWN_BLOCKS = {  # type name: (norm, attention, resampler)
    "DownEncoderBlock2D": (None, None, "conv"),
    "DownBlock2D": (None, None, "conv"),
    "AttnDownBlock2D": (None, "grouped", "conv"),
    "AttnDownEncoderBlock2D": (None, "self", "conv"),
    "ResnetDownsampleBlock2D": (None, None, "resnet"),
    "SimpleCrossAttnDownBlock2D": (None, "added_kv", "resnet"),
    "KDownBlock2D": ("ada_group", None, "k"),
    "KCrossAttnDownBlock2D": ("ada_group", "k", "k"),
}
UP_BLOCKS = {  # type name: (norm, attention, resampler, concatenates the down path's skip features)
    "UpDecoderBlock2D": (None, None, "conv", False),
    "UpBlock2D": (None, None, "conv", True),
    "AttnUpBlock2D": (None, "grouped", "conv", True),
    "AttnUpDecoderBlock2D": (None, "self", "conv", False),
    "ResnetUpsampleBlock2D": (None, None, "resnet", True),
    "SimpleCrossAttnUpBlock2D": (None, "added_kv", "resnet", True),
    "KUpBlock2D": ("ada_group", None, "k", True),
    "KCrossAttnUpBlock2D": ("ada_group", "k", "k", True),
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


def make_resnet(o: BlockOptions, in_channels: int, out_channels: int, **extra) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels, out_channels, o.temb_channels, o.groups, o.eps, o.time_embedding_norm,
                         o.act_fn, o.output_scale_factor, o.skip_time_act, dropout=o.dropout, **extra)


class KAttentionBlock(nn.Module):
    """k-diffusion's attention: AdaGN-normed self-attention (the deepest level only), then cross-attention
    to the layer-normed context, each added to its input."""

    def __init__(self, dim: int, head_dim: int, cross_attention_dim: int, temb_channels: int,
                 self_attention: bool):
        super().__init__()
        groups, heads = max(1, dim // 32), dim // head_dim
        if self_attention:
            self.norm1 = AdaGroupNorm(temb_channels, dim, groups)
            self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, bias=True)
        self.norm2 = AdaGroupNorm(temb_channels, dim, groups)
        self.attn2 = Attention(dim, cross_attention_dim, heads, head_dim, bias=True,
                               cross_attention_norm="layer_norm")

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                temb: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "attn1"):
            x = x + self.attn1(self.norm1(x, temb))
        return x + self.attn2(self.norm2(x, temb), context, mask)


def make_attention(kind: str | None, channels: int, o: BlockOptions, self_attention: bool = False):
    if kind is None or not o.add_attention:
        return None
    head_dim = o.attention_head_dim or channels
    if kind == "k":
        return KAttentionBlock(channels, head_dim, o.cross_attention_dim, o.temb_channels, self_attention)
    if kind in ("self", "grouped"):  # the mid block group-normalises only beside "default" resnets
        norm = "default" if kind == "grouped" else o.time_embedding_norm
        return Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=True, eps=o.eps,
                         rescale_output_factor=o.output_scale_factor, residual_connection=True,
                         norm_num_groups=o.groups if norm == "default" else None,
                         spatial_norm_dim=o.temb_channels if norm == "spatial" else None)
    return Attention(channels, cross_attention_dim=channels, heads=channels // head_dim, dim_head=head_dim,
                     bias=True, added_kv_proj_dim=o.cross_attention_dim, norm_num_groups=o.groups,
                     only_cross_attention=o.only_cross_attention, cross_attention_norm=o.cross_attention_norm)


def attention_list(kind: str | None, widths: list[int], o: BlockOptions, self_attention: bool = False):
    layers = [make_attention(kind, c, o, self_attention) for c in widths]
    return None if layers[0] is None else nn.ModuleList(layers)


def make_resampler(kind: str, direction: str, channels: int, o: BlockOptions) -> nn.ModuleList:
    if kind == "resnet":
        layer = make_resnet(o, channels, channels, **{direction: True})
    elif kind == "k":
        layer = KResample2D(direction)
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
        o, self.k = with_norm(o, norm), resampler == "k"
        self.resnets = nn.ModuleList(make_resnet(o, in_channels if i == 0 else out_channels, out_channels)
                                     for i in range(num_layers))
        # The k-diffusion UNet's deepest level (no downsampler) also attends to itself.
        self.attentions = attention_list(attention, [out_channels] * num_layers, o, not add_downsample)
        self.downsamplers = make_resampler(resampler, "down", out_channels, o) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, downsample: bool = True):
        """Returns the output and the features the up path takes as skip connections. `downsample=False`
        stops before the downsampler (see `downsample`): the UNet's shallow stage ends there."""
        x, states = hidden_states, ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, encoder_hidden_states, attention_mask, temb)
            states += (x,)
        if self.downsamplers is None and self.k and self.attentions is not None:
            states = (None,) * len(states)  # k-diffusion's deepest level hands no skips up
        if downsample:
            x, skip = self.downsample(x, temb)
            states += skip
        return x, states

    def downsample(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """The downsampler's output and the skip it hands up (none in k-diffusion's layout)."""
        if self.downsamplers is None:
            return x, ()
        x = self.downsamplers[0](x, temb)
        return x, () if self.k else (x,)


def k_up_layout(in_channels: int, out_channels: int, n: int, temb_channels: int, attention: str | None):
    """A k-diffusion up block's (resnet input, width, output) per layer and whether it attends to itself.

    Its deepest level (cross-attention at the embedding's width) takes no skip and has self-attention; the
    others concatenate one skip before the first resnet. The last layer narrows to `in_channels`, the next
    level's width: the whole resnet in KUpBlock2D, only its second conv in KCrossAttnUpBlock2D (as the
    reference builds them)."""
    deepest = attention is not None and in_channels == out_channels == temb_channels
    rows = []
    for i in range(n):
        cout = in_channels if i == n - 1 else out_channels
        cin = out_channels if i > 0 or deepest else 2 * out_channels
        rows.append((cin, out_channels if attention else cout, cout))
    return rows, deepest


def freeu(x: torch.Tensor, skip: torch.Tensor, s: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU (Si et al. 2023): the backbone's first half of channels times b; the skip's lowest frequencies
    (the 2x2 centre of its shifted spectrum) times s."""
    half = x.shape[1] // 2
    x = torch.cat([x[:, :half] * b, x[:, half:]], dim=1)
    spectrum = torch.fft.fftshift(torch.fft.fft2(skip.float()), dim=(-2, -1))
    h, w = (max(n // 2 - 1, 0) for n in spectrum.shape[-2:])
    spectrum[..., h:h + 2, w:w + 2] *= s
    return x, torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.to(skip.dtype)


class UpBlock(nn.Module):
    """Like DownBlock, upsampling; UNet types concatenate a skip feature before each resnet (k-diffusion's
    before the first only). `freeu = (s, b)` rescales what is concatenated (see
    UNet2DConditionModel.enable_freeu)."""

    def __init__(self, block_type: str, in_channels: int, out_channels: int, num_layers: int, o: BlockOptions,
                 add_upsample: bool = True, prev_output_channel: int | None = None):
        super().__init__()
        norm, attention, resampler, self.skip = UP_BLOCKS[block_type]
        o, self.k, self.freeu, self_attention = with_norm(o, norm), resampler == "k", None, False
        if self.k:
            rows, self_attention = k_up_layout(in_channels, out_channels, num_layers - 1, o.temb_channels,
                                               attention)
            self.skip = not self_attention
        elif self.skip:  # the first resnet takes the level below, the last the block's input skip
            rows = [((prev_output_channel if i == 0 else out_channels) + (
                in_channels if i == num_layers - 1 else out_channels), out_channels, out_channels)
                for i in range(num_layers)]
        else:
            rows = [(in_channels if i == 0 else out_channels, out_channels, out_channels)
                    for i in range(num_layers)]
        self.resnets = nn.ModuleList(make_resnet(o, cin, width, conv_2d_out_channels=cout)
                                     for cin, width, cout in rows)
        self.attentions = attention_list(attention, [cout for *_, cout in rows], o, self_attention)
        self.upsamplers = make_resampler(resampler, "up", out_channels, o) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple = (),
                temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states
        for i, resnet in enumerate(self.resnets):
            if self.skip and (i == 0 or not self.k):
                skip = res_hidden_states_tuple[-1 - i]
                if self.freeu is not None:
                    x, skip = freeu(x, skip, *self.freeu)
                x = torch.cat([x, skip], dim=1)
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

"""Building blocks shared by the convolutional models: attention, resnets, resampling, embeddings."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class ModelOutput:
    """Outputs by attribute, by name (`out["sample"]`) or by position (`out[0]`; unset ones are skipped)."""

    def to_tuple(self) -> tuple:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return tuple(v for v in values if v is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@functools.cache
def xformers_kernel():
    """xformers' memory_efficient_attention when installed, else None."""
    if importlib.util.find_spec("xformers") is None:
        return None
    import xformers.ops

    return xformers.ops.memory_efficient_attention


def scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """SDPA's maths in the order of the reference's AttnProcessor (baddbmm, softmax, bmm): other rounding."""
    q3, k3, v3 = (x.flatten(0, -3) for x in (q, k, v))
    shape = (q3.shape[0], q3.shape[1], k3.shape[1])
    mask = None if attn_mask is None else attn_mask.expand(*q.shape[:-1], shape[2]).reshape(shape)
    base = q3.new_empty(shape) if mask is None else mask
    scores = torch.baddbmm(base, q3, k3.transpose(1, 2), beta=float(attn_mask is not None),
                           alpha=q.shape[-1] ** -0.5)
    return torch.bmm(scores.softmax(-1), v3).unflatten(0, q.shape[:-2])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           slice_size: int | None = None, memory_efficient: bool = False, op=None,
           explicit: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (batch, heads, tokens, head_dim); the one place attention is computed.

    The options are the models' switches (cascade/attention_options.py): `memory_efficient` uses xformers when
    installed (SDPA is already memory-efficient otherwise) and wins over slicing, as in the reference;
    `slice_size` runs at most that many (batch x head) rows at a time; `explicit` uses `scores_attention`, for
    the models the reference runs with its AttnProcessor rather than SDPA (Würstchen's stage C)."""
    kernel = xformers_kernel() if memory_efficient else None
    if kernel is not None:  # xformers wants (batch, tokens, heads, head_dim)
        bias = None if mask is None else mask.expand(*q.shape[:3], k.shape[2]).to(q.dtype)
        return kernel(*(x.transpose(1, 2) for x in (q, k, v)), attn_bias=bias, op=op).transpose(1, 2)
    sdpa = scores_attention if explicit else F.scaled_dot_product_attention
    if slice_size is None or memory_efficient:
        return sdpa(q, k, v, attn_mask=mask)
    rows, n = q.shape[:2], slice_size
    if mask is not None:
        mask = mask.expand(*rows, *mask.shape[2:]).flatten(0, 1)
    q, k, v = (x.flatten(0, 1) for x in (q, k, v))
    out = [sdpa(q[i:i + n], k[i:i + n], v[i:i + n], attn_mask=None if mask is None else mask[i:i + n])
           for i in range(0, q.shape[0], n)]
    return torch.cat(out).unflatten(0, rows)


class Attention(nn.Module):
    """Multi-head attention over tokens (B, N, C) or feature maps (B, C, H, W), keys as in the reference.

    `added_kv_proj_dim` gives the unCLIP/Kandinsky variant: the context is projected by `add_k_proj` /
    `add_v_proj` and its keys and values are put before the sample's own (none with `only_cross_attention`);
    `cross_attention_norm="group_norm"` normalises that context first.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0, bias: bool = False, out_bias: bool = True,
                 added_kv_proj_dim: int | None = None, cross_attention_norm: str | None = None,
                 cross_attention_norm_num_groups: int = 32, norm_num_groups: int | None = None,
                 spatial_norm_dim: int | None = None, only_cross_attention: bool = False,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0, eps: float = 1e-5):
        super().__init__()
        if cross_attention_norm not in (None, "group_norm", "layer_norm"):
            raise ValueError(f"cross_attention_norm={cross_attention_norm!r} is not supported")
        inner, cross_dim = dim_head * heads, cross_attention_dim or query_dim
        self.heads, self.residual_connection = heads, residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups else None
        self.spatial_norm = SpatialNorm(query_dim, spatial_norm_dim) if spatial_norm_dim else None
        # With added k/v the norm sees the context before its projection, hence `added_kv_proj_dim` channels.
        groups, context_dim = cross_attention_norm_num_groups, added_kv_proj_dim or cross_dim
        if cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(context_dim)
        else:
            self.norm_cross = nn.GroupNorm(groups, context_dim, eps=1e-5) if cross_attention_norm else None
        self.attend_options: dict = {}  # set by the models' slicing / memory-efficient switches
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = None if only_cross_attention else nn.Linear(cross_dim, inner, bias=bias)
        self.to_v = None if only_cross_attention else nn.Linear(cross_dim, inner, bias=bias)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner)
        else:
            self.add_k_proj = self.add_v_proj = None
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def heads_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        """`temb` is the spatial norm's conditioning (MoVQ's quantized latents), unused otherwise."""
        residual = hidden_states
        x = hidden_states if self.spatial_norm is None else self.spatial_norm(hidden_states, temb)
        image_shape = x.shape if x.ndim == 4 else None
        if image_shape is not None:
            x = x.flatten(2).transpose(1, 2)
        tokens = x
        if self.group_norm is not None:
            x = self.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q = self.heads_first(self.to_q(x))
        k, v = self.keys_values(x, tokens, encoder_hidden_states)
        mask = self.prepare_mask(attention_mask, q.shape[0], k.shape[2])
        out = attend(q, k, v, mask, **self.attend_options)
        out = self.to_out[1](self.to_out[0](out.transpose(1, 2).flatten(2)))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if self.residual_connection or self.add_k_proj is not None:
            out = out + residual
        # Dividing by 1.0 would cost a pass over the output per layer (the reference skips it there too).
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor

    def keys_values(self, x: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor | None):
        """Keys and values of the context, else of the sample: normalised `x`, but the raw `tokens` in the
        added-k/v variant (the reference's order), which also appends the sample's own keys and values."""
        if context is None:
            context = tokens if self.add_k_proj is not None else x
        elif isinstance(self.norm_cross, nn.LayerNorm):
            context = self.norm_cross(context)
        elif self.norm_cross is not None:  # group norm over the channels of (B, L, C)
            context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
        if self.add_k_proj is None:
            return self.heads_first(self.to_k(context)), self.heads_first(self.to_v(context))
        k, v = self.heads_first(self.add_k_proj(context)), self.heads_first(self.add_v_proj(context))
        if self.to_k is not None:
            k = torch.cat([k, self.heads_first(self.to_k(x))], dim=2)
            v = torch.cat([v, self.heads_first(self.to_v(x))], dim=2)
        return k, v

    def prepare_mask(self, mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
        """An additive mask (B, L), (B, Q|1, L) or (B*heads, Q|1, L) -> (B, heads, Q|1, keys)."""
        if mask is None:
            return None
        if mask.shape[-1] != keys:  # the sample's own keys, appended after the context's, are never masked
            mask = F.pad(mask, (0, keys - mask.shape[-1]), value=0.0)
        if mask.ndim == 2:
            mask = mask[:, None]
        if mask.shape[0] < batch * self.heads:
            mask = mask.repeat_interleave(self.heads, dim=0)
        return mask.view(batch, self.heads, -1, keys)


class AdaGroupNorm(nn.Module):
    """Group norm whose scale and shift are projected from the embedding (k-diffusion's AdaGN)."""

    def __init__(self, embedding_dim: int, out_dim: int, num_groups: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.linear = nn.Linear(embedding_dim, out_dim * 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        return F.group_norm(x, self.num_groups, eps=self.eps) * (1 + scale) + shift


class SpatialNorm(nn.Module):
    """Group norm modulated by the quantized latents (MoVQ, Zheng et al. 2022)."""

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(32, f_channels, eps=1e-6)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, f_channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        (h, w), (zh, zw) = f.shape[-2:], zq.shape[-2:]
        if h % zh or w % zw:
            zq = F.interpolate(zq, size=(h, w), mode="nearest")
            return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)
        # A 1x1 convolution commutes with nearest upsampling: run it on the small latents and broadcast over
        # each block of pixels instead of upsampling first (the reference's order): a quarter off MoVQ decoding.
        y, b = (conv(zq)[:, :, :, None, :, None] for conv in (self.conv_y, self.conv_b))
        blocks = self.norm_layer(f).unflatten(3, (zw, w // zw)).unflatten(2, (zh, h // zh))
        # Without autograd, modulate the fresh norm output in place: the same arithmetic as `blocks * y + b`
        # without two more full-size tensors, which were the peak of MoVQ decoding.
        out = blocks.mul_(y).add_(b) if not torch.is_grad_enabled() else blocks * y + b
        return out.flatten(4, 5).flatten(2, 3)


ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str | None) -> nn.Module | None:
    return None if name is None else ACTIVATIONS[name]()


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block; `time_embedding_norm` says how the embedding `temb` enters.

    "default" adds a projection of temb after conv1, "scale_shift" modulates the second norm with it,
    "spatial" (MoVQ) makes both norms SpatialNorms conditioned on temb = the quantized latents, and
    "ada_group" (k-diffusion) both AdaGroupNorms of temb, with one group per 32 channels and a bias-free
    shortcut; there `conv_2d_out_channels` can narrow the last conv.
    `up`/`down` resample (nearest / average pool) both paths after the first norm, as the unCLIP UNets do.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, time_embedding_norm: str = "default",
                 act_fn: str = "silu", output_scale_factor: float = 1.0, skip_time_act: bool = False,
                 up: bool = False, down: bool = False, dropout: float = 0.0,
                 conv_2d_out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        final_channels = conv_2d_out_channels or out_channels
        self.time_embedding_norm, self.skip_time_act = time_embedding_norm, skip_time_act
        self.output_scale_factor = output_scale_factor
        self.resample = "up" if up else "down" if down else None
        spatial, ada = time_embedding_norm == "spatial", time_embedding_norm == "ada_group"

        def norm(channels):
            if ada:
                return AdaGroupNorm(temb_channels, channels, channels // 32, eps)
            return SpatialNorm(channels, temb_channels) if spatial else nn.GroupNorm(groups, channels, eps)

        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None and not spatial and not ada:
            scale = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_emb_proj = nn.Linear(temb_channels, scale * out_channels)
        else:
            self.time_emb_proj = None
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, final_channels, 3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = (nn.Conv2d(in_channels, final_channels, 1, bias=not ada)
                              if in_channels != final_channels else None)

    @staticmethod
    def apply_norm(layer: nn.Module, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        return layer(x, temb) if isinstance(layer, (SpatialNorm, AdaGroupNorm)) else layer(x)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.nonlinearity(self.apply_norm(self.norm1, input_tensor, temb))
        if self.resample is not None:
            input_tensor, x = resample(input_tensor, self.resample), resample(x, self.resample)
        x = self.conv1(x)
        if self.time_emb_proj is not None:
            temb = temb if self.skip_time_act else self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            scale, shift = temb.chunk(2, dim=1)
            x = self.norm2(x) * (1 + scale) + shift
        else:
            if self.time_emb_proj is not None:
                x = x + temb
            x = self.apply_norm(self.norm2, x, temb)
        x = self.conv2(self.dropout(self.nonlinearity(x)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + x) / self.output_scale_factor


def resample(x: torch.Tensor, direction: str) -> torch.Tensor:
    """The parameter-free 2x resampling of resnets and of Downsample2D/Upsample2D without a conv."""
    if direction == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class KResample2D(nn.Module):
    """k-diffusion's parameter-free 2x resampling: the separable [1, 3, 3, 1] / 8 filter per channel on
    reflect-padded input, strided (down) or transposed (up, filter doubled per axis)."""

    def __init__(self, direction: str):
        super().__init__()
        self.direction = direction

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        k = torch.tensor([1 / 8, 3 / 8, 3 / 8, 1 / 8], dtype=x.dtype, device=x.device)
        channels, padded = x.shape[1], F.pad(x, (1, 1, 1, 1), mode="reflect")
        if self.direction == "down":
            return F.conv2d(padded, (k[:, None] * k).expand(channels, 1, 4, 4), stride=2, groups=channels)
        k = 2 * k
        return F.conv_transpose2d(padded, (k[:, None] * k).expand(channels, 1, 4, 4), stride=2, padding=3,
                                  groups=channels)


class Downsample2D(nn.Module):
    """Strided 3x3 conv; padding 0 means the asymmetric (0, 1, 0, 1) pad of the VAE encoders."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # `temb` is unused; it keeps the call the same as for the resnet downsamplers.
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """Nearest 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(resample(x, "up"))  # `temb` unused, as in Downsample2D


class Timesteps(nn.Module):
    """Sinusoidal timestep features (Vaswani et al. 2017), in the reference's layout and frequency shift."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                 scale: float = 1):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = num_channels, flip_sin_to_cos
        self.downscale_freq_shift, self.scale = downscale_freq_shift, scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = torch.exp(exponent / (half - self.downscale_freq_shift))
        args = self.scale * (timesteps[:, None].float() * freqs[None])
        halves = [args.cos(), args.sin()] if self.flip_sin_to_cos else [args.sin(), args.cos()]
        emb = torch.cat(halves, dim=-1)
        return F.pad(emb, (0, self.num_channels % 2))


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the (log-)noise level, [sin, cos] or flipped (Tancik et al. 2020)."""

    def __init__(self, embedding_size: int = 256, flip_sin_to_cos: bool = False):
        super().__init__()
        self.flip_sin_to_cos = flip_sin_to_cos
        self.weight = nn.Parameter(torch.randn(embedding_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None] * self.weight[None, :] * 2 * math.pi
        return torch.cat([x.cos(), x.sin()] if self.flip_sin_to_cos else [x.sin(), x.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on timestep features, plus a projection of an extra condition (`cond_proj_dim`)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu",
                 out_dim: int | None = None, post_act_fn: str | None = None,
                 cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = activation(post_act_fn)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return sample if self.post_act is None else self.post_act(sample)


class ImageTimeEmbedding(nn.Module):
    """Kandinsky 2.2's image embedding added to the time embedding."""

    def __init__(self, image_embed_dim: int = 768, time_embed_dim: int = 1536):
        super().__init__()
        self.image_proj = nn.Linear(image_embed_dim, time_embed_dim)
        self.image_norm = nn.LayerNorm(time_embed_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.image_norm(self.image_proj(image_embeds))


class ImageHintTimeEmbedding(ImageTimeEmbedding):
    """ImageTimeEmbedding plus the ControlNet hint encoder: (B, 3, H, W) -> (B, 4, H/8, W/8)."""

    def __init__(self, image_embed_dim: int = 768, time_embed_dim: int = 1536):
        super().__init__(image_embed_dim, time_embed_dim)
        layers, c_in = [], 3
        for c, stride in [(16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2)]:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, stride=stride), nn.SiLU()]
            c_in = c
        self.input_hint_block = nn.Sequential(*layers, nn.Conv2d(256, 4, 3, padding=1))

    def forward(self, image_embeds: torch.Tensor, hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(image_embeds), self.input_hint_block(hint)


class ImageProjection(nn.Module):
    """An image embedding -> `num_image_text_embeds` context tokens for cross-attention."""

    def __init__(self, image_embed_dim: int = 768, cross_attention_dim: int = 768,
                 num_image_text_embeds: int = 32):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(x.reshape(x.shape[0], self.num_image_text_embeds, -1))

"""Würstchen v2: stage C prior (`WuerstchenPrior`), stage B decoder (`WuerstchenDiffNeXt`), stage A VQGAN."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..loading import ModelMixin
from .autoencoders import DecoderOutput, VectorQuantizer, VQEncoderOutput
from .layers import Attention
from .tiling import TiledDecoding


class LayerNorm2d(nn.LayerNorm):
    """Parameter-free LayerNorm over the channels of a (B, C, H, W) map; eps 1e-6 throughout Würstchen."""

    def __init__(self, c: int):
        super().__init__(c, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response normalisation of channels-last (B, H, W, C) features."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The L2 norm over all positions exceeds float16's range on stage B's large maps (black images in
        # the reference); taken in float32 it is unchanged in float32 and finite in float16.
        norm = torch.linalg.vector_norm(x.float(), dim=(1, 2), keepdim=True)
        scale = (norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.gamma * (x * scale) + self.beta + x


class TimestepBlock(nn.Module):
    """Scale and shift of the features from the embedded timestep r."""

    def __init__(self, c: int, c_r: int):
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class ResBlock(nn.Module):
    """ConvNeXt block; stage B joins its skip features (effnet, U-Net) to the normalised depthwise output.

    Stage C never passes a skip, so this is also its block (the reference's `ResBlock` and `ResBlockStageB`
    coincide there).
    """

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c + c_skip, c * 4), nn.GELU(), GlobalResponseNorm(c * 4),
                                         nn.Dropout(dropout), nn.Linear(c * 4, c))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        return self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x


class AttnBlock(nn.Module):
    """Self-attention whose keys and values also hold the mapped conditioning tokens."""

    def __init__(self, c: int, c_cond: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.norm = LayerNorm2d(c)
        self.attention = Attention(c, heads=nhead, dim_head=c // nhead, dropout=dropout, bias=True)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        kv = torch.cat([h.flatten(2).transpose(1, 2), self.kv_mapper(cond)], dim=1)
        return x + self.attention(h, encoder_hidden_states=kv)


def run_block(block: nn.Module, x, r_embed, cond, skip=None) -> torch.Tensor:
    """Feed a block the input its type takes; resamplers take x alone."""
    if isinstance(block, ResBlock):
        return block(x, skip)
    if isinstance(block, AttnBlock):
        return block(x, cond)
    if isinstance(block, TimestepBlock):
        return block(x, r_embed)
    return block(x)


def r_embedding(r: torch.Tensor, c_r: int, dtype: torch.dtype, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the continuous timestep r in [0, 1].

    Computed in float32 whatever r's dtype: the reference scales r by 10^4 in r's dtype, and in float16 that
    rounds the angle by up to 4 radians, scrambling the high frequencies (pass r as float32 to avoid it).
    """
    half = c_r // 2
    freqs = torch.arange(half, device=r.device).float().mul(-math.log(max_positions) / (half - 1)).exp()
    emb = (r.float() * max_positions)[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return F.pad(emb, (0, c_r % 2)).to(dtype)


# --- Stage C


@dataclass(frozen=True)
class WuerstchenPriorConfig(Config):
    c_in: int = 16
    c: int = 1280
    c_cond: int = 1024
    c_r: int = 64
    depth: int = 16
    nhead: int = 16
    dropout: float = 0.1


class WuerstchenPrior(ModelMixin):
    """Stage C: text embeddings -> the 16-channel EfficientNet latents stage B is conditioned on."""

    config_class = WuerstchenPriorConfig

    def __init__(self, config: WuerstchenPriorConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        k = self.config
        self.projection = nn.Conv2d(k.c_in, k.c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(k.c_cond, k.c), nn.LeakyReLU(0.2), nn.Linear(k.c, k.c))
        self.blocks = nn.ModuleList()
        for _ in range(k.depth):
            self.blocks.extend([ResBlock(k.c, dropout=k.dropout), TimestepBlock(k.c, k.c_r),
                                AttnBlock(k.c, k.c, k.nhead, k.dropout)])
        for block in self.blocks[2::3]:  # the reference runs stage C's attention on explicit scores, not SDPA
            block.attention.attend_options["explicit"] = True
        self.out = nn.Sequential(LayerNorm2d(k.c), nn.Conv2d(k.c, k.c_in * 2, kernel_size=1))

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.projection(x)
        cond, r_embed = self.cond_mapper(c), r_embedding(r, self.config.c_r, h.dtype)
        for block in self.blocks:
            h = run_block(block, h, r_embed, cond)
        a, b = self.out(h).chunk(2, dim=1)
        return (x - a) / ((1 - b).abs() + 1e-5)


# --- Stage B


@dataclass(frozen=True)
class WuerstchenDiffNeXtConfig(Config):
    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, 10, 20, 20)
    blocks: tuple[int, ...] = (4, 4, 14, 4)
    level_config: tuple[str, ...] = ("CT", "CTA", "CTA", "CTA")
    inject_effnet: tuple[bool, ...] = (False, True, True, True)
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3
    dropout: float | tuple[float, ...] = 0.1

    def check(self, source: str = "config") -> None:
        super().check(source)
        unknown = set("".join(self.level_config)) - set("CTA")
        if unknown:
            raise ValueError(f"{source}: level_config block types {sorted(unknown)} are not supported")


class WuerstchenDiffNeXt(ModelMixin):
    """Stage B: a U-Net over the VQGAN latents, conditioned on stage C's latents ("effnet") and CLIP."""

    config_class = WuerstchenDiffNeXtConfig

    def __init__(self, config: WuerstchenDiffNeXtConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        k, n = self.config, len(self.config.c_hidden)
        c, p, c_cond = k.c_hidden, k.patch_size, k.c_cond
        self.clip_mapper = nn.Linear(k.clip_embd, c_cond)
        inject = (*k.inject_effnet, *reversed(k.inject_effnet))  # down levels, then up levels
        mappers = [nn.Conv2d(k.effnet_embd, c_cond, 1) if on else None for on in inject]
        self.effnet_mappers = nn.ModuleList(mappers)
        self.seq_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        patches = nn.Conv2d(k.c_in * p * p, c[0], 1)
        self.embedding = nn.Sequential(nn.PixelUnshuffle(p), patches, LayerNorm2d(c[0]))
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            down = [nn.Sequential(LayerNorm2d(c[i - 1]), nn.Conv2d(c[i - 1], c[i], 2, 2))] if i else []
            self.down_blocks.append(nn.ModuleList(down + self.level(i, c_first_skip=0)))
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            up = [nn.Sequential(LayerNorm2d(c[i]), nn.ConvTranspose2d(c[i], c[i - 1], 2, 2))] if i else []
            self.up_blocks.append(nn.ModuleList(self.level(i, c_first_skip=c[i] if i < n - 1 else 0) + up))
        unpatch = nn.Conv2d(c[0], 2 * k.c_out * p * p, 1)
        self.clf = nn.Sequential(LayerNorm2d(c[0]), unpatch, nn.PixelShuffle(p))

    def level(self, i: int, c_first_skip: int) -> list[nn.Module]:
        """The blocks of level i; the first block of an up level also takes the down path's features."""
        k = self.config
        c, c_effnet = k.c_hidden[i], k.c_cond if k.inject_effnet[i] else 0
        dropout = k.dropout[i] if isinstance(k.dropout, tuple) else k.dropout
        blocks = []
        for j in range(k.blocks[i]):
            for t, kind in enumerate(k.level_config[i]):
                if kind == "C":
                    c_skip = (c_first_skip if j == t == 0 else 0) + c_effnet
                    blocks.append(ResBlock(c, c_skip, kernel_size=k.kernel_size, dropout=dropout))
                elif kind == "T":
                    blocks.append(TimestepBlock(c, k.c_r))
                else:
                    blocks.append(AttnBlock(c, k.c_cond, k.nhead[i], dropout))
        return blocks

    def run_level(self, blocks, x, r_embed, clip, effnet, mapper, skip=None) -> torch.Tensor:
        effnet_c = None
        for j, block in enumerate(blocks):
            joined = None
            if isinstance(block, ResBlock):
                # Resized to the level's resolution, known only after its downsampler has run.
                if mapper is not None and effnet_c is None:
                    resized = F.interpolate(effnet.float(), size=x.shape[-2:], mode="bicubic", antialias=True,
                                            align_corners=True)
                    effnet_c = mapper(resized.to(effnet.dtype))
                parts = [s for s in (skip if j == 0 else None, effnet_c) if s is not None]
                joined = torch.cat(parts, dim=1) if parts else None
            x = run_block(block, x, r_embed, clip, joined)
        return x

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor,
                clip: torch.Tensor | None = None, x_cat: torch.Tensor | None = None, eps: float = 1e-3,
                return_noise: bool = True):
        if x_cat is not None:
            x = torch.cat([x, x_cat], dim=1)
        r_embed = r_embedding(r, self.config.c_r, x.dtype)
        if clip is not None:
            clip = self.seq_norm(self.clip_mapper(clip))
        h, skips, n = self.embedding(x), [], len(self.down_blocks)
        for i, blocks in enumerate(self.down_blocks):
            h = self.run_level(blocks, h, r_embed, clip, effnet, self.effnet_mappers[i])
            skips.insert(0, h)
        for i, blocks in enumerate(self.up_blocks):
            skip = skips[i] if i else None
            h = self.run_level(blocks, h, r_embed, clip, effnet, self.effnet_mappers[n + i], skip)
        a, b = self.clf(h).chunk(2, dim=1)
        b = b.sigmoid() * (1 - eps * 2) + eps
        return (x - a) / b if return_noise else (a, b)


# --- Stage A


class MixingResidualBlock(nn.Module):
    """Paella's block: depthwise then channelwise residual mixing, modulated by six learned scalars."""

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = LayerNorm2d(c)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        x = x + self.depthwise(self.norm1(x) * (1 + g[0]) + g[1]) * g[2]
        h = (self.norm2(x) * (1 + g[3]) + g[4]).permute(0, 2, 3, 1)
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


@dataclass(frozen=True)
class PaellaVQModelConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764


class PaellaVQModel(TiledDecoding, ModelMixin):
    """Stage A: the VQGAN between images and the 4-channel latents stage B denoises."""

    config_class = PaellaVQModelConfig

    def __init__(self, config: PaellaVQModelConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        k, s = self.config, self.config.up_down_scale_factor
        c = [k.embed_dim // 2**i for i in reversed(range(k.levels))]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(s), nn.Conv2d(k.in_channels * s**2, c[0], 1))
        down = []
        for i in range(k.levels):
            down += [nn.Conv2d(c[i - 1], c[i], 4, stride=2, padding=1)] if i else []
            down.append(MixingResidualBlock(c[i], c[i] * 4))
        to_latent = nn.Conv2d(c[-1], k.latent_channels, 1, bias=False)
        self.down_blocks = nn.Sequential(*down, nn.Sequential(to_latent, nn.BatchNorm2d(k.latent_channels)))
        self.vquantizer = VectorQuantizer(k.num_vq_embeddings, k.latent_channels)
        up = [nn.Sequential(nn.Conv2d(k.latent_channels, c[-1], 1))]
        for i in reversed(range(k.levels)):
            repeats = k.bottleneck_blocks if i == k.levels - 1 else 1  # the bottleneck is the deepest level
            up += [MixingResidualBlock(c[i], c[i] * 4) for _ in range(repeats)]
            up += [nn.ConvTranspose2d(c[i], c[i - 1], 4, stride=2, padding=1)] if i else []
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c[0], k.out_channels * s**2, 1), nn.PixelShuffle(s))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        h = self.down_blocks(self.in_block(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = True, return_dict: bool = True):
        quant = h if force_not_quantize else self.vquantizer(h)[0]  # the commitment loss is not returned
        sample = self.decoded(quant, lambda q: self.out_block(self.up_blocks(q)))
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode(sample).latents, return_dict=return_dict)

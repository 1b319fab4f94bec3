"""The conditional UNet of the Kandinsky 2.2 and unCLIP decoders and of the x2 latent upscaler (k-diffusion's
UNet), built from the tables in unet_blocks.py."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import Config
from ..deepcache import DeepCache, settings_for, slot
from ..loading import ModelMixin
from .layers import (GaussianFourierProjection, ImageHintTimeEmbedding, ImageProjection, ImageTimeEmbedding,
                     ModelOutput, TimestepEmbedding, Timesteps, activation)
from .unet_blocks import BlockOptions, DownBlock, MidBlock, UpBlock

UNET_DOWN = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "KDownBlock2D", "KCrossAttnDownBlock2D")
UNET_UP = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D", "KUpBlock2D", "KCrossAttnUpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(Config):
    sample_size: int | tuple | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32  # None: no norm before conv_out (the upscaler)
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1  # only used by transformer blocks, which we do not have
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False  # scaled_dot_product_attention keeps the softmax in float32 anyway
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    choices = {
        "down_block_types": UNET_DOWN, "up_block_types": UNET_UP,
        "mid_block_type": (None, "UNetMidBlock2DSimpleCrossAttn"), "class_embed_type": (None, "identity"),
        "encoder_hid_dim_type": (None, "image_proj"), "addition_embed_type": (None, "image", "image_hint"),
        "num_class_embeds": (None,), "num_attention_heads": (None,),
        "time_embedding_type": ("positional", "fourier"), "class_embeddings_concat": (False,),
        "attention_type": ("default",),
        "resnet_time_scale_shift": ("default", "scale_shift"), "cross_attention_norm": (None, "group_norm"),
    }

    def check(self, source: str = "config") -> None:
        super().check(source)
        heads = per_block(self.attention_head_dim, len(self.block_out_channels))
        uneven = [c for c, h, kind in zip(self.block_out_channels, heads, self.down_block_types)
                  if "Attn" in kind and c % h]
        if uneven:  # the reference fails mid-forward on these
            raise ValueError(f"{source}: block_out_channels {uneven[0]} is not a multiple of attention_head_dim")
        if self.encoder_hid_dim is not None and self.encoder_hid_dim_type is None:
            raise ValueError(f"{source}: encoder_hid_dim without encoder_hid_dim_type (a text projection) "
                             "is not supported")


@dataclasses.dataclass
class UNet2DConditionOutput(ModelOutput):
    sample: torch.Tensor


def per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def as_timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
    """A number, 0-d or 1-d tensor -> one timestep per batch element (the reference's dtypes)."""
    if not torch.is_tensor(timestep):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(sample.device)
    return timestep.expand(sample.shape[0])


class UNet2DConditionModel(ModelMixin):
    """The decoder UNets of Kandinsky 2.2 (text-to-image, inpainting, depth ControlNet) and unCLIP (Karlo)."""

    config_class = UNet2DConditionConfig
    deepcache: DeepCache | None = None  # step caching, off unless enable_deepcache

    def __init__(self, config: UNet2DConditionConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        ch, k_in, k_out = c.block_out_channels, c.conv_in_kernel, c.conv_out_kernel
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], k_in, padding=(k_in - 1) // 2)
        if c.time_embedding_type == "fourier":  # of the noise level: features as wide as the embedding
            time_dim = time_in = c.time_embedding_dim or ch[0] * 2
            self.time_proj = GaussianFourierProjection(time_dim // 2, c.flip_sin_to_cos)
        else:
            time_dim, time_in = c.time_embedding_dim or ch[0] * 4, ch[0]
            self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(time_in, time_dim, c.act_fn, post_act_fn=c.timestep_post_act,
                                                cond_proj_dim=c.time_cond_proj_dim)
        self.encoder_hid_proj = (ImageProjection(c.encoder_hid_dim, c.cross_attention_dim)
                                 if c.encoder_hid_dim_type == "image_proj" else None)
        # unCLIP adds its own projection of the image embedding to the time embedding, passed as class_labels.
        self.class_embedding = nn.Identity() if c.class_embed_type == "identity" else None
        if c.addition_embed_type == "image":
            self.add_embedding = ImageTimeEmbedding(c.encoder_hid_dim, time_dim)
        elif c.addition_embed_type == "image_hint":
            self.add_embedding = ImageHintTimeEmbedding(c.encoder_hid_dim, time_dim)
        self.time_embed_act = activation(c.time_embedding_act_fn)
        self.build_blocks(time_dim)
        groups = c.norm_num_groups
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=c.norm_eps) if groups else None
        self.conv_act = activation(c.act_fn) if groups else None
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, k_out, padding=(k_out - 1) // 2)

    def build_blocks(self, time_dim: int) -> None:
        c, n = self.config, len(self.config.block_out_channels)
        ch, layers = c.block_out_channels, per_block(c.layers_per_block, n)
        heads, cross = per_block(c.attention_head_dim, n), per_block(c.cross_attention_dim, n)
        only_cross = per_block(c.only_cross_attention, n)
        o = BlockOptions(time_dim, c.norm_num_groups, c.norm_eps, c.act_fn, c.resnet_time_scale_shift,
                         c.resnet_out_scale_factor, c.resnet_skip_time_act, c.dropout,
                         cross_attention_norm=c.cross_attention_norm, downsample_padding=c.downsample_padding)

        def at(level, head_index=None):  # the reference's up path takes head dims in down-path order
            head_dim = heads[level if head_index is None else head_index]
            return dataclasses.replace(o, attention_head_dim=head_dim, cross_attention_dim=cross[level],
                                       only_cross_attention=only_cross[level])

        self.down_blocks = nn.ModuleList(
            DownBlock(t, ch[max(i - 1, 0)], ch[i], layers[i], at(i), add_downsample=i < n - 1)
            for i, t in enumerate(c.down_block_types))
        mid_only_cross = c.mid_block_only_cross_attention
        if mid_only_cross is None:
            mid_only_cross = isinstance(c.only_cross_attention, bool) and c.only_cross_attention
        mid = dataclasses.replace(at(n - 1), output_scale_factor=c.mid_block_scale_factor,
                                  only_cross_attention=mid_only_cross)
        self.mid_block = MidBlock(c.mid_block_type, ch[-1], mid) if c.mid_block_type else None
        levels = [(i, n - 1 - i, t) for i, t in enumerate(c.up_block_types)]
        self.up_blocks = nn.ModuleList(
            UpBlock(t, ch[max(level - 1, 0)], ch[level], layers[level] + 1, at(level, i),
                    add_upsample=level > 0, prev_output_channel=ch[min(level + 1, n - 1)])
            for i, level, t in levels)

    def embed(self, sample, timestep, encoder_hidden_states, class_labels, added_cond_kwargs, timestep_cond):
        """The time (+class, +image) embedding, the cross-attention context, the sample with any hint."""
        c, added, name = self.config, added_cond_kwargs or {}, type(self).__name__

        def need(key):
            if key not in added:
                raise ValueError(f"{name} needs added_cond_kwargs[{key!r}] (addition_embed_type="
                                 f"{c.addition_embed_type!r}, "
                                 f"encoder_hid_dim_type={c.encoder_hid_dim_type!r})")
            return added[key]

        features = self.time_proj(as_timesteps(timestep, sample)).to(sample.dtype)
        emb = self.time_embedding(features, timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(f"{name} with class_embed_type={c.class_embed_type!r} needs class_labels")
            emb = emb + self.class_embedding(class_labels).to(sample.dtype)
        if c.addition_embed_type == "image":
            emb = emb + self.add_embedding(need("image_embeds"))
        elif c.addition_embed_type == "image_hint":
            aug, hint = self.add_embedding(need("image_embeds"), need("hint"))
            sample, emb = torch.cat([sample, hint], dim=1), emb + aug
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(need("image_embeds"))
        return sample, emb, encoder_hidden_states

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                added_cond_kwargs: dict | None = None, *, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        if timestep_cond is not None and self.config.time_cond_proj_dim is None:
            raise ValueError("timestep_cond needs a model with time_cond_proj_dim")
        # Masks are 1 = keep; the blocks take additive masks. A sample mask wins over a context mask.
        mask = attention_mask if attention_mask is not None else encoder_attention_mask
        if mask is not None:
            mask = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        sample, emb, context = self.embed(sample, timestep, encoder_hidden_states, class_labels,
                                          added_cond_kwargs, timestep_cond)
        mask = mask if context is not None or attention_mask is not None else None
        x = self.conv_in(sample)
        own = self.deepcache  # read once: another thread may switch it meanwhile
        # DeepCache's per-call state lives in context variables, which torch.compile cannot trace (a graph
        # break): a compiled UNet always runs whole.
        settings = None if torch.compiler.is_compiling() else settings_for(own)
        if settings is not None and settings is not own:  # a `deepcache.using` block's, unchecked here
            settings.check(len(self.down_blocks))
        cache = slot(self) if settings is not None else None
        level = len(self.down_blocks) - 1 if cache is None else settings.cache_branch_id
        x, skips = self.shallow_down(x, level, emb, context, mask)
        if cache is not None and cache.reuse(x, settings.cache_interval):
            deep = cache.features
        else:
            deep = self.deep(x, level, emb, context, mask)
            if cache is not None:
                cache.features = deep
        x = self.up(deep, skips, self.up_blocks[len(self.up_blocks) - 1 - level:], emb, context, mask)
        if self.conv_norm_out is not None:
            x = self.conv_act(self.conv_norm_out(x))
        x = self.conv_out(x)
        return UNet2DConditionOutput(sample=x) if return_dict else (x,)

    # The UNet in two stages, split at a level: the shallow stage is that level and those above it (down
    # blocks, then up blocks), the deep stage everything below, down to the mid block and back up. Without
    # DeepCache the split is at the deepest level, so the deep stage is the mid block alone, run in the
    # same order as one pass. Skips are consumed from the end, as the up blocks pair them by position.
    def shallow_down(self, x, level: int, emb, context, mask) -> tuple[torch.Tensor, tuple]:
        """Down blocks 0 to `level`, the last one stopping before its downsampler; its output and skips."""
        skips = (x,)
        for i, block in enumerate(self.down_blocks[:level + 1]):
            x, states = block(x, emb, context, mask, downsample=i < level)
            skips += states
        return x, skips

    def deep(self, x, level: int, emb, context, mask) -> torch.Tensor:
        """Below `level`: its downsampler, the deeper down blocks, the mid block, the deeper up blocks; the
        input of the up block at `level` (what DeepCache reuses)."""
        x, skips = self.down_blocks[level].downsample(x, emb)
        for block in self.down_blocks[level + 1:]:
            x, states = block(x, emb, context, mask)
            skips += states
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, mask)
        return self.up(x, skips, self.up_blocks[:len(self.up_blocks) - 1 - level], emb, context, mask)

    @staticmethod
    def up(x, skips: tuple, blocks, emb, context, mask) -> torch.Tensor:
        for block in blocks:
            n = len(block.resnets)
            x, skips = block(x, skips[-n:], emb, context, mask), skips[:-n]
        return x

    def enable_deepcache(self, cache_interval: int = 3, cache_branch_id: int = 0) -> None:
        """DeepCache (see cascade/deepcache.py): a setting on the model, shared by the pipelines holding it;
        the cache itself lives in each pipeline call."""
        self.deepcache = self.deepcache_settings(cache_interval, cache_branch_id)

    def deepcache_settings(self, cache_interval: int = 3, cache_branch_id: int = 0) -> DeepCache:
        """DeepCache settings checked against this UNet's depth."""
        settings = DeepCache(cache_interval, cache_branch_id)
        settings.check(len(self.down_blocks))
        return settings

    def disable_deepcache(self) -> None:
        self.deepcache = None

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023) in the first two up blocks that concatenate skip features (stages 1 and 2,
        from the deepest): see unet_blocks.freeu. The reference acts only on block types these UNets lack."""
        stages = [block for block in self.up_blocks if block.skip]
        for block, scales in zip(stages, ((s1, b1), (s2, b2))):
            block.freeu = scales

    def disable_freeu(self) -> None:
        for block in self.up_blocks:
            block.freeu = None

"""Image autoencoders on one Encoder/Decoder built from the block tables: MoVQ (VQModel) and the SD VAE."""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..config import Config
from ..loading import ModelMixin
from ..schedulers.base import randn_tensor
from .layers import ModelOutput, SpatialNorm
from .tiling import TiledDecoding
from .unet_blocks import BlockOptions, DownBlock, MidBlock, UpBlock

ENCODER_DOWN = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
DECODER_UP = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


@dataclasses.dataclass
class VQEncoderOutput(ModelOutput):
    latents: torch.Tensor


@dataclasses.dataclass
class DecoderOutput(ModelOutput):
    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


class Encoder(nn.Module):
    """Image -> latents: down blocks without time embedding, a mid block with one-head attention."""

    def __init__(self, in_channels: int, out_channels: int, down_block_types: tuple,
                 block_out_channels: tuple, layers_per_block: int, norm_num_groups: int, act_fn: str,
                 double_z: bool = True, mid_block_add_attention: bool = True):
        super().__init__()
        ch = block_out_channels
        o = BlockOptions(None, norm_num_groups, 1e-6, act_fn, downsample_padding=0)
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(t, ch[max(i - 1, 0)], ch[i], layers_per_block, o, add_downsample=i < len(ch) - 1)
            for i, t in enumerate(down_block_types))
        mid = dataclasses.replace(o, add_attention=mid_block_add_attention)
        self.mid_block = MidBlock("UNetMidBlock2D", ch[-1], mid)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(sample)
        for block in self.down_blocks:
            x = block(x)[0]
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latents -> image. norm_type "spatial" (MoVQ) conditions every norm on the quantized latents."""

    def __init__(self, in_channels: int, out_channels: int, up_block_types: tuple, block_out_channels: tuple,
                 layers_per_block: int, norm_num_groups: int, act_fn: str, norm_type: str = "group",
                 mid_block_add_attention: bool = True):
        super().__init__()
        ch, spatial = block_out_channels[::-1], norm_type == "spatial"
        o = BlockOptions(in_channels if spatial else None, norm_num_groups, 1e-6, act_fn,
                         "spatial" if spatial else "default")
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        mid = dataclasses.replace(o, add_attention=mid_block_add_attention)
        self.mid_block = MidBlock("UNetMidBlock2D", ch[0], mid)
        self.up_blocks = nn.ModuleList(
            UpBlock(t, ch[max(i - 1, 0)], ch[i], layers_per_block + 1, o, add_upsample=i < len(ch) - 1)
            for i, t in enumerate(up_block_types))
        self.conv_norm_out = (SpatialNorm(ch[-1], in_channels) if spatial
                              else nn.GroupNorm(norm_num_groups, ch[-1], eps=1e-6))
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.mid_block(self.conv_in(sample), latent_embeds)
        for block in self.up_blocks:
            x = block(x, temb=latent_embeds)
        x = self.conv_norm_out(x) if latent_embeds is None else self.conv_norm_out(x, latent_embeds)
        return self.conv_out(self.conv_act(x))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry per position of (B, C, H, W) latents (van den Oord et al. 2017)."""

    def __init__(self, n_e: int, vq_embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_e, vq_embed_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the quantized latents and the commitment loss (the reference's legacy weighting)."""
        z = z.permute(0, 2, 3, 1)
        index = torch.cdist(z.reshape(-1, z.shape[-1]), self.embedding.weight).argmin(dim=1)
        z_q = self.embedding(index).view(z.shape)
        loss = (1 + self.beta) * torch.mean((z_q - z) ** 2)
        # Straight-through form, as the reference computes it (its rounding differs from z_q itself).
        return (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous(), loss


class Autoencoder(TiledDecoding, ModelMixin):
    """What both autoencoders share: the encoder/decoder options and the pre-0.14 attention key names."""

    def coder_options(self) -> dict:
        c = self.config
        return dict(block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
                    norm_num_groups=c.norm_num_groups, act_fn=c.act_fn,
                    mid_block_add_attention=c.mid_block_add_attention)

    @staticmethod
    def rename_legacy_keys(state: dict) -> dict:
        """Checkpoints from before diffusers 0.14 name the attention projections query/key/value/proj_attn."""
        names = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
        pattern = re.compile(r"(attentions\.\d+\.)(query|key|value|proj_attn)\.")
        return {pattern.sub(lambda m: m[1] + names[m[2]] + ".", k): v for k, v in state.items()}


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(Config):
    """The fields both autoencoders have, with the reference's defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    sample_size: int | tuple = 32
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True

    choices = {"down_block_types": ENCODER_DOWN, "up_block_types": DECODER_UP}


@dataclasses.dataclass(frozen=True)
class VQModelConfig(AutoencoderConfig):
    latent_channels: int = 3
    num_vq_embeddings: int = 256
    vq_embed_dim: int | None = None
    norm_type: str = "group"
    lookup_from_codebook: bool = False
    force_upcast: bool = False

    choices = {**AutoencoderConfig.choices, "norm_type": ("group", "spatial"),
               "lookup_from_codebook": (False,)}


class VQModel(Autoencoder):
    """VQ-GAN autoencoder; norm_type "spatial" makes it MoVQ (Zheng et al. 2022), Kandinsky 2.2's codec."""

    config_class = VQModelConfig

    def __init__(self, config: VQModelConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c, blocks = self.config, self.coder_options()
        embed_dim = c.vq_embed_dim or c.latent_channels
        self.encoder = Encoder(c.in_channels, c.latent_channels, c.down_block_types, double_z=False, **blocks)
        self.quant_conv = nn.Conv2d(c.latent_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(c.num_vq_embeddings, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, c.latent_channels, 1)
        self.decoder = Decoder(c.latent_channels, c.out_channels, c.up_block_types, norm_type=c.norm_type,
                               **blocks)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True, shape=None):
        if force_not_quantize:
            quant, commit_loss = h, torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            quant, commit_loss = self.quantize(h)
        spatial = self.config.norm_type == "spatial"
        dec = self.decoded(quant, lambda q: self.decoder(self.post_quant_conv(q), q if spatial else None))
        return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        out = self.decode(self.encode(sample).latents)
        return out if return_dict else (out.sample, out.commit_loss)


class DiagonalGaussianDistribution:
    """The VAE posterior: mean and log-variance stacked on the channel axis."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters, self.deterministic = parameters, deterministic
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | list | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclasses.dataclass
class AutoencoderKLOutput(ModelOutput):
    latent_dist: DiagonalGaussianDistribution


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(AutoencoderConfig):
    latent_channels: int = 4
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True


class AutoencoderKL(Autoencoder):
    """The KL-regularised VAE of Stable Diffusion (Rombach et al. 2022), used by the x2 latent upscaler."""

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c, blocks, z = self.config, self.coder_options(), self.config.latent_channels
        self.encoder = Encoder(c.in_channels, z, c.down_block_types, double_z=True, **blocks)
        self.decoder = Decoder(z, c.out_channels, c.up_block_types, **blocks)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if c.use_post_quant_conv else None

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        h = self.encoder(x)
        posterior = DiagonalGaussianDistribution(h if self.quant_conv is None else self.quant_conv(h))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        post = self.post_quant_conv or (lambda x: x)
        dec = self.decoded(z, lambda x: self.decoder(post(x)))
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        posterior = self.encode(sample).latent_dist
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode(), return_dict)

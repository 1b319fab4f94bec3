"""The unCLIP prior (Ramesh et al. 2022): a causal transformer that denoises a CLIP image embedding.

Its input sequence is [text tokens, text embedding, time embedding, noisy image embedding, learned query];
the query's output is the predicted clean image embedding.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..loading import ModelMixin
from .layers import ACTIVATIONS, Attention, ModelOutput, TimestepEmbedding, Timesteps

MASKED = -10000.0  # the reference's additive mask value, kept for parity


@dataclasses.dataclass(frozen=True)
class PriorTransformerConfig(Config):
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    time_embed_dim: int | None = None
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None

    choices = {"time_embed_act_fn": tuple(ACTIVATIONS), "norm_in_type": (None, "layer"),
               "embedding_proj_norm_type": (None, "layer"), "encoder_hid_proj_type": (None, "linear"),
               "added_emb_type": ("prd", None)}


@dataclasses.dataclass
class PriorTransformerOutput(ModelOutput):
    predicted_image_embedding: torch.Tensor


class GELU(nn.Module):
    """Linear then exact GELU; a module of its own so the weight is named `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GELU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """The reference's BasicTransformerBlock as the prior configures it: pre-norm self-attention, GELU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, dropout=dropout, bias=True)
        self.norm3 = nn.LayerNorm(dim)  # norm3, not norm2: the slot of the absent cross-attention is skipped
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), attention_mask=attention_mask) + x
        return self.ff(self.norm3(x)) + x


class PriorTransformer(ModelMixin):
    config_class = PriorTransformerConfig

    def __init__(self, config: PriorTransformerConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        inner = c.num_attention_heads * c.attention_head_dim
        proj_dim = c.embedding_proj_dim or c.embedding_dim
        clip_dim = c.clip_embed_dim or c.embedding_dim
        self.time_proj = Timesteps(inner, True, 0)
        self.time_embedding = TimestepEmbedding(inner, c.time_embed_dim or inner, out_dim=inner,
                                                act_fn=c.time_embed_act_fn)
        self.proj_in = nn.Linear(c.embedding_dim, inner)
        self.embedding_proj_norm = nn.LayerNorm(proj_dim) if c.embedding_proj_norm_type else None
        self.embedding_proj = nn.Linear(proj_dim, inner)
        hid_proj = c.encoder_hid_proj_type is not None
        self.encoder_hidden_states_proj = nn.Linear(c.embedding_dim, inner) if hid_proj else None
        length = c.num_embeddings + c.additional_embeddings
        self.positional_embedding = nn.Parameter(torch.zeros(1, length, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner)) if c.added_emb_type else None
        heads, head_dim = c.num_attention_heads, c.attention_head_dim
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, c.dropout) for _ in range(c.num_layers))
        self.norm_in = nn.LayerNorm(inner) if c.norm_in_type else None
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, clip_dim)
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, clip_dim))

    def forward(self, hidden_states: torch.Tensor, timestep, proj_embedding: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        """Predict the clean image embedding from the noisy one (B, D) at `timestep`, given the text
        embedding `proj_embedding` (B, D) and text tokens `encoder_hidden_states` (B, L, D); `attention_mask`
        (B, L) marks the real tokens and also turns on the causal mask."""
        batch = hidden_states.shape[0]
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.long)
        t = t.to(hidden_states.device).reshape(-1)
        t = t * torch.ones(batch, dtype=t.dtype, device=t.device)
        time = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        proj = self.embedding_proj(proj_embedding)
        tokens = []
        if self.encoder_hidden_states_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError("`encoder_hidden_states_proj` requires `encoder_hidden_states` to be set")
            encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states)
        if encoder_hidden_states is not None:
            tokens.append(encoder_hidden_states)
        x = self.proj_in(hidden_states)
        proj = proj[:, None] if proj.ndim == 2 else proj
        x = x[:, None] if x.ndim == 2 else x
        tokens += [proj, time[:, None], x]
        if self.prd_embedding is not None:
            tokens.append(self.prd_embedding.to(x.dtype).expand(batch, -1, -1))
        x = torch.cat(tokens, dim=1)
        prefix = (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]) + proj.shape[1] + 1
        x = x + self.positions(x.shape[1], prefix, x.dtype)
        mask = None if attention_mask is None else self.additive_mask(attention_mask, x.dtype)
        if self.norm_in is not None:
            x = self.norm_in(x)
        for block in self.transformer_blocks:
            x = block(x, attention_mask=mask)
        x = self.norm_out(x)
        x = x[:, -1] if self.prd_embedding is not None else x[:, prefix:]
        out = PriorTransformerOutput(self.proj_to_clip_embeddings(x))
        return out if return_dict else out.to_tuple()

    def positions(self, length: int, prefix: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.positional_embedding.to(dtype)
        if pos.shape[1] < length:  # too few learned positions: the conditioning tokens and the query get none
            pos = F.pad(pos, (0, 0, prefix, 1 if self.prd_embedding is not None else 0), value=0.0)
        return pos

    def additive_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Padding mask over the text tokens (the 4 trailing tokens always visible) plus a causal mask,
        per head: (B * heads, L, L)."""
        c = self.config
        n = c.num_embeddings + c.additional_embeddings
        causal = torch.full((n, n), MASKED, device=attention_mask.device).triu_(1)
        padding = F.pad((1 - attention_mask.to(dtype)) * MASKED, (0, c.additional_embeddings), value=0.0)
        return (padding[:, None, :] + causal).to(dtype).repeat_interleave(c.num_attention_heads, dim=0)

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        """Undo the CLIP-embedding normalisation the prior was trained with."""
        device = prior_latents.device
        return prior_latents * self.clip_std.to(device) + self.clip_mean.to(device)

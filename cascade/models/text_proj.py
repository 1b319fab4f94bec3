"""unCLIP's text projection: CLIP text and image embeddings -> the decoder's context and time embedding."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import Config
from ..loading import ModelMixin


@dataclasses.dataclass(frozen=True)
class UnCLIPTextProjConfig(Config):
    time_embed_dim: int
    cross_attention_dim: int
    clip_extra_context_tokens: int = 4
    clip_embeddings_dim: int = 768


class UnCLIPTextProjModel(ModelMixin):
    """Ramesh et al. (2022), section 2.1: the image embedding is added to the timestep embedding (with the
    text embedding) and projected into `clip_extra_context_tokens` tokens put before the text tokens."""

    config_class = UnCLIPTextProjConfig

    def __init__(self, config: UnCLIPTextProjConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.clip_extra_context_tokens = c.clip_extra_context_tokens
        # The image embedding of the unconditional half when guiding (Karlo learned one).
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(c.clip_embeddings_dim))
        self.embedding_proj = nn.Linear(c.clip_embeddings_dim, c.time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(c.clip_embeddings_dim,
                                                                          c.time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(c.clip_embeddings_dim,
                                                        c.clip_extra_context_tokens * c.cross_attention_dim)
        self.encoder_hidden_states_proj = nn.Linear(c.clip_embeddings_dim, c.cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(c.cross_attention_dim)

    def forward(self, *, image_embeddings: torch.Tensor, prompt_embeds: torch.Tensor,
                text_encoder_hidden_states: torch.Tensor, do_classifier_free_guidance: bool):
        """Returns the context tokens (B, extra + L, cross_attention_dim) and the time embedding to add
        (B, time_embed_dim); when guiding, the text inputs are batched [uncond, cond] and `image_embeddings`
        is the cond half."""
        if do_classifier_free_guidance:
            uncond = self.learned_classifier_free_guidance_embeddings.expand(image_embeddings.shape[0], -1)
            image_embeddings = torch.cat([uncond.to(image_embeddings.dtype), image_embeddings])
        if image_embeddings.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"image_embeddings: batch {image_embeddings.shape[0]} does not match "
                             f"prompt_embeds batch {prompt_embeds.shape[0]}")
        time_embeds = self.embedding_proj(prompt_embeds)
        time_embeds = self.clip_image_embeddings_project_to_time_embeddings(image_embeddings) + time_embeds
        # The projection's features are laid out (channels, tokens), as the original checkpoint's were.
        extra = self.clip_extra_context_tokens_proj(image_embeddings)
        extra = extra.reshape(extra.shape[0], -1, self.clip_extra_context_tokens).transpose(1, 2)
        text = self.encoder_hidden_states_proj(text_encoder_hidden_states)
        text = self.text_encoder_hidden_states_norm(text)
        return torch.cat([extra, text], dim=1), time_embeds

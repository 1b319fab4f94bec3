"""Würstchen v2: stage C prior (text -> compressed image embeddings) -> stage B decoder -> stage A VQGAN."""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np
import torch

from ..lora import LoraLoaderMixin
from ..schedulers import DDPMWuerstchenScheduler
from .core import (DiffusionPipeline, ImagePipelineOutput, Output, check_output_type, connected_prior,
                   denoise, guided, postprocess, prepare_latents, sub_pipeline, tokenize)

# Stage C's recommended schedule: 19 steps over the noisiest third, 10 over the rest.
DEFAULT_STAGE_C_TIMESTEPS = [*np.linspace(1.0, 2 / 3, 20), *np.linspace(2 / 3, 0.0, 11)[1:]]


@dataclass
class WuerstchenPriorPipelineOutput(Output):
    image_embeddings: Any


def as_list(name: str, texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{name} must be a str or a list of str, got {type(texts).__name__}")
    return texts


def as_batch(name: str, x) -> torch.Tensor:
    x = torch.cat(x) if isinstance(x, list) else x
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a tensor, numpy array or list of tensors, got {type(x).__name__}")
    return torch.as_tensor(x)


class WuerstchenStage(DiffusionPipeline):
    """What both stages share: CLIP last hidden states, the schedule, the loop over all timesteps but 0."""

    def encode(self, prompts: list[str], repeats: int) -> torch.Tensor:
        tokens = tokenize(self.tokenizer, prompts)
        device = self.text_encoder.device
        out = self.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        return out.last_hidden_state.to(self.device).repeat_interleave(repeats, 0)

    @staticmethod
    def text_states(cond: torch.Tensor, negative: torch.Tensor | None) -> dict:
        """Conditioning batched [cond, uncond], as the reference guides."""
        both = cond if negative is None else torch.cat([cond, negative])
        return {"text_encoder_hidden_states": both, "negative_prompt_embeds": negative}

    def plan(self, num_inference_steps, timesteps):
        if timesteps is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise TypeError(f"num_inference_steps must be a positive int (or pass timesteps), got "
                            f"{num_inference_steps!r}")
        if not isinstance(self.scheduler, DDPMWuerstchenScheduler):
            # Its stages were trained on a continuous cosine schedule of noise ratios, not on beta tables.
            raise ValueError(f"{type(self).__name__} runs only with DDPMWuerstchenScheduler (sampler "
                             f"'wuerstchen'), got {type(self.scheduler).__name__}")
        return self.scheduler.plan(num_inference_steps, self.device, timesteps=timesteps)  # timesteps win

    def sample(self, model, guidance_scale, latents, plan, generator, on_step):
        model = guided(model, guidance_scale, combine=torch.lerp, cond_first=True)
        return denoise(model, self.scheduler, plan, latents, generator, on_step, self.progress_bar)


class WuerstchenPriorPipeline(LoraLoaderMixin, WuerstchenStage):
    components_order = ("tokenizer", "text_encoder", "prior", "scheduler")
    _lora_loadable_modules = ("prior", "text_encoder")
    config_values = {"latent_mean": 42.0, "latent_std": 1.0, "resolution_multiple": 42.67}
    _callback_tensor_inputs = ["latents", "text_encoder_hidden_states", "negative_prompt_embeds"]

    @torch.no_grad()
    def __call__(self, prompt=None, height=1024, width=1024, num_inference_steps=60, timesteps=None,
                 guidance_scale=8.0, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                 num_images_per_prompt=1, generator=None, latents=None, output_type="pt", return_dict=True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), **kwargs):
        """Text (or its CLIP hidden states) -> stage C image embeddings of ceil(height / resolution_multiple)
        x ceil(width / resolution_multiple); negative prompts (or embeddings) guide away when guidance_scale
        > 1. `timesteps` are noise ratios from 1 down to 0, e.g. DEFAULT_STAGE_C_TIMESTEPS."""
        check_output_type(output_type, ("pt", "np"))
        texts = (prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        batch = self.check_prompts(*texts, guidance_scale)
        shape = (batch * num_images_per_prompt, self.prior.config.c_in, *self.embeddings_size(height, width))
        plan = self.plan(num_inference_steps, timesteps)
        latents = prepare_latents(shape, generator, latents, self.text_encoder.dtype, self.device)
        state: dict = {}
        on_step = self.callbacks(state, callback_on_step_end, callback_on_step_end_tensor_inputs, kwargs)
        state.update(self.encode_prompts(*texts, num_images_per_prompt, guidance_scale > 1))

        def model(x, t, *_):
            return self.prior(x, r=t.expand(x.shape[0]), c=state["text_encoder_hidden_states"])

        latents = self.sample(model, guidance_scale, latents, plan, generator, on_step)
        # The reference's denormalisation (not latents * std + mean), which its checkpoints' values assume.
        embeds = latents * self.latent_mean - self.latent_std
        embeds = embeds.cpu().float().numpy() if output_type == "np" else embeds
        return WuerstchenPriorPipelineOutput(embeds) if return_dict else (embeds,)

    def embeddings_size(self, height, width) -> list[int]:
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        return [ceil(s / self.resolution_multiple) for s in (height, width)]

    @staticmethod
    def check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale) -> int:
        """Validate the text inputs before any model runs; returns the number of prompts."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds")
        batch = len(as_list("prompt", prompt)) if prompt is not None else prompt_embeds.shape[0]
        name = "negative_prompt" if negative_prompt is not None else "negative_prompt_embeds"
        negative = as_list(name, negative_prompt) if negative_prompt is not None else negative_prompt_embeds
        if guidance_scale > 1 and negative is not None and len(negative) != batch:
            raise ValueError(f"{name}: got a batch of {len(negative)}, prompt has {batch}")
        if prompt_embeds is not None and negative_prompt_embeds is not None and \
                prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds: shape {tuple(negative_prompt_embeds.shape)} is not "
                             f"prompt_embeds' {tuple(prompt_embeds.shape)}")
        return batch

    def encode_prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, n, guide):
        """CLIP hidden states per image, [cond, uncond] when guiding; given embeddings are used as is."""

        def states(texts, embeds):
            if embeds is None:
                return self.encode(as_list("prompt", texts), n)
            return embeds.to(self.device, self.text_encoder.dtype).repeat_interleave(n, 0)

        cond = states(prompt, prompt_embeds)
        negative = negative_prompt if negative_prompt is not None else [""] * (cond.shape[0] // n)
        return self.text_states(cond, states(negative, negative_prompt_embeds) if guide else None)


class WuerstchenDecoderPipeline(WuerstchenStage):
    components_order = ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan")
    config_values = {"latent_dim_scale": 10.67}
    _callback_tensor_inputs = ["latents", "text_encoder_hidden_states", "negative_prompt_embeds",
                               "image_embeddings"]

    @torch.no_grad()
    def __call__(self, image_embeddings, prompt=None, num_inference_steps=12, timesteps=None,
                 guidance_scale=0.0, negative_prompt=None, num_images_per_prompt=1, generator=None,
                 latents=None, output_type="pil", return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **kwargs):
        """Stage C embeddings (B, C, h, w) -> images of about 42.67h x 42.67w pixels. With P prompts,
        prompt i conditions the i-th of P equal runs of embeddings; each embedding gives
        num_images_per_prompt images."""
        embeds = as_batch("image_embeddings", image_embeddings).to(self.device, self.decoder.dtype)
        prompts, negative = self.check_inputs(embeds.shape, prompt, negative_prompt, output_type,
                                              guidance_scale)
        n = num_images_per_prompt
        shape = (embeds.shape[0] * n, self.decoder.config.c_in, *self.latent_size(embeds.shape))
        plan = self.plan(num_inference_steps, timesteps)
        latents = prepare_latents(shape, generator, latents, self.decoder.dtype, self.device)
        state = {"image_embeddings": embeds.repeat_interleave(n, 0)}
        on_step = self.callbacks(state, callback_on_step_end, callback_on_step_end_tensor_inputs, kwargs)
        repeats = shape[0] // len(prompts)
        negative = negative and self.encode(negative, repeats)
        state.update(self.text_states(self.encode(prompts, repeats), negative))
        latents = self.sample(self.decoder_fn(state), guidance_scale, latents, plan, generator, on_step)
        return self.decode(latents, output_type, return_dict)

    def decode(self, latents, output_type, return_dict):
        if output_type != "latent":
            # Stage A decodes to [0, 1]; postprocess takes [-1, 1].
            image = self.vqgan.decode(latents * self.vqgan.config.scale_factor).sample
            latents = postprocess(image * 2 - 1, output_type)
        return ImagePipelineOutput(latents) if return_dict else (latents,)

    def decoder_fn(self, state):
        def fn(x, t, *_):
            effnet = state["image_embeddings"]
            if x.shape[0] != effnet.shape[0]:  # guiding: the unconditional half sees no image embeddings
                effnet = torch.cat([effnet, torch.zeros_like(effnet)])
            clip = state["text_encoder_hidden_states"]
            return self.decoder(x, r=t.expand(x.shape[0]), effnet=effnet, clip=clip)

        return fn

    def latent_size(self, embeddings_shape) -> list[int]:
        """Stage B's latent size, which its U-Net must halve evenly at every level."""
        size = [int(s * self.latent_dim_scale) for s in embeddings_shape[-2:]]
        k = self.decoder.config
        multiple = k.patch_size * 2 ** (len(k.c_hidden) - 1)
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(f"image_embeddings: {tuple(embeddings_shape[-2:])} gives stage B latents of "
                             f"{size}, not multiples of {multiple}; use height and width in steps of 128 px")
        return size

    def check_inputs(self, embeddings_shape, prompt, negative_prompt, output_type, guidance_scale):
        """Validate before any model runs; returns the prompts, and the negative ones when guiding."""
        check_output_type(output_type)
        c = self.decoder.config.effnet_embd
        if len(embeddings_shape) != 4 or embeddings_shape[1] != c:
            raise ValueError(f"image_embeddings: shape {tuple(embeddings_shape)} is not (B, {c}, h, w)")
        prompts = as_list("prompt", prompt)
        if embeddings_shape[0] % len(prompts):
            raise ValueError(f"prompt: {len(prompts)} prompts cannot share {embeddings_shape[0]} image "
                             f"embeddings")
        self.latent_size(embeddings_shape)
        if guidance_scale <= 1:  # negative prompts are ignored, as in the reference
            return prompts, None
        negative = [""] * len(prompts) if negative_prompt is None else negative_prompt
        negative = as_list("negative_prompt", negative)
        if len(negative) != len(prompts):
            raise ValueError(f"negative_prompt: got {len(negative)} prompts, prompt has {len(prompts)}")
        return prompts, negative


class WuerstchenCombinedPipeline(DiffusionPipeline):
    """Prior and decoder in one object: components of the prior carry a `prior_` prefix."""

    components_order = ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan", "prior_tokenizer",
                        "prior_text_encoder", "prior_prior", "prior_scheduler")
    _callback_tensor_inputs = WuerstchenDecoderPipeline._callback_tensor_inputs

    prior_pipe = property(lambda self: sub_pipeline(self, WuerstchenPriorPipeline, "prior_"))
    decoder_pipe = property(lambda self: sub_pipeline(self, WuerstchenDecoderPipeline))

    @classmethod
    def missing_parts(cls, folder, index, given, torch_dtype, variant, hub):
        return connected_prior(cls, WuerstchenPriorPipeline, folder, index, given, torch_dtype, variant, hub)

    @torch.no_grad()
    def __call__(self, prompt=None, height=512, width=512, prior_num_inference_steps=60, prior_timesteps=None,
                 prior_guidance_scale=4.0, num_inference_steps=12, decoder_timesteps=None,
                 decoder_guidance_scale=0.0, negative_prompt=None, prompt_embeds=None,
                 negative_prompt_embeds=None, num_images_per_prompt=1, generator=None, latents=None,
                 output_type="pil", return_dict=True,
                 prior_callback_on_step_end=None, prior_callback_on_step_end_tensor_inputs=("latents",),
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), **kwargs):
        """Text -> images: stage C's embeddings decoded by stages B and A. `latents` are stage C's; `prior_*`
        arguments (and `prior_callback`, `prior_callback_steps`) go to stage C, `decoder_*` to stage B."""
        self.check_decoder(prompt, negative_prompt, height, width, output_type, decoder_guidance_scale)
        embeds = self.prior_pipe(
            prompt=prompt if prompt_embeds is None else None, height=height, width=width,
            num_inference_steps=prior_num_inference_steps, timesteps=prior_timesteps,
            guidance_scale=prior_guidance_scale, prompt_embeds=prompt_embeds,
            negative_prompt=negative_prompt if negative_prompt_embeds is None else None,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, output_type="pt", return_dict=False,
            callback_on_step_end=prior_callback_on_step_end,
            callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs,
            **legacy(kwargs, "prior_"))
        return self.decoder_pipe(
            embeds[0], prompt="" if prompt is None else prompt, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, timesteps=decoder_timesteps,
            guidance_scale=decoder_guidance_scale, generator=generator, output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **legacy(kwargs))

    def check_decoder(self, prompt, negative_prompt, height, width, output_type, guidance_scale):
        """What stage B will check, before stage C runs (its U-Net needs sizes in steps of 128 px)."""
        prompt = "" if prompt is None else prompt
        rows = len(prompt) if isinstance(prompt, list) else 1
        decoder = self.decoder_pipe
        shape = (rows, decoder.decoder.config.effnet_embd, *self.prior_pipe.embeddings_size(height, width))
        decoder.check_inputs(shape, prompt, negative_prompt, output_type, guidance_scale)


def legacy(kwargs: dict, prefix: str = "") -> dict:
    """The deprecated `callback` and `callback_steps` of one stage (`prior_callback`... for stage C)."""
    return {k: kwargs[prefix + k] for k in ("callback", "callback_steps") if prefix + k in kwargs}

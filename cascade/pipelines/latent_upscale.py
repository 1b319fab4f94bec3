"""Stable Diffusion x2 latent upscaler: k-diffusion's text-conditioned latent UNet, sampled with Euler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..loading import resolve
from ..schedulers import SAMPLERS
from .core import (DiffusionPipeline, Output, check_output_type, denoise, guided, postprocess, start_latents,
                   to_tensor_batch, tokenize)

UPSCALER_REPO = "stabilityai/sd-x2-latent-upscaler"


@dataclass
class StableDiffusionPipelineOutput(Output):
    images: Any
    nsfw_content_detected: Any = None


def karras_denoiser(model):
    """k-diffusion's denoiser around model(x, c_noise) (Karras et al. 2022, table 1), told the noise level
    sigma of each evaluation: the network sees c_in * x and c_noise = log(sigma) / 4, and the estimate of x0
    is c_skip * x + c_out * F. The loop hands it c_in * x already: every sampler scales its input to that
    variance-preserving form (the Euler family divides by sqrt(sigma^2 + 1), the others keep x there)."""

    def fn(x_in, t, sigma):
        c = (sigma**2 + 1) ** 0.5
        return x_in / c + sigma / c * model(x_in, torch.log(sigma) * 0.25)

    return fn


class StableDiffusionLatentUpscalePipeline(DiffusionPipeline):
    components_order = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, config=UPSCALER_REPO, torch_dtype=None,
                         **kwargs):
        """The original k-diffusion checkpoint file (.pth, .ckpt or .safetensors) as the UNet; its
        configuration and the other components from `config`, a pipeline folder or Hub repo id."""
        from ..single_file import load_upscaler_unet

        if "unet" not in kwargs:
            unet_config = resolve(config, None, ["unet/config.json"]) / "unet" / "config.json"
            kwargs["unet"] = load_upscaler_unet(pretrained_model_link_or_path, unet_config, torch_dtype)
        return cls.from_pretrained(config, torch_dtype=torch_dtype, **kwargs)

    def prompts(self, prompt, negative_prompt, guidance_scale) -> tuple[list, list | None]:
        if not isinstance(prompt, (str, list)):
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if guidance_scale == 0:  # the reference then conditions on empty prompts
            prompts = [""] * len(prompts)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        if negative_prompt is not None and len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} prompts, prompt has {len(prompts)}")
        return prompts, negative_prompt

    def image_batch(self, image, batch: int) -> torch.Tensor:
        """PIL, numpy in [0, 1], tensors in [0, 1] or [-1, 1] -> (B, 3, H, W) in [-1, 1], sides cut to
        multiples of the VAE's scale as the reference does; tensors with the VAE's latent channels are
        latents, used as they are."""
        images = image if isinstance(image, list) else [image]
        first, f, z = images[0] if images else None, self.vae_scale_factor, self.vae.config.latent_channels
        if isinstance(first, torch.Tensor) and first.shape[-3] == z:
            x = torch.cat([i if i.ndim == 4 else i[None] for i in images])
        elif isinstance(first, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            h, w = ((first.height, first.width) if isinstance(first, PIL.Image.Image)
                    else first.shape[-2:] if isinstance(first, torch.Tensor) else first.shape[-3:-1])
            x = to_tensor_batch(image, h - h % f, w - w % f)
            if x.shape[1] != 3:
                raise ValueError(f"image: expected 3 channels (an image) or {z} (latents, as a tensor), got "
                                 f"{x.shape[1]}")
        else:
            raise TypeError(f"image: expected PIL images, numpy arrays or tensors, got "
                            f"{type(first).__name__}")
        if x.shape[0] != batch:
            raise ValueError(f"prompt has batch size {batch} and image has batch size {x.shape[0]}")
        return x

    def encode_prompt(self, prompts, negative_prompt, guide: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's last hidden states (before its final norm) and pooled output; [negative, positive] to
        guide."""

        def encode(texts):
            ids = tokenize(self.tokenizer, texts).input_ids
            out = self.text_encoder(ids.to(self.device), output_hidden_states=True)
            return out.hidden_states[-1], out.pooler_output

        embeds, pooled = encode(prompts)
        if guide:
            negative, negative_pooled = encode(negative_prompt or [""] * len(prompts))
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return embeds, pooled

    def image_latents(self, x: torch.Tensor, generator) -> torch.Tensor:
        if x.shape[1] == 3:
            x = self.vae.encode(x).latent_dist.sample(generator) * self.vae.config.scaling_factor
        return x

    def unet_fn(self, low_res: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor):
        """The UNet as model(x, c_noise), conditioned on the low-res latents (nearest 2x), the text, and the
        pooled text after the Fourier features (cos, sin) of noise-augmentation level 0, as the reference."""
        image_cond = F.interpolate(torch.cat([low_res] * (len(embeds) // len(low_res))), scale_factor=2,
                                   mode="nearest")
        level = torch.cat([torch.ones(len(pooled), 64), torch.zeros(len(pooled), 64)], dim=1).to(pooled)
        timestep_cond = torch.cat([level, pooled], dim=1)

        def fn(x, c_noise):
            out = self.unet(torch.cat([x, image_cond], dim=1), c_noise, encoder_hidden_states=embeds,
                            timestep_cond=timestep_cond, return_dict=False)[0]
            return out[:, :-1]  # the last channel is a variance the sampler does not use

        return fn

    def check_scheduler(self):
        """The Karras wrapper predicts x0, so the sampler must read model outputs as samples."""
        c = self.scheduler.config
        if "alphas_cumprod" not in vars(self.scheduler) or c.get("prediction_type") != "sample":
            raise ValueError(f"scheduler: the upscaler needs a sampler over a beta schedule with "
                             f"prediction_type='sample' (any of {sorted(n for n in SAMPLERS if n != 'wuerstchen')}, "
                             f"made with X.from_config(pipe.scheduler.config)), got {type(self.scheduler).__name__} "
                             f"with prediction_type={c.get('prediction_type')!r}")

    def decode(self, latents, output_type, return_dict):
        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            latents = postprocess(image, output_type)
        return StableDiffusionPipelineOutput(images=latents) if return_dict else (latents,)

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, num_inference_steps=75, guidance_scale=9.0,
                 negative_prompt=None, generator=None, latents=None, output_type="pil", return_dict=True,
                 callback=None, callback_steps=1, eta=0.0, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Upscale `image` (images or 4-channel Stable Diffusion latents, one per prompt) 2x in latent space,
        guided by `prompt`. `eta` is accepted for the reference's documented signature; Euler has no eta."""
        check_output_type(output_type)
        self.check_scheduler()
        legacy = {"callback": callback, "callback_steps": callback_steps}
        on_step = self.callbacks({}, callback_on_step_end, callback_on_step_end_tensor_inputs, legacy)
        prompts, negative_prompt = self.prompts(prompt, negative_prompt, guidance_scale)
        low_res = self.image_batch(image, len(prompts))
        embeds, pooled = self.encode_prompt(prompts, negative_prompt, guidance_scale > 1)
        low_res = self.image_latents(low_res.to(self.device, embeds.dtype), generator)
        plan = self.scheduler.plan(num_inference_steps, device=self.device)
        shape = (len(prompts), self.vae.config.latent_channels, 2 * low_res.shape[2], 2 * low_res.shape[3])
        latents = start_latents(self.scheduler, plan, shape, generator, latents, embeds.dtype, self.device)
        model = guided(karras_denoiser(self.unet_fn(low_res, embeds, pooled)), guidance_scale)
        latents = denoise(model, self.scheduler, plan, latents, generator, on_step, self.progress_bar)
        return self.decode(latents, output_type, return_dict)

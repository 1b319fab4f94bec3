"""Würstchen v2: prior, decoder and combined pipelines against the reference, both loading the same folder."""
import numpy as np
import pytest
import torch
from conftest import as_array, assert_close, load

import cascade
from cascade.pipelines.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS

SIZE = dict(height=128, width=128)  # stage C 3x3 -> stage B 32x32 -> 128 px
PRIOR = dict(num_inference_steps=3, **SIZE)
DECODER = dict(num_inference_steps=2)
COMBINED = dict(prior_num_inference_steps=3, num_inference_steps=2, **SIZE)
PIL_ATOL = 1 / 255 + 1e-6
# Stage C computes its attention scores in the reference's order (baddbmm, softmax, bmm), so embeddings
# match to the bit here; the first step at t = 1 (x 1 / sqrt(alpha_bar) ~ 50, guidance up to 8,
# latent_mean 42) would turn any 1e-8 difference into 1e-4, hence the small margin.
EMBED_ATOL = 1e-5


def clip_text(vocab, dim, seed):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=dim,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab,
        max_position_embeddings=16)).eval()


def reference_models():
    """The reference reloads its saved Würstchen folders only with its models on the top-level module."""
    import diffusers
    from diffusers.pipelines.deprecated import wuerstchen as w

    for name in ("WuerstchenPrior", "WuerstchenDiffNeXt", "PaellaVQModel"):
        setattr(diffusers, name, getattr(w, name))
    return w


@pytest.fixture(scope="module")
def root(wuerstchen_root):
    return wuerstchen_root


def build(root):
    """Tiny stage C / B / A keeping attention, effnet and CLIP injection and every block type."""
    import diffusers as d
    import tiny

    w = reference_models()
    tok, vocab = tiny.tokenizer(root / "_tok")
    torch.manual_seed(0)
    prior = tiny.perturb(w.WuerstchenPrior(c_in=4, c=32, c_cond=32, c_r=8, depth=2, nhead=4, dropout=0.1), 0)
    # Near the identity, as a trained stage C is at t = 1, where the first step divides by sqrt(alpha_bar).
    with torch.no_grad():
        prior.out[1].weight.mul_(0.01)
        prior.out[1].bias.mul_(0.01)
    torch.manual_seed(1)
    decoder = tiny.perturb(w.WuerstchenDiffNeXt(
        c_in=4, c_out=4, c_r=8, patch_size=2, c_cond=16, c_hidden=[16, 32, 32], nhead=[-1, 4, 4],
        blocks=[1, 2, 1], level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True], effnet_embd=4,
        clip_embd=24, kernel_size=3, dropout=0.1), 1)
    torch.manual_seed(2)
    vqgan = tiny.perturb(w.PaellaVQModel(levels=2, bottleneck_blocks=2, embed_dim=16, latent_channels=4,
                                         num_vq_embeddings=32), 2)
    prior_parts = dict(tokenizer=tok, text_encoder=clip_text(vocab, 32, 3), prior=prior,
                       scheduler=d.DDPMWuerstchenScheduler())
    decoder_parts = dict(tokenizer=tok, text_encoder=clip_text(vocab, 24, 4), decoder=decoder,
                         scheduler=d.DDPMWuerstchenScheduler(), vqgan=vqgan)
    d.WuerstchenPriorPipeline(**prior_parts).save_pretrained(root / "prior")
    d.WuerstchenDecoderPipeline(**decoder_parts).save_pretrained(root / "decoder")
    d.WuerstchenCombinedPipeline(**decoder_parts, **{f"prior_{k}": v for k, v in prior_parts.items()}
                                 ).save_pretrained(root / "combined")
    return root


@pytest.fixture(scope="module")
def pipes(root):
    import diffusers

    reference_models()
    names = {"prior": "WuerstchenPriorPipeline", "decoder": "WuerstchenDecoderPipeline",
             "combined": "WuerstchenCombinedPipeline"}
    return {k: (load(cascade, n, root / k), load(diffusers, n, root / k)) for k, n in names.items()}


def fresh(value):
    if isinstance(value, torch.Generator):
        return torch.Generator().manual_seed(value.initial_seed())
    if isinstance(value, list) and value and isinstance(value[0], torch.Generator):
        return [fresh(g) for g in value]
    return value.clone() if isinstance(value, torch.Tensor) else value


def run_both(pair, seed=0, **kw):
    """The same call on both libraries, each with fresh generators of the same seeds."""
    if seed is not None:
        kw.setdefault("generator", torch.Generator().manual_seed(seed))
    return [pipe(**{k: fresh(v) for k, v in kw.items()}) for pipe in pair]


def embeddings(batch=1, seed=0):
    return torch.randn(batch, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) * 10


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------------------------------------- prior

@pytest.mark.parametrize("case", [
    dict(prompt="a cat"),
    dict(prompt=["a cat", "the dog"], num_images_per_prompt=2),
    dict(prompt=["a cat", "the dog"], negative_prompt=["dog", "cat"], guidance_scale=4.0),
    dict(prompt="a cat", guidance_scale=1.0, num_images_per_prompt=2),
    dict(prompt="a cat", output_type="np", return_dict=False),
    dict(prompt="the dog", timesteps=[1.0, 0.7, 0.3, 0.0], height=200, width=90),
])
def test_prior(pipes, case):
    ours, ref = run_both(pipes["prior"], **{**PRIOR, **case})
    assert isinstance(ours, tuple) == isinstance(ref, tuple)
    assert_close(ours[0], ref[0], EMBED_ATOL)


def test_prior_explicit_latents_and_embeds(pipes):
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    embeds, negative = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    # Each step but the last adds noise, so a generator is needed even with explicit latents.
    ours, ref = run_both(pipes["prior"], prompt_embeds=embeds, negative_prompt_embeds=negative,
                         latents=latents, **PRIOR)
    assert_close(ours.image_embeddings, ref.image_embeddings, EMBED_ATOL)
    ours, ref = run_both(pipes["prior"], prompt=["a cat", "dog"], latents=latents, **PRIOR)
    assert_close(ours.image_embeddings, ref.image_embeddings, EMBED_ATOL)


def test_default_stage_c_timesteps():
    from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS as reference

    assert np.array_equal(np.asarray(DEFAULT_STAGE_C_TIMESTEPS), np.asarray(reference))
    assert cascade.DEFAULT_STAGE_C_TIMESTEPS is DEFAULT_STAGE_C_TIMESTEPS


# ---------------------------------------------------------------------------------------------- decoder

@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_decoder_output_types(pipes, output_type):
    ours, ref = run_both(pipes["decoder"], image_embeddings=embeddings(2), prompt="a cat",
                         output_type=output_type, **DECODER)
    assert_close(ours.images, ref.images, PIL_ATOL if output_type == "pil" else 1e-4)


def test_decoder_guided_negative_latents_tuple(pipes):
    """return_dict=False gives a 1-tuple as the specification says (the reference returns bare images)."""
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(7))
    ours, ref = run_both(pipes["decoder"], image_embeddings=[embeddings(1, 1)], prompt="a cat",
                         negative_prompt="dog", guidance_scale=3.0, latents=latents, output_type="np",
                         return_dict=False, **DECODER)
    assert isinstance(ours, tuple) and len(ours) == 1
    assert_close(ours[0], ref)


def test_decoder_many_images_per_prompt_and_prompt_list(pipes):
    """The reference crashes on both; each sample must equal its own run: prompt i conditions embedding i,
    which gives two images."""
    ours, ref = pipes["decoder"]
    embeds, prompts, seeds = embeddings(2, 2), ["a cat", "the dog"], range(10, 14)
    out = ours(embeds, prompts, num_images_per_prompt=2, guidance_scale=2.0, generator=gens(*seeds),
               output_type="np", **DECODER).images
    for i in range(4):
        one = ref(embeds[i // 2: i // 2 + 1], prompts[i // 2], guidance_scale=2.0,
                  generator=gens(seeds[i])[0], output_type="np", **DECODER).images
        assert_close(out[i: i + 1], one)


# ---------------------------------------------------------------------------------------------- combined

@pytest.mark.parametrize("case", [
    dict(prompt="a cat", latents=torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(3))),
    dict(prompt="a cat", negative_prompt="dog", decoder_guidance_scale=2.0, output_type="pt",
         return_dict=False),
    dict(prompt="a cat", prior_timesteps=[1.0, 0.5, 0.0], decoder_timesteps=[1.0, 0.4, 0.0],
         output_type="pil"),
])
def test_combined(pipes, case):
    ours, ref = run_both(pipes["combined"], **{**COMBINED, "output_type": "np", **case})
    if case.get("return_dict") is False:  # a 1-tuple, as the specification says; the reference's bare images
        assert isinstance(ours, tuple) and len(ours) == 1
        ref = [ref]
    atol = PIL_ATOL if case.get("output_type") == "pil" else 1e-4
    assert_close(ours[0], ref[0], atol)


def test_combined_prompt_list(pipes):
    """The reference crashes on a list of prompts; each image must equal its own single-prompt run."""
    ours, ref = pipes["combined"]
    prompts, seeds = ["a cat", "the dog"], [20, 21, 22, 23]
    out = ours(prompts, num_images_per_prompt=2, generator=gens(*seeds), output_type="np", **COMBINED).images
    for i in range(4):
        one = ref(prompts[i // 2], generator=gens(seeds[i])[0], output_type="np", **COMBINED).images
        assert_close(out[i: i + 1], one)


def test_combined_from_decoder_folder_with_model_card(root, pipes):
    """A decoder repo names its prior in README.md; the combined pipeline loads both."""
    import shutil

    folder = root / "decoder_with_card"
    shutil.copytree(root / "decoder", folder, dirs_exist_ok=True)
    (folder / "README.md").write_text("---\nprior:\n- prior\n---\n")
    pipe = load(cascade, "WuerstchenCombinedPipeline", folder)
    a, b = run_both((pipe, pipes["combined"][0]), prompt="a cat", output_type="np", **COMBINED)
    assert_close(a.images, b.images, 0)


def test_save_pretrained_reloads_in_reference(tmp_path, pipes):
    import diffusers

    pipes["decoder"][0].save_pretrained(tmp_path / "ours")
    ref = load(diffusers, "WuerstchenDecoderPipeline", tmp_path / "ours")
    ours, ref = run_both((pipes["decoder"][0], ref), image_embeddings=embeddings(1), prompt="a cat",
                         output_type="np", **DECODER)
    assert_close(ours.images, ref.images)


# ---------------------------------------------------------------------------------------------- callbacks

def halve_at_step_one(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}


def test_callbacks_change_results_as_reference(pipes):
    ours, ref = run_both(pipes["prior"], prompt="a cat", callback_on_step_end=halve_at_step_one, **PRIOR)
    assert_close(ours.image_embeddings, ref.image_embeddings, EMBED_ATOL)
    ours, ref = run_both(pipes["combined"], prompt="a cat", output_type="np",
                         callback_on_step_end=halve_at_step_one, prior_callback_on_step_end=halve_at_step_one,
                         **COMBINED)
    assert_close(ours.images, ref.images)


def test_callback_tensor_inputs_and_legacy_callbacks(pipes):
    ours = pipes["combined"][0]
    seen, legacy, prior_legacy = [], [], []
    ours("a cat", output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append((i, sorted(kw))) or {},
         callback_on_step_end_tensor_inputs=["latents", "image_embeddings", "text_encoder_hidden_states"],
         callback=lambda i, t, x: legacy.append(i), callback_steps=2,
         prior_callback=lambda i, t, x: prior_legacy.append(i), **{**COMBINED, "num_inference_steps": 3})
    assert seen == [(i, ["image_embeddings", "latents", "text_encoder_hidden_states"]) for i in range(3)]
    assert legacy == [0, 2] and prior_legacy == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("pipe, args, word", [
    ("prior", dict(prompt="a cat", output_type="pil"), "output_type"),
    ("prior", dict(prompt=None), "prompt"),
    ("prior", dict(prompt=3), "prompt"),
    ("prior", dict(prompt=["a", "b"], negative_prompt=["c"], guidance_scale=4.0), "negative_prompt"),
    ("prior", dict(prompt="a", prompt_embeds=torch.zeros(1, 16, 32)), "prompt_embeds"),
    ("prior", dict(prompt="a", height=0), "height"),
    ("prior", dict(prompt="a", width=12.5), "width"),
    ("prior", dict(prompt="a", num_inference_steps=2.0), "num_inference_steps"),
    ("prior", dict(prompt="a", latents=torch.zeros(1, 4, 5, 5)), "latents"),
    ("prior", dict(prompt="a", callback_on_step_end_tensor_inputs=["prior"]), "callback_on_step_end"),
    ("prior", dict(prompt="a", num_inference_step=2), "num_inference_step"),
    ("decoder", dict(image_embeddings=embeddings(1), prompt="a", output_type="jpg"), "output_type"),
    ("decoder", dict(image_embeddings=embeddings(1), prompt=None), "prompt"),
    ("decoder", dict(image_embeddings=embeddings(3), prompt=["a", "b"]), "prompt"),
    ("decoder", dict(image_embeddings=embeddings(1), prompt="a", negative_prompt=["b", "c"],
                     guidance_scale=2.0), "negative_prompt"),
    ("decoder", dict(image_embeddings=torch.zeros(1, 4, 2, 2), prompt="a"), "image_embeddings"),
    ("decoder", dict(image_embeddings=torch.zeros(1, 5, 3, 3), prompt="a"), "image_embeddings"),
    ("decoder", dict(image_embeddings="embeds", prompt="a"), "image_embeddings"),
    pytest.param("decoder", dict(image_embeddings=embeddings(1), prompt="a", generator=gens(1, 2)),
                 "generator"),
    ("combined", dict(prompt="a", height=64, width=128), "image_embeddings"),
    ("combined", dict(prompt="a", output_type="jpg"), "output_type"),
    ("combined", dict(prompt="a", callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end"),
    ("combined", dict(prompt="a", num_inference_step=2), "num_inference_step"),
])
def test_bad_input_raises_before_any_model_runs(pipes, pipe, args, word):
    ours = pipes[pipe][0]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in ours.modules().values()]
    try:
        with pytest.raises((ValueError, TypeError), match=word):
            ours(**args)
    finally:
        for h in hooks:
            h.remove()
    assert not calls


# ---------------------------------------------------------------------------------------------- precision

@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_reduced_precision_close_to_fp32(root, pipes, dtype, atol):
    """On CPU one seed draws different float16 and float32 noise (as in the reference), so the precisions are
    compared on explicit latents over one noise-free step from t = 0.5; the whole chain must stay finite."""
    low = load(cascade, "WuerstchenCombinedPipeline", root / "combined", torch_dtype=dtype)
    full = pipes["combined"][0]
    latents = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(8))
    embeds = [p.prior_pipe("a cat", latents=latents.to(p.prior_prior.dtype), timesteps=[0.5, 0.0], **SIZE)[0]
              for p in (low, full)]
    assert embeds[0].dtype == dtype
    assert_close(embeds[0] / 42, embeds[1] / 42, atol)  # measured: 3.5e-3 (float16), 1.9e-2 (bfloat16)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(9))
    images = [p.decoder_pipe(embeds[1].to(p.decoder.dtype), "a cat", latents=latents.to(p.decoder.dtype),
                             timesteps=[0.5, 0.0], output_type="pt").images for p in (low, full)]
    assert images[0].dtype == dtype
    assert_close(images[0], images[1], atol)  # measured: 6.3e-4 (float16), 5.3e-3 (bfloat16)
    images = low("a cat", generator=torch.Generator().manual_seed(0), output_type="pt",
                 prior_num_inference_steps=2, num_inference_steps=1, **SIZE).images
    assert images.dtype == dtype and torch.isfinite(images).all()

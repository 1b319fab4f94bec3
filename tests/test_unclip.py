"""unCLIP (Karlo): both pipelines against the reference, both libraries loading what the reference saved."""
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_close, load
from tiny import clip_parts, perturb

import cascade
from cascade import presets

diffusers = pytest.importorskip("diffusers")
STEPS = dict(decoder_num_inference_steps=2, super_res_num_inference_steps=3)
PRIOR_STEPS = dict(prior_num_inference_steps=2, **STEPS)
DIM = 32  # CLIP width = prior embedding = text projection input


def build(root):
    """Tiny Karlo components (every block type and embedding path of the real ones) saved by the reference."""
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    diffusers.UnCLIPTextProjModel = UnCLIPTextProjModel  # the reference reloads its folders from here only
    parts = clip_parts(root, DIM)
    torch.manual_seed(4)
    prior = perturb(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=DIM,
                                               num_layers=1, num_embeddings=16), 4)
    text_proj = perturb(UnCLIPTextProjModel(clip_embeddings_dim=DIM, time_embed_dim=128,
                                            cross_attention_dim=24), 5)
    decoder = perturb(diffusers.UNet2DConditionModel(**{
        **presets.KARLO_DECODER, "block_out_channels": [32, 64], "layers_per_block": 1,
        "attention_head_dim": 8, "cross_attention_dim": 24, "norm_num_groups": 8, "sample_size": 8,
        "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]}), 6)
    super_res = {**presets.KARLO_SUPER_RES, "block_out_channels": [16, 32], "layers_per_block": 1,
                 "norm_num_groups": 8, "sample_size": 16, "down_block_types": ["ResnetDownsampleBlock2D"] * 2,
                 "up_block_types": ["ResnetUpsampleBlock2D"] * 2}
    first, last = (perturb(diffusers.UNet2DModel(**super_res), seed) for seed in (7, 8))
    common = dict(decoder=decoder, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                  text_proj=text_proj, super_res_first=first, super_res_last=last,
                  decoder_scheduler=scheduler("decoder"), super_res_scheduler=scheduler("super_res"))
    diffusers.UnCLIPPipeline(prior=prior, prior_scheduler=scheduler("prior"), **common).save_pretrained(
        root / "unclip")
    diffusers.UnCLIPImageVariationPipeline(feature_extractor=parts["image_processor"],
                                           image_encoder=parts["image_encoder"],
                                           **common).save_pretrained(root / "variation")


def scheduler(stage):
    return diffusers.UnCLIPScheduler(**getattr(presets, f"KARLO_{stage.upper()}_SCHEDULER"))


@pytest.fixture(scope="module")
def root(unclip_root):
    return unclip_root


@pytest.fixture(scope="module")
def text2img(root):
    return tuple(load(lib, "UnCLIPPipeline", root / "unclip") for lib in (cascade, diffusers))


@pytest.fixture(scope="module")
def variation(root):
    name = "UnCLIPImageVariationPipeline"
    return load(cascade, name, root / "variation"), load(diffusers, name, root / "variation")


def run_both(pair, seed=0, **kw):
    outs = []
    for pipe in pair:
        args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        if seed is not None:  # a list of seeds: one generator per sample
            single = not isinstance(seed, list)
            args["generator"] = torch.Generator().manual_seed(seed) if single else per_sample(seed)
        outs.append(pipe(**args))
    return outs


def noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def picture(seed=0, size=40):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def explicit_latents(batch):
    return dict(prior_latents=noise(batch, DIM, seed=1), decoder_latents=noise(batch, 3, 8, 8, seed=2),
                super_res_latents=noise(batch, 3, 16, 16, seed=3))


# ---------------------------------------------------------------------------------------------- text to image

def per_sample(seeds):
    """One generator per sample: each draws the same numbers whether its sample runs alone or batched."""
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("case", [
    dict(prompt="a cat", prior_guidance_scale=1.0, output_type="pil"),
    dict(prompt=["a cat", "the dog"], num_images_per_prompt=2),
    dict(prompt="a cat", decoder_guidance_scale=1.0, num_images_per_prompt=2),
    dict(prompt=["a cat", "dog"], prior_guidance_scale=1.0, decoder_guidance_scale=1.0,
         num_images_per_prompt=2, seed=[0, 1, 2, 3]),
])
def test_text2img_seeded(text2img, case):
    """Guidance off with many images: the reference gets it right here, so it is compared directly."""
    ours, ref = run_both(text2img, **PRIOR_STEPS, **{"output_type": "np", **case})
    assert_close(ours.images, ref.images, 1e-4 if case.get("output_type") != "pil" else 1 / 255 + 1e-6)


def test_text2img_explicit_latents_tuple(text2img):
    ours, ref = run_both(text2img, seed=3, prompt=["a cat", "dog"], output_type="np", return_dict=False,
                         **explicit_latents(2), **PRIOR_STEPS)
    assert isinstance(ours, tuple) and len(ours) == 1
    assert_close(ours[0], ref[0])


def test_text2img_text_model_output(text2img):
    ours = text2img[0]
    tokens = ours.tokenizer(["a cat", "the dog"], padding="max_length", truncation=True, return_tensors="pt",
                            max_length=ours.tokenizer.model_max_length)
    with torch.no_grad():
        out = ours.text_encoder(tokens.input_ids)
    a, b = run_both(text2img, text_model_output=(out.text_embeds, out.last_hidden_state),
                    text_attention_mask=tokens.attention_mask, num_images_per_prompt=2, output_type="np",
                    **PRIOR_STEPS)
    assert_close(a.images, b.images)
    from_prompt = ours(["a cat", "the dog"], num_images_per_prompt=2, output_type="np", **PRIOR_STEPS,
                       generator=torch.Generator().manual_seed(0))
    assert_close(a.images, from_prompt.images, 1e-5)


def test_text2img_output_types(text2img):
    ours = text2img[0]

    def run(output_type):
        generator = torch.Generator().manual_seed(0)
        return ours("a cat", output_type=output_type, generator=generator, **PRIOR_STEPS).images

    as_np, as_pt, raw = run("np"), run("pt"), run("latent")
    assert as_np.shape == (1, 16, 16, 3) and as_pt.shape == raw.shape == (1, 3, 16, 16)
    assert_close(as_pt.permute(0, 2, 3, 1), as_np, 1e-6)
    assert_close((raw * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), as_np, 1e-6)


def test_callbacks_on_every_stage(text2img):
    ours, ref = text2img
    seen = []

    def halve_decoder_step_one(pipe, i, t, kwargs):
        seen.append((pipe.stage, i, tuple(kwargs["latents"].shape)))
        return {"latents": kwargs["latents"] * 0.5} if (pipe.stage, i) == ("decoder", 1) else {}

    out = ours("a cat", callback_on_step_end=halve_decoder_step_one, output_type="np", **PRIOR_STEPS,
               generator=torch.Generator().manual_seed(0)).images
    assert seen == [("prior", 0, (1, DIM)), ("prior", 1, (1, DIM)), ("decoder", 0, (1, 3, 8, 8)),
                    ("decoder", 1, (1, 3, 8, 8))] + [("super_res", i, (1, 3, 16, 16)) for i in range(3)]
    plain = ref("a cat", output_type="np", **PRIOR_STEPS, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(out - plain).max() > 1e-3
    assert ours.stage is None


# ---------------------------------------------------------------------------------------------- variations

@pytest.mark.parametrize("case", [
    dict(image=[picture(1), picture(2)], num_images_per_prompt=2),
    dict(image="tensor", decoder_guidance_scale=1.0),
    dict(image_embeddings="embeds", num_images_per_prompt=2),
])
def test_variation_seeded(variation, case):
    if case.get("image") == "tensor":
        prepared = variation[0].feature_extractor([picture(4), picture(5)], return_tensors="pt")
        case["image"] = prepared.pixel_values
    if case.get("image_embeddings") == "embeds":
        case["image_embeddings"] = noise(2, DIM, seed=9)
    ours, ref = run_both(variation, **STEPS, output_type="np", **case)
    assert_close(ours.images, ref.images)


def test_variation_explicit_latents_and_callback(variation):
    latents = explicit_latents(2)
    latents.pop("prior_latents")
    stages = []
    ours, ref = variation
    args = dict(image=[picture(1), picture(2)], output_type="np", **latents, **STEPS)
    a = ours(**args, callback_on_step_end=lambda pipe, i, t, kw: stages.append(pipe.stage) or {},
             generator=torch.Generator().manual_seed(1)).images
    assert_close(a, ref(**args, generator=torch.Generator().manual_seed(1)).images)
    assert stages == ["decoder"] * 2 + ["super_res"] * 3


# ---------------------------------------------------------------------------------------------- files

@pytest.mark.parametrize("name,folder", [("UnCLIPPipeline", "unclip"),
                                         ("UnCLIPImageVariationPipeline", "variation")])
def test_saved_by_cascade_loads_in_reference(root, tmp_path, name, folder):
    ours = load(cascade, name, root / folder)
    ours.save_pretrained(tmp_path / "p")
    ref = load(diffusers, name, tmp_path / "p")
    args = dict(prompt="a cat", **PRIOR_STEPS) if folder == "unclip" else dict(image=picture(2), **STEPS)
    a, b = run_both((ours, ref), output_type="np", **args)
    assert_close(a.images, b.images)


def test_hub_style_class_names(root, tmp_path, text2img):
    """Karlo's own model_index.json names the text projection under the pipeline module, "unclip"."""
    shutil.copytree(root / "unclip", tmp_path / "karlo")
    index = json.loads((tmp_path / "karlo" / "model_index.json").read_text())
    index["text_proj"] = ["unclip", "UnCLIPTextProjModel"]
    (tmp_path / "karlo" / "model_index.json").write_text(json.dumps(index))
    pipe = load(cascade, "UnCLIPPipeline", tmp_path / "karlo")
    assert isinstance(pipe.text_proj, cascade.UnCLIPTextProjModel)
    assert isinstance(pipe.super_res_last, cascade.UNet2DModel)


# ---------------------------------------------------------------------------------------------- errors

BAD_TEXT2IMG = [
    (dict(), "prompt"),
    (dict(text_model_output=(torch.zeros(1, DIM), torch.zeros(1, 16, DIM))), "text_attention_mask"),
    (dict(prompt=3), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt="a", text_model_output=(torch.zeros(1, DIM), torch.zeros(1, 16, DIM)),
          text_attention_mask=torch.ones(1, 16)), "either"),
    (dict(prompt="a", prior_latents=torch.zeros(2, DIM)), "prior_latents"),
    (dict(prompt="a", num_images_per_prompt=2, decoder_latents=torch.zeros(1, 3, 8, 8)), "decoder_latents"),
    (dict(prompt="a", super_res_latents=torch.zeros(1, 3, 8, 8)), "super_res_latents"),
    (dict(prompt="a", output_type="jpg"), "output_type"),
    (dict(prompt="a", callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end"),
]
BAD_VARIATION = [
    (dict(), "image"),
    (dict(image="cat.png"), "image"),
    (dict(image=np.zeros((32, 32, 3))), "image"),
    (dict(image=picture(), image_embeddings=torch.zeros(1, DIM)), "either"),
    (dict(image=picture(), decoder_latents=torch.zeros(1, 4, 8, 8)), "decoder_latents"),
]


@pytest.mark.parametrize("which,kwargs,word", [("text2img", *c) for c in BAD_TEXT2IMG] +
                         [("variation", *c) for c in BAD_VARIATION])
def test_bad_input_is_named_before_any_model_runs(request, which, kwargs, word):
    ours = request.getfixturevalue(which)[0]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in ours.modules().values()]
    try:
        with pytest.raises((ValueError, TypeError), match=word):
            ours(**kwargs, **STEPS)
    finally:
        for h in hooks:
            h.remove()
    assert not calls

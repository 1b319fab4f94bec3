"""Kandinsky 2.2: each of the ten pipelines against the reference, both loading the same saved folder."""
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_close, load

import cascade

STEPS = 3
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def pipes(kandinsky_root):
    """(ours, reference) pairs for every pipeline, loaded once from disk."""
    import diffusers

    folders = {"KandinskyV22PriorPipeline": "prior", "KandinskyV22PriorEmb2EmbPipeline": "prior",
               "KandinskyV22Pipeline": "text2img", "KandinskyV22Img2ImgPipeline": "text2img",
               "KandinskyV22InpaintPipeline": "inpaint", "KandinskyV22ControlnetPipeline": "controlnet",
               "KandinskyV22ControlnetImg2ImgPipeline": "controlnet",
               "KandinskyV22CombinedPipeline": "combined_text2img",
               "KandinskyV22Img2ImgCombinedPipeline": "combined_img2img",
               "KandinskyV22InpaintCombinedPipeline": "combined_inpaint",}

    class Pairs(dict):
        def __missing__(self, name):
            folder = kandinsky_root / folders[name]
            self[name] = (load(cascade, name, folder), load(diffusers, name, folder))
            return self[name]

    return Pairs()


def run_both(pair, seed=0, **kw):
    """The same call on both libraries, each with a fresh generator of the same seed."""
    ours, ref = pair
    outs = []
    for pipe in (ours, ref):
        args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        if seed is not None:
            args["generator"] = torch.Generator().manual_seed(seed)
        outs.append(pipe(**args))
    return outs


def generators(seeds):
    """One generator per sample: each draws the same numbers whether its sample runs alone or batched."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def embeds(batch, seed=0, dim=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


def picture(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_picture(size=32, box=(8, 8, 20, 24)):
    m = np.zeros((size, size), np.uint8)
    m[box[0]:box[1] + 8, box[2] - 8:box[3]] = 255
    return PIL.Image.fromarray(m)


# ---------------------------------------------------------------------------------------------- prior

@pytest.mark.parametrize("case", [
    dict(prompt="a cat"),
    dict(prompt=["a cat", "the dog"], num_images_per_prompt=2),
    dict(prompt=["a cat", "the dog"], negative_prompt=["dog", "cat"]),
    dict(prompt="a cat", guidance_scale=1.0, num_images_per_prompt=2),
    dict(prompt="a cat", output_type="np", return_dict=False),
])
def test_prior(pipes, case):
    ours, ref = run_both(pipes["KandinskyV22PriorPipeline"], num_inference_steps=STEPS, **case)
    ours, ref = (o if isinstance(o, tuple) else o.to_tuple() for o in (ours, ref))
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 1e-5)


def test_prior_explicit_latents(pipes):
    latents = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    ours, ref = run_both(pipes["KandinskyV22PriorPipeline"], prompt=["a cat", "dog"], latents=latents,
                         num_inference_steps=STEPS)
    assert_close(ours.image_embeds, ref.image_embeds, 1e-5)
    assert_close(ours.negative_image_embeds, ref.negative_image_embeds, 1e-5)


@pytest.mark.parametrize("image", ["pil", "embeds"])
def test_prior_emb2emb(pipes, image):
    start = [picture(1)] if image == "pil" else embeds(1, 7)[0]
    ours, ref = run_both(pipes["KandinskyV22PriorEmb2EmbPipeline"], prompt="a cat", image=start, strength=0.6,
                         num_inference_steps=4, num_images_per_prompt=2)
    assert_close(ours.image_embeds, ref.image_embeds, 1e-5)
    assert_close(ours.negative_image_embeds, ref.negative_image_embeds, 1e-5)


def test_prior_interpolate(pipes):
    ours, ref = pipes["KandinskyV22PriorPipeline"]
    args = dict(images_and_prompts=["a cat", picture(2)], weights=[0.3, 0.7], num_inference_steps=STEPS)
    a = ours.interpolate(generator=torch.Generator().manual_seed(0), **args)
    b = ref.interpolate(generator=torch.Generator().manual_seed(0), **args)
    assert_close(a.image_embeds, b.image_embeds, 1e-5)
    assert_close(a.negative_image_embeds, b.negative_image_embeds, 1e-5)


def test_prior_zero_embeds_computed_once(pipes):
    ours = pipes["KandinskyV22PriorPipeline"][0]
    calls = []
    handle = ours.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for _ in range(2):
            ours("a cat", num_inference_steps=2)
    finally:
        handle.remove()
    assert len(calls) <= 1


# ---------------------------------------------------------------------------------------------- decoders

@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_text2img_output_types(pipes, output_type):
    pos, neg = embeds(2)
    ours, ref = run_both(pipes["KandinskyV22Pipeline"], image_embeds=pos, negative_image_embeds=neg,
                         num_inference_steps=STEPS, num_images_per_prompt=2, output_type=output_type, **SIZE)
    assert_close(ours.images, ref.images, 1e-4 if output_type != "pil" else 1 / 255 + 1e-6)


@pytest.mark.parametrize("name", ["KandinskyV22Pipeline", "KandinskyV22InpaintPipeline"])
def test_channels_last_is_a_choice_near_the_default(pipes, kandinsky_root, name):
    """memory_format=torch.channels_last: the UNet's convolution weights and its steps in that layout; the
    convolutions round differently, so the image moves a little from the reference's (the default's)."""
    import cascade

    default = pipes[name][0]
    folder = kandinsky_root / ("text2img" if name == "KandinskyV22Pipeline" else "inpaint")
    last = getattr(cascade, name).from_pretrained(folder, memory_format=torch.channels_last)
    assert last.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not default.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pos, neg = embeds(1)
    kw = dict(image_embeds=pos, negative_image_embeds=neg, num_inference_steps=STEPS, output_type="np", **SIZE)
    if name != "KandinskyV22Pipeline":
        kw.update(image=picture(), mask_image=np.tri(32, dtype=np.float32))
    a, b = (p(generator=torch.Generator().manual_seed(0), **kw).images for p in (default, last))
    assert 0 < np.abs(a - b).max() < 1e-3  # measured: 9.4e-5 (text to image), 2.8e-4 (inpainting)


def test_text2img_explicit_latents_tuple(pipes):
    pos, neg = embeds(1)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours, ref = run_both(pipes["KandinskyV22Pipeline"], image_embeds=[pos], negative_image_embeds=[neg],
                         latents=latents, num_inference_steps=STEPS, output_type="np", return_dict=False,
                         **SIZE)
    assert isinstance(ours, tuple) and len(ours) == 1
    assert_close(ours[0], ref[0])


def test_text2img_guidance_off_many_images(pipes):
    """The reference fails here; the right output is each sample run on its own."""
    ours, ref = pipes["KandinskyV22Pipeline"]
    pos, neg = embeds(2)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    out = ours(pos, neg, num_images_per_prompt=2, guidance_scale=1.0, latents=latents,
               num_inference_steps=STEPS, output_type="np", generator=generators(range(4)), **SIZE).images
    for i in range(4):
        one = ref(pos[i // 2: i // 2 + 1], neg[i // 2: i // 2 + 1], guidance_scale=1.0,
                  latents=latents[i: i + 1], num_inference_steps=STEPS, output_type="np",
                  generator=generators([i]), **SIZE).images
        assert_close(out[i: i + 1], one)


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_img2img(pipes, output_type):
    pos, neg = embeds(2)
    ours, ref = run_both(pipes["KandinskyV22Img2ImgPipeline"], image_embeds=pos, negative_image_embeds=neg,
                         image=[picture(1), picture(2)], strength=0.7, num_inference_steps=4,
                         output_type=output_type, **SIZE)
    assert_close(ours.images, ref.images)


def test_img2img_tensor_many_images(pipes):
    pos, neg = embeds(1)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours, ref = run_both(pipes["KandinskyV22Img2ImgPipeline"], image_embeds=pos, negative_image_embeds=neg,
                         image=image, strength=0.5, num_inference_steps=4, num_images_per_prompt=2,
                         output_type="np", **SIZE)
    assert_close(ours.images, ref.images)


@pytest.mark.parametrize("mask", ["pil", "np", "tensor"])
def test_inpaint(pipes, mask):
    pos, neg = embeds(1)
    m = mask_picture()
    image = picture(3)
    if mask == "np":
        m = np.asarray(m, np.float32) / 255.0
    if mask == "tensor":
        m = torch.from_numpy(np.asarray(m, np.float32) / 255.0)
        image = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)
    ours, ref = run_both(pipes["KandinskyV22InpaintPipeline"], image_embeds=pos, negative_image_embeds=neg,
                         image=image, mask_image=m, num_inference_steps=STEPS, num_images_per_prompt=2,
                         output_type="np", **SIZE)
    assert_close(ours.images, ref.images)


def test_inpaint_batch_uses_each_image(pipes):
    """The reference reuses the first image and mask; each sample must match its own single run."""
    ours, ref = pipes["KandinskyV22InpaintPipeline"]
    pos, neg = embeds(2)
    images, masks = [picture(4), picture(5)], [mask_picture(), mask_picture(box=(0, 4, 10, 30))]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    run = dict(num_inference_steps=STEPS, output_type="np", **SIZE)
    out = ours(pos, images, masks, neg, latents=latents, generator=generators(range(2)), **run).images
    wrong = ref(pos, images, masks, neg, latents=latents, generator=generators(range(2)), **run).images
    for i in range(2):
        alone = dict(latents=latents[i:i + 1], generator=generators([i]), **run)
        one = ours(pos[i:i + 1], images[i], masks[i], neg[i:i + 1], **alone).images
        # How far a batch of two rounds from a batch of one on this case, in the reference itself (its
        # batch of the same image twice is unaffected by its reuse of the first image): the bound for ours.
        pair = [i, i]
        twice = ref(pos[pair], [images[i]] * 2, [masks[i]] * 2, neg[pair], latents=latents[pair],
                    generator=generators(pair), **run).images
        drift = float(np.abs(twice[:1] - ref(pos[i:i + 1], images[i], masks[i], neg[i:i + 1], **alone).images).max())
        assert_close(out[i:i + 1], one, 4 * max(drift, 1e-4))
    # The reference's reuse of the first image is off by far more.
    assert np.abs(wrong[1:] - out[1:]).max() > 0.05


def test_controlnet(pipes):
    pos, neg = embeds(2)
    hint = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    ours, ref = run_both(pipes["KandinskyV22ControlnetPipeline"], image_embeds=pos, negative_image_embeds=neg,
                         hint=hint, num_inference_steps=STEPS, num_images_per_prompt=2, output_type="np",
                         **SIZE)
    assert_close(ours.images, ref.images)


def test_controlnet_img2img(pipes):
    pos, neg = embeds(1)
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    ours, ref = run_both(pipes["KandinskyV22ControlnetImg2ImgPipeline"], image_embeds=pos,
                         negative_image_embeds=neg, image=picture(6), hint=hint, strength=0.8,
                         num_inference_steps=4, output_type="pt", **SIZE)
    assert_close(ours.images, ref.images)


# ---------------------------------------------------------------------------------------------- combined

@pytest.mark.parametrize("case", [
    dict(prompt="a cat"),
    dict(prompt="a cat", negative_prompt="dog", num_images_per_prompt=2, output_type="pt"),
])
def test_combined(pipes, case):
    ours, ref = run_both(pipes["KandinskyV22CombinedPipeline"], num_inference_steps=STEPS,
                         prior_num_inference_steps=STEPS, **SIZE, **{"output_type": "np", **case})
    assert_close(ours.images, ref.images)


def test_img2img_combined(pipes):
    ours, ref = run_both(pipes["KandinskyV22Img2ImgCombinedPipeline"], prompt=["a cat", "dog"],
                         image=[picture(1), picture(2)], strength=0.6, num_inference_steps=4,
                         prior_num_inference_steps=STEPS, output_type="np", **SIZE)
    assert_close(ours.images, ref.images)


def test_inpaint_combined(pipes):
    ours, ref = run_both(pipes["KandinskyV22InpaintCombinedPipeline"], prompt="a cat", image=picture(3),
                         mask_image=mask_picture(), num_inference_steps=STEPS,
                         prior_num_inference_steps=STEPS, output_type="np", **SIZE)
    assert_close(ours.images, ref.images)


def test_inpaint_combined_takes_a_batch_of_masks_as_one_tensor(pipes):
    """A (B, H, W) mask tensor is B masks, as a list of them is (the reference agrees on the first image; it
    reuses the first image and mask for the rest of a batch, see test_inpaint_batch_uses_each_image)."""
    masks = [mask_picture(), mask_picture(box=(0, 4, 10, 30))]
    tensor = torch.from_numpy(np.stack([np.asarray(m, np.float32) / 255.0 for m in masks]))  # (2, H, W)
    images = torch.from_numpy(np.stack([np.asarray(picture(i), np.float32) / 127.5 - 1 for i in (3, 4)]))
    run = dict(prompt=["a cat", "dog"], image=images.permute(0, 3, 1, 2), num_inference_steps=STEPS,
               prior_num_inference_steps=STEPS, output_type="np", **SIZE)
    ours, ref = run_both(pipes["KandinskyV22InpaintCombinedPipeline"], mask_image=tensor, **run)
    listed = pipes["KandinskyV22InpaintCombinedPipeline"][0](mask_image=masks, **run,
                                                            generator=torch.Generator().manual_seed(0))
    assert_close(ours.images, listed.images, atol=0)
    assert_close(ours.images[:1], ref.images[:1], atol=1e-3)  # a quarter of one 8-bit level
    assert np.abs(ours.images[1] - ours.images[0]).max() > 0.1


# ---------------------------------------------------------------------------------------------- callbacks

def halve_at_step_one(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}


@pytest.mark.parametrize("name", ["KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline",
                                  "KandinskyV22InpaintPipeline"])
def test_callback_on_step_end_changes_result_as_reference(pipes, name):
    pos, neg = embeds(1)
    extra = {"KandinskyV22Img2ImgPipeline": dict(image=picture(1), strength=1.0),
             "KandinskyV22InpaintPipeline": dict(image=picture(1), mask_image=mask_picture())}.get(name, {})
    ours, ref = run_both(pipes[name], image_embeds=pos, negative_image_embeds=neg, num_inference_steps=STEPS,
                         callback_on_step_end=halve_at_step_one, output_type="np", **SIZE, **extra)
    plain = pipes[name][0](pos, negative_image_embeds=neg, generator=torch.Generator().manual_seed(0),
                           num_inference_steps=STEPS, output_type="np", **SIZE, **extra)
    assert_close(ours.images, ref.images)
    assert np.abs(ours.images - plain.images).max() > 1e-3


def test_callbacks_in_controlnet_and_legacy_default_steps(pipes):
    ours = pipes["KandinskyV22ControlnetPipeline"][0]
    pos, neg = embeds(1)
    seen, legacy = [], []
    ours(pos, neg, hint=torch.rand(1, 3, 128, 128), num_inference_steps=STEPS, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append((i, sorted(kw))) or {},
         callback_on_step_end_tensor_inputs=["latents", "image_embeds"],
         callback=lambda *a: legacy.append(a[0]), **SIZE)
    assert seen == [(i, ["image_embeds", "latents"]) for i in range(STEPS)]
    assert legacy == list(range(STEPS))
    plain = pipes["KandinskyV22Pipeline"][0]
    plain(pos, neg, num_inference_steps=2, output_type="latent", callback=lambda *a: legacy.append(a[0]),
          **SIZE)
    assert legacy[-2:] == [0, 1]


def test_prior_callback(pipes):
    ours, ref = run_both(pipes["KandinskyV22PriorPipeline"], prompt="a cat", num_inference_steps=STEPS,
                         callback_on_step_end=halve_at_step_one)
    assert_close(ours.image_embeds, ref.image_embeds, 1e-5)


# ---------------------------------------------------------------------------------------------- files

def test_saved_by_cascade_loads_in_reference(pipes, tmp_path):
    import diffusers

    ours = pipes["KandinskyV22Pipeline"][0]
    ours.save_pretrained(tmp_path / "k")
    ref = load(diffusers, "KandinskyV22Pipeline", tmp_path / "k")
    pos, neg = embeds(1)
    a, b = run_both((ours, ref), image_embeds=pos, negative_image_embeds=neg, num_inference_steps=STEPS,
                    output_type="np", **SIZE)
    assert_close(a.images, b.images)


def test_prior_saved_by_cascade_loads_in_reference(pipes, tmp_path):
    import diffusers

    pipes["KandinskyV22PriorPipeline"][0].save_pretrained(tmp_path / "p")
    ref = load(diffusers, "KandinskyV22PriorPipeline", tmp_path / "p")
    a, b = run_both((pipes["KandinskyV22PriorPipeline"][0], ref), prompt="a cat", num_inference_steps=STEPS)
    assert_close(a.image_embeds, b.image_embeds, 1e-5)


def test_combined_from_decoder_folder_and_model_card(kandinsky_root, tmp_path, pipes):
    import shutil

    shutil.copytree(kandinsky_root / "text2img", tmp_path / "decoder")
    shutil.copytree(kandinsky_root / "prior", tmp_path / "prior")
    (tmp_path / "decoder" / "README.md").write_text("---\nlicense: apache-2.0\nprior:\n- prior\n---\n# decoder\n")
    pipe = load(cascade, "KandinskyV22CombinedPipeline", tmp_path / "decoder")
    ref = pipes["KandinskyV22CombinedPipeline"][1]
    a, b = run_both((pipe, ref), prompt="a cat", num_inference_steps=STEPS, prior_num_inference_steps=STEPS,
                    output_type="np", **SIZE)
    assert_close(a.images, b.images)


def test_load_by_repo_id_from_offline_hub_cache(kandinsky_root, tmp_path, monkeypatch):
    import shutil

    snapshot = tmp_path / "hub" / "models--kandinsky-community--tiny-decoder" / "snapshots" / ("0" * 40)
    shutil.copytree(kandinsky_root / "text2img", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = cascade.KandinskyV22Pipeline.from_pretrained("kandinsky-community/tiny-decoder",
                                                        cache_dir=tmp_path / "hub")
    assert pipe.unet.config.in_channels == 4
    unet = cascade.UNet2DConditionModel.from_pretrained("kandinsky-community/tiny-decoder", subfolder="unet",
                                                        cache_dir=tmp_path / "hub")
    assert unet.config.out_channels == 8


# ---------------------------------------------------------------------------------------------- errors

def bad_calls():
    pos, neg = embeds(2)
    return [
        ("KandinskyV22Pipeline", dict(image_embeds=pos, negative_image_embeds=neg[:1]), "negative_image_embeds"),
        ("KandinskyV22Pipeline", dict(image_embeds=pos, negative_image_embeds=neg, height=30), "height"),
        ("KandinskyV22Pipeline", dict(image_embeds=pos, negative_image_embeds=neg, output_type="jpg"), "output_type"),
        ("KandinskyV22Pipeline", dict(image_embeds=pos, negative_image_embeds=neg,
                                      latents=torch.zeros(1, 4, 16, 16)), "latents"),
        ("KandinskyV22Img2ImgPipeline", dict(image_embeds=pos, negative_image_embeds=neg, image=picture(),
                                             strength=1.5), "strength"),
        ("KandinskyV22Img2ImgPipeline", dict(image_embeds=pos, negative_image_embeds=neg,
                                             image=[picture()] * 3), "image"),
        ("KandinskyV22InpaintPipeline", dict(image_embeds=pos, negative_image_embeds=neg, image=[picture()] * 2,
                                             mask_image=[mask_picture()] * 3), "mask_image"),
        ("KandinskyV22ControlnetPipeline", dict(image_embeds=pos, negative_image_embeds=neg,
                                                hint=torch.zeros(3, 3, 32, 32)), "hint"),
        ("KandinskyV22Pipeline", dict(image_embeds=pos, negative_image_embeds=neg,
                                      callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end"),
        ("KandinskyV22PriorPipeline", dict(prompt=["a", "b"], negative_prompt=["c", "d", "e"]), "negative_prompt"),
    ]


@pytest.mark.parametrize("name,kwargs,word", bad_calls())
def test_bad_input_names_the_parameter_before_any_model_runs(pipes, name, kwargs, word):
    ours = pipes[name][0]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in ours.modules().values()
             if name != "KandinskyV22PriorPipeline"]
    try:
        with pytest.raises((ValueError, TypeError), match=word):
            ours(**({"num_inference_steps": 2} | ({} if "Prior" in name else SIZE) | kwargs))
    finally:
        for h in hooks:
            h.remove()
    assert not calls


def test_missing_component_and_unsupported_option(kandinsky_root, tmp_path):
    import json
    import shutil

    shutil.copytree(kandinsky_root / "text2img", tmp_path / "k")
    index = json.loads((tmp_path / "k" / "model_index.json").read_text())
    del index["movq"]
    (tmp_path / "k" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="movq"):
        cascade.KandinskyV22Pipeline.from_pretrained(tmp_path / "k")
    config = json.loads((tmp_path / "k" / "unet" / "config.json").read_text())
    config["class_embeddings_concat"] = True
    (tmp_path / "k" / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json.*class_embeddings_concat"):
        cascade.UNet2DConditionModel.from_pretrained(tmp_path / "k", subfolder="unet")


def test_import_does_not_import_reference():
    import subprocess
    import sys

    code = "import sys, cascade; cascade.KandinskyV22CombinedPipeline; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""The x2 latent upscaler (pipeline, K-diffusion UNet, single-file checkpoint) against the reference."""
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_close
from tiny import perturb, tokenizer

import cascade
from cascade import presets
from cascade.models import UNet2DConditionModel

diffusers = pytest.importorskip("diffusers")

STEPS = 3
PROMPT = "a cat"
# Every block type of the real UNet (K down/up blocks with and without cross-attention, the deepest level's
# self-attention, the narrowing middle up block), Fourier time features with the pooled-text projection.
TINY_UNET = dict(
    in_channels=8, out_channels=5, block_out_channels=[32, 32, 64, 64], layers_per_block=2,
    down_block_types=["KDownBlock2D"] + ["KCrossAttnDownBlock2D"] * 3, mid_block_type=None,
    up_block_types=["KCrossAttnUpBlock2D"] * 3 + ["KUpBlock2D"], act_fn="gelu", norm_num_groups=None,
    cross_attention_dim=32, attention_head_dim=8, time_cond_proj_dim=128 + 32,
    resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
    conv_in_kernel=1, conv_out_kernel=1,
)


def reference_pipeline(root):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok, vocab = tokenizer(root / "_tok")
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab,
        max_position_embeddings=16)).eval()
    vae = perturb(diffusers.AutoencoderKL(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4,
        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, layers_per_block=1), 1)
    unet = perturb(diffusers.UNet2DConditionModel(**TINY_UNET), 2)
    scheduler = diffusers.EulerDiscreteScheduler(**presets.LATENT_UPSCALER_SCHEDULER)
    return diffusers.StableDiffusionLatentUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tok,
                                                          unet=unet, scheduler=scheduler)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(upscaler_folder):
    return upscaler_folder


def load(lib, path, **kw):
    pipe = getattr(lib, "StableDiffusionLatentUpscalePipeline").from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pair(folder):
    return load(cascade, folder), load(diffusers, folder)


def picture(seed=0, size=16):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def run(pipe, seed=0, **kw):
    """Numbers, not 8-bit PIL images, unless asked: rounding to bytes can flip a value by 1/255."""
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    args.setdefault("output_type", "np")
    if seed is not None:
        args["generator"] = torch.Generator().manual_seed(seed)
    return pipe(num_inference_steps=STEPS, **args).images


def low_res_latents(batch=1, seed=3):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


IMAGE_CASES = {
    "pil": dict(prompt=PROMPT, image=picture()),
    "numpy": dict(prompt=PROMPT, image=np.asarray(picture(), np.float32) / 255, output_type="pt"),
    "tensor [-1, 1]": dict(prompt=PROMPT, image=torch.rand(1, 3, 16, 16) * 2 - 1),
    "tensor [0, 1] list": dict(prompt=[PROMPT, "the dog"], image=[torch.rand(3, 16, 16) for _ in range(2)]),
    "pil list, prompts": dict(prompt=[PROMPT, "the dog"], image=[picture(1), picture(2)], output_type="pil"),
    "odd size cut to the VAE scale": dict(prompt=PROMPT, image=picture(size=17)),
    "latents": dict(prompt=PROMPT, image=low_res_latents(), output_type="latent"),
    "negative prompt": dict(prompt=[PROMPT, "the dog"], image=low_res_latents(2),
                            negative_prompt=["dog", "cat"]),
    "negative str": dict(prompt=PROMPT, image=picture(), negative_prompt="the dog", guidance_scale=3.0),
    "guidance 0": dict(prompt=PROMPT, image=picture(), guidance_scale=0),
    "guidance 1": dict(prompt=PROMPT, image=picture(), guidance_scale=1.0),
}


@pytest.mark.parametrize("case", IMAGE_CASES, ids=list(IMAGE_CASES))
def test_matches_reference(pair, case):
    ours, ref = pair
    assert_close(run(ours, **IMAGE_CASES[case]), run(ref, **IMAGE_CASES[case]))


def test_explicit_latents_need_no_generator(pair):
    kw = dict(prompt=PROMPT, image=low_res_latents(), latents=torch.randn(1, 4, 16, 16), output_type="np")
    assert_close(run(pair[0], seed=None, **kw), run(pair[1], seed=None, **kw))


def test_attention_slicing_matches_reference(pair):
    ours, ref = pair
    for pipe in pair:
        pipe.enable_attention_slicing("max")
    try:
        assert_close(run(ours, **IMAGE_CASES["pil"]), run(ref, **IMAGE_CASES["pil"]))
    finally:
        for pipe in pair:
            pipe.disable_attention_slicing()


def test_callbacks(pair):
    ours, ref = pair
    seen = {id(ours): [], id(ref): []}
    for pipe in pair:
        run(pipe, callback=lambda i, t, x, p=pipe: seen[id(p)].append((i, float(t), x.clone())),
            callback_steps=2, **IMAGE_CASES["pil"])
    assert [s[:2] for s in seen[id(ours)]] == [s[:2] for s in seen[id(ref)]]
    assert [s[0] for s in seen[id(ours)]] == [0, 2]
    for a, b in zip(seen[id(ours)], seen[id(ref)]):
        assert_close(a[2], b[2])

    def halve(pipe, i, t, state):
        return {"latents": state["latents"] * 0.5} if i == 0 else {}

    changed = run(ours, callback_on_step_end=halve, eta=0.3, **IMAGE_CASES["pil"])
    assert np.abs(changed - run(ours, **IMAGE_CASES["pil"])).max() > 0


def test_output_object(pair):
    ours = pair[0]
    out = ours(PROMPT, low_res_latents(), num_inference_steps=1, output_type="np")
    assert isinstance(out, cascade.StableDiffusionPipelineOutput) and out.nsfw_content_detected is None
    assert out.images.shape == (1, 32, 32, 3)
    assert ours(PROMPT, low_res_latents(), num_inference_steps=1, return_dict=False)[0][0].size == (32, 32)


def test_folder_round_trip(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path / "ours")
    for lib in (cascade, diffusers):
        assert_close(run(load(lib, tmp_path / "ours"), **IMAGE_CASES["pil"]), run(ours, **IMAGE_CASES["pil"]))


# ---------------------------------------------------------------------------------- errors before any model


@pytest.fixture
def guarded(pair):
    """Our pipeline, whose models fail the test if they run."""
    ours = pair[0]

    def fail(*_):
        raise AssertionError("a model ran before the input was rejected")

    hooks = [m.register_forward_pre_hook(fail) for m in (ours.vae, ours.unet, ours.text_encoder)]
    yield ours
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("kw, match", [
    (dict(prompt=[PROMPT, PROMPT], image=picture()), "prompt has batch size 2 and image has batch size 1"),
    (dict(prompt=PROMPT, image=[picture(1), picture(2)]), "batch size 1 and image has batch size 2"),
    (dict(prompt=PROMPT, image=torch.rand(1, 2, 16, 16)), "expected 3 channels"),
    (dict(prompt=PROMPT, image=np.zeros((16, 16, 1), np.float32)), "expected 3 channels"),
    (dict(prompt=[PROMPT, PROMPT], image=low_res_latents(2), negative_prompt=["x"]), "negative_prompt has 1"),
    (dict(prompt=PROMPT, image=picture(), output_type="jpeg"), "output_type"),
])
def test_bad_input_fails_first(guarded, kw, match):
    with pytest.raises(ValueError, match=match):
        guarded(num_inference_steps=1, **kw)


# ------------------------------------------------------------------------------------- single-file checkpoint


def original_layout(unet) -> dict:
    """The k-diffusion checkpoint the reference's conversion script reads, written from a reference UNet."""
    sd, out = unet.state_dict(), {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            side, b, kind, j, rest = parts[0][0], int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            block = getattr(unet, parts[0])[b]
            n = 1 if not hasattr(block, "attentions") else 3 if block.attentions[0].add_self_attention else 2
            base = f"inner_model.u_net.{side}_blocks.{b}"
            shift = 1 if side == "d" else 0
            if kind == "resnets":
                for ours, theirs in [("norm1.linear", "main.0.mapper"), ("conv1", "main.2"),
                                     ("conv2", "main.6"), ("norm2.linear", "main.4.mapper"),
                                     ("conv_shortcut", "skip")]:
                    if rest.startswith(ours + "."):
                        out[f"{base}.{n * j + shift}.{theirs}.{rest.split('.')[-1]}"] = value
                continue
            self_at, cross_at = n * j + shift + 1, n * j + shift + (2 if n == 3 else 1)
            table = {"norm1.linear": (self_at, "norm_in.mapper"), "attn1.to_out.0": (self_at, "out_proj"),
                     "norm2.linear": (cross_at, "norm_dec.mapper"),
                     "attn2.norm_cross": (cross_at, "norm_enc"),
                     "attn2.to_q": (cross_at, "q_proj"), "attn2.to_out.0": (cross_at, "out_proj")}
            module, param = rest.rsplit(".", 1)
            if module in table:
                index, name = table[module]
                conv = name in ("out_proj", "q_proj") and param == "weight"
                out[f"{base}.{index}.{name}.{param}"] = value[..., None, None] if conv else value
            elif module == "attn1.to_q":
                fused = torch.cat([sd[key], sd[key.replace("to_q", "to_k")], sd[key.replace("to_q", "to_v")]])
                fused = fused[..., None, None] if param == "weight" else fused
                out[f"{base}.{self_at}.qkv_proj.{param}"] = fused
            elif module == "attn2.to_k":
                fused = torch.cat([value, sd[key.replace("to_k", "to_v")]])
                out[f"{base}.{cross_at}.kv_proj.{param}"] = fused
            continue
        top = {"conv_in": "proj_in", "time_proj": "timestep_embed", "time_embedding.linear_1": "mapping.0",
               "time_embedding.linear_2": "mapping.2", "time_embedding.cond_proj": "mapping_cond",
               "conv_out": "proj_out"}
        module, param = key.rsplit(".", 1)
        out[f"inner_model.{top[module]}.{param}"] = value[:, None] if module == "time_proj" else value
    return out


def test_from_single_file_equals_its_folder(pair, folder, tmp_path):
    checkpoint = original_layout(diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"))
    torch.save({"model_ema": checkpoint}, tmp_path / "upscaler.pth")
    load = cascade.StableDiffusionLatentUpscalePipeline.from_single_file
    pipe = load(tmp_path / "upscaler.pth", config=folder)
    pipe.set_progress_bar_config(disable=True)
    assert_close(run(pipe, **IMAGE_CASES["pil"]), run(pair[0], **IMAGE_CASES["pil"]), 0)

    del checkpoint["inner_model.u_net.u_blocks.1.3.kv_proj.weight"]
    torch.save(checkpoint, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys: \['inner_model\.u_net\.u_blocks\.1\.3\.kv_proj"):
        load(tmp_path / "broken.pth", config=folder)


# ------------------------------------------------------------------------------------- the UNet


def test_unet_matches_reference():
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**TINY_UNET))
    ours = UNet2DConditionModel(**TINY_UNET).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    cond = torch.randn(2, 160, generator=g)
    with torch.no_grad():
        args = (x, torch.tensor(-0.4)), dict(encoder_hidden_states=context, timestep_cond=cond)
        assert_close(ours(*args[0], **args[1]).sample, ref(*args[0], **args[1]).sample, 1e-5)


def test_real_unet_layout():
    with torch.device("meta"):
        ours = UNet2DConditionModel(**presets.LATENT_UPSCALER_UNET)
        ref = diffusers.UNet2DConditionModel(**presets.LATENT_UPSCALER_UNET)
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (ours, ref)]
    assert shapes[0] == shapes[1]
    assert round(ours.num_parameters() / 1e6, 1) == 372.6

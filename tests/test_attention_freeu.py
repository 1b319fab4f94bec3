"""Attention slicing, memory-efficient attention and FreeU: one set of switches for every model."""
import functools

import pytest
import torch
from conftest import assert_close
from test_latent_upscale import low_res_latents, one_thread, reference_pipeline  # noqa: F401 (a fixture)
from tiny import kandinsky_decoder, kandinsky_prior

import cascade
from cascade.models import layers
from cascade.models.unet_blocks import freeu

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """name -> (our pipeline, its call with fixed inputs giving a tensor)."""
    root = tmp_path_factory.mktemp("switches")
    reference_pipeline(root).save_pretrained(root / "upscaler")
    folders = {"upscaler": root / "upscaler", "decoder": kandinsky_decoder(root),
               "prior": kandinsky_prior(root)}
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    calls = {
        "upscaler": lambda p: p("a cat", low_res_latents(), num_inference_steps=2, output_type="pt",
                                generator=torch.Generator().manual_seed(0)).images,
        "decoder": lambda p: p(embeds, negative, height=32, width=32, num_inference_steps=2, output_type="pt",
                               generator=torch.Generator().manual_seed(0)).images,
        "prior": lambda p: p("a cat", num_inference_steps=2,
                             generator=torch.Generator().manual_seed(0)).image_embeds,
    }
    classes = {"upscaler": cascade.StableDiffusionLatentUpscalePipeline,
               "decoder": cascade.KandinskyV22Pipeline, "prior": cascade.KandinskyV22PriorPipeline}
    out = {}
    for name, cls in classes.items():
        pipe = cls.from_pretrained(folders[name])
        pipe.set_progress_bar_config(disable=True)
        out[name] = (pipe, functools.partial(calls[name], pipe))
    return out


def explicit_attention(q, k, v, attn_bias=None, op=None):
    """A stand-in for xformers' kernel, in its (batch, tokens, heads, head_dim) layout."""
    explicit_attention.calls += 1
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    weights = (scores if attn_bias is None else scores + attn_bias).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("name", ["upscaler", "decoder", "prior"])
def test_slicing_and_memory_efficient_attention_keep_the_output(pipes, name, monkeypatch):
    pipe, call = pipes[name]
    plain = call()
    for size in ("auto", "max", 1):
        pipe.enable_attention_slicing(size)
        assert_close(call(), plain)
    pipe.disable_attention_slicing()
    assert torch.equal(call(), plain)
    pipe.enable_xformers_memory_efficient_attention()  # no xformers here: PyTorch's SDPA
    assert_close(call(), plain)
    explicit_attention.calls = 0
    monkeypatch.setattr(layers, "xformers_kernel", lambda: explicit_attention)
    assert_close(call(), plain)
    assert explicit_attention.calls > 0
    pipe.disable_xformers_memory_efficient_attention()
    calls = explicit_attention.calls
    assert torch.equal(call(), plain) and explicit_attention.calls == calls


def test_slicing_covers_every_attention_layer_and_checks_sizes(pipes):
    pipe = pipes["decoder"][0]
    for model in (pipe.unet, pipe.movq):
        model.set_attention_slice("max")
        assert {layer.attend_options["slice_size"] for layer in model.attention_layers()} == {1}
        with pytest.raises(ValueError, match="slice_size"):
            model.set_attention_slice(10_000)
        model.set_attention_slice(None)


# ------------------------------------------------------------------------------------------------ FreeU


def paper_freeu(x, skip, s, b):
    """FreeU (Si et al. 2023) written out: x_l[:, :C/2] *= b; skip = IFFT(FFT(skip) . beta), beta = s on the
    lowest frequencies (threshold 1 around the centre of the shifted spectrum), 1 elsewhere."""
    x = x.clone()
    x[:, : x.shape[1] // 2] *= b
    spectrum = torch.fft.fftshift(torch.fft.fftn(skip, dim=(-2, -1)), dim=(-2, -1))
    beta = torch.ones_like(spectrum.real)
    h, w = skip.shape[-2] // 2, skip.shape[-1] // 2
    beta[..., h - 1:h + 1, w - 1:w + 1] = s
    return x, torch.fft.ifftn(torch.fft.ifftshift(spectrum * beta, dim=(-2, -1)), dim=(-2, -1)).real


def test_freeu_matches_the_paper_on_one_up_block(pipes):
    unet = pipes["upscaler"][0].unet
    block = unet.up_blocks[1]  # concatenates one skip before its first resnet
    g = torch.Generator().manual_seed(0)
    x, skip = torch.randn(2, 64, 4, 4, generator=g), torch.randn(2, 64, 4, 4, generator=g)
    temb, context = torch.randn(2, 64, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        block.freeu = (0.6, 1.3)
        ours = block(x, (None, None, None, skip), temb, context)
        block.freeu = None
        x_hand, skip_hand = paper_freeu(x, skip, 0.6, 1.3)
        by_hand = block(x_hand, (None, None, None, skip_hand), temb, context)
    assert_close(ours, by_hand, 1e-5)
    assert_close(torch.cat(freeu(x, skip, 0.6, 1.3)), torch.cat(paper_freeu(x, skip, 0.6, 1.3)), 1e-6)


@pytest.mark.parametrize("name, stages", [("upscaler", [1, 2]), ("decoder", [0, 1])])
def test_freeu_acts_when_on_and_restores_exactly(pipes, name, stages):
    pipe, call = pipes[name]
    plain = call()
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert [i for i, b in enumerate(pipe.unet.up_blocks) if b.freeu is not None] == stages
    assert (call() - plain).abs().max() > 1e-3
    pipe.disable_freeu()
    assert torch.equal(call(), plain)


def test_freeu_needs_a_unet(pipes):
    with pytest.raises(ValueError, match="FreeU"):
        pipes["prior"][0].enable_freeu(0.9, 0.2, 1.2, 1.4)

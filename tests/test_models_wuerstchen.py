"""Würstchen stage C / B / A models against the reference (diffusers' deprecated Würstchen modules)."""
import pytest
import torch

from cascade import presets
from cascade.models import wuerstchen as ours

ref = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")
ref_common = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common")

TINY_PRIOR = dict(c_in=4, c=32, c_cond=24, c_r=8, depth=2, nhead=4, dropout=0.1)
TINY_DECODER = dict(c_in=4, c_out=4, c_r=8, patch_size=2, c_cond=16, c_hidden=[16, 32, 32], nhead=[-1, 4, 4],
                    blocks=[1, 2, 1], level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True],
                    effnet_embd=6, clip_embd=12, kernel_size=3, dropout=0.1)
TINY_VQGAN = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=2,
                  embed_dim=16, latent_channels=4, num_vq_embeddings=32, scale_factor=0.3764)

CASES = {  # name: (ours, reference, tiny config, real config)
    "prior": (ours.WuerstchenPrior, "WuerstchenPrior", TINY_PRIOR, presets.WUERSTCHEN_PRIOR),
    "decoder": (ours.WuerstchenDiffNeXt, "WuerstchenDiffNeXt", TINY_DECODER, presets.WUERSTCHEN_DECODER),
    "vqgan": (ours.PaellaVQModel, "PaellaVQModel", TINY_VQGAN, presets.WUERSTCHEN_VQGAN),
}
EXPECTED_PARAMS = {"prior": 0.99e9, "decoder": 1.06e9, "vqgan": 18.4e6}


def perturb(model, seed=0):
    """Replace constant parameters and buffers (zero-init outputs, GRN, BatchNorm stats) with seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.numel() and (t.numel() == 1 or t.std() == 0):
                noise = torch.randn(t.shape, generator=g) * 0.3
                t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)
    return model


def condition(prior):
    """Keep b small: the output divides by |1 - b|, which near b = 1 amplifies float rounding past 1e-5."""
    with torch.no_grad():
        prior.out[1].weight.mul_(0.1)
        prior.out[1].bias.mul_(0.1)
    return prior


def pair(name, seed=0):
    cls, ref_name, tiny, _ = CASES[name]
    torch.manual_seed(seed)
    reference = perturb(getattr(ref, ref_name)(**tiny), seed).eval()
    if name == "prior":
        condition(reference)
    model = cls(**tiny)
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval(), reference


def inputs(name, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    if name == "prior":
        return dict(x=torch.randn(batch, 4, 6, 6, generator=g), r=torch.rand(batch, generator=g),
                    c=torch.randn(batch, 5, 24, generator=g))
    if name == "decoder":
        return dict(x=torch.randn(batch, 4, 16, 16, generator=g), r=torch.rand(batch, generator=g),
                    effnet=torch.randn(batch, 6, 5, 5, generator=g),
                    clip=torch.randn(batch, 7, 12, generator=g))
    return dict(sample=torch.randn(batch, 3, 16, 16, generator=g))


@pytest.mark.parametrize("name", CASES)
def test_real_config_matches_reference_on_meta(name, monkeypatch):
    cls, ref_name, _, real = CASES[name]
    # The reference's decoder init revisits every block once per module (20 s); shapes do not depend on it.
    monkeypatch.setattr(ref.WuerstchenDiffNeXt, "_init_weights", lambda self, m: None)
    with torch.device("meta"):
        model, reference = cls(**real), getattr(ref, ref_name)(**real)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    count = model.num_parameters()
    assert count == sum(p.numel() for p in reference.parameters())
    assert abs(count / EXPECTED_PARAMS[name] - 1) < 0.01
    assert model.config.to_dict() == {k: v for k, v in reference.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", CASES)
def test_forward_parity(name):
    model, reference = pair(name)
    with torch.no_grad():
        out, expected = model(**inputs(name)), reference(**inputs(name))
    out, expected = (out.sample, expected.sample) if name == "vqgan" else (out, expected)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert expected.abs().mean() > 0.1


def test_prior_odd_r_embedding():
    config = {**TINY_PRIOR, "c_r": 9}
    torch.manual_seed(0)
    reference = condition(perturb(ref.WuerstchenPrior(**config))).eval()
    model = ours.WuerstchenPrior(**config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs("prior")), reference(**inputs("prior")), atol=1e-5, rtol=0)


def test_decoder_uses_effnet_and_clip():
    model, reference = pair("decoder")
    base = inputs("decoder")
    with torch.no_grad():
        out = model(**base)
        for key in ("effnet", "clip"):
            changed = {**base, key: base[key] + 1.0}
            moved = model(**changed)
            torch.testing.assert_close(moved, reference(**changed), atol=1e-5, rtol=0)
            assert (moved - out).abs().max() > 1e-2, key
        a, b = model(**base, return_noise=False)
        a_ref, b_ref = reference(**base, return_noise=False)
        torch.testing.assert_close((a, b), (a_ref, b_ref), atol=1e-5, rtol=0)


def test_decoder_list_dropout_and_x_cat():
    config = {**TINY_DECODER, "c_in": 6, "dropout": [0.0, 0.1, 0.2]}
    torch.manual_seed(0)
    reference = perturb(ref.WuerstchenDiffNeXt(**config)).eval()
    model = ours.WuerstchenDiffNeXt(**config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = inputs("decoder")
    x_cat = torch.randn(2, 2, 16, 16)
    with torch.no_grad():  # with x_cat only (a, b) has the right channels, in the reference as here
        torch.testing.assert_close(model(**x, x_cat=x_cat, return_noise=False),
                                   reference(**x, x_cat=x_cat, return_noise=False), atol=1e-5, rtol=0)


def test_vqgan_encode_decode_quantize():
    model, reference = pair("vqgan")
    x = inputs("vqgan")["sample"]
    with torch.no_grad():
        latents = model.encode(x).latents
        torch.testing.assert_close(latents, reference.encode(x).latents, atol=1e-5, rtol=0)
        for quantize in (False, True):
            out = model.decode(latents, force_not_quantize=not quantize).sample
            expected = reference.decode(latents, force_not_quantize=not quantize).sample
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        (sample,) = model.decode(latents, return_dict=False)
        torch.testing.assert_close(sample, model.decode(latents).sample)
        quant, _ = model.vquantizer(latents)
        distance = torch.cdist(quant.permute(0, 2, 3, 1).reshape(-1, 4), model.vquantizer.embedding.weight)
        assert distance.min(dim=1).values.max() < 1e-6  # every vector is a codebook entry


@pytest.mark.parametrize("name", CASES)
def test_save_load_both_ways(name, tmp_path):
    cls, ref_name, _, _ = CASES[name]
    model, reference = pair(name)
    with torch.no_grad():
        expected = reference(**inputs(name))
    expected = expected.sample if name == "vqgan" else expected
    model.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "ref")
    reloaded_ref = getattr(ref, ref_name).from_pretrained(tmp_path / "ours").eval()
    loaded_ours = cls.from_pretrained(tmp_path / "ref"), cls.from_pretrained(tmp_path / "ours")
    for loaded in (*loaded_ours, reloaded_ref):
        with torch.no_grad():
            out = loaded(**inputs(name))
        out = out.sample if name == "vqgan" else out
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_global_response_norm_survives_float16():
    """The reference's GRN norm overflows float16 over a 128x128 map; ours takes it in float32."""
    torch.manual_seed(0)
    x = (torch.rand(1, 128, 128, 8) * 1000).half()
    grn, ref_grn = ours.GlobalResponseNorm(8), ref_common.GlobalResponseNorm(8)
    perturb(ref_grn)
    grn.load_state_dict(ref_grn.state_dict())
    assert not torch.isfinite(ref_grn.half()(x)).all()
    out = grn.half()(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref_grn.float()(x.float()), atol=1.0, rtol=2e-3)


@pytest.mark.parametrize("name", ["prior", "decoder"])
def test_half_precision_tracks_float32(name):
    """With r in float32 (its embedding is always computed in float32) float16 stays close to float32."""
    model, _ = pair(name)
    x = inputs(name)
    with torch.no_grad():
        expected = model(**x)
        out = model.half()(**{k: v if k == "r" else v.half() for k, v in x.items()})
    assert out.dtype == torch.float16
    assert (out.float() - expected).abs().max() < 0.01 * expected.abs().max()


def test_config_rejects_unknown_block_type():
    with pytest.raises(ValueError, match="level_config"):
        ours.WuerstchenDiffNeXt(**{**TINY_DECODER, "level_config": ["CT", "CTX", "CTA"]})


def test_load_in_float16(tmp_path):
    model, _ = pair("vqgan")
    model.save_pretrained(tmp_path)
    loaded = ours.PaellaVQModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16 and not loaded.training
    assert loaded.config.scale_factor == 0.3764

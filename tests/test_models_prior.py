"""PriorTransformer against the reference: tiny configs of every option, strict loading, the real presets."""
import diffusers
import pytest
import torch

from cascade import presets
from cascade.models.prior_transformer import PriorTransformer
from tiny import perturb

TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=24, num_embeddings=7,
            additional_embeddings=4)
CONFIGS = {
    "kandinsky22": {**presets.KANDINSKY22_PRIOR, **TINY},
    "karlo": {**presets.KARLO_PRIOR, **TINY, "dropout": 0.1},
    # The remaining options, as the Shap-E priors use them: every norm and projection width, a sequence of
    # latent tokens in, no text tokens, no query token, positions only for the latent tokens.
    "options": {**TINY, "norm_in_type": "layer", "embedding_proj_norm_type": "layer",
                "embedding_proj_dim": 20, "clip_embed_dim": 12, "time_embed_dim": 40,
                "time_embed_act_fn": "gelu", "added_emb_type": None, "encoder_hid_proj_type": None,
                "num_embeddings": 5, "additional_embeddings": 0},
}


def pair(name, seed=0):
    torch.manual_seed(seed)
    ref = perturb(diffusers.PriorTransformer(**CONFIGS[name]), seed)
    ours = PriorTransformer(**CONFIGS[name])
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref.eval()


def inputs(name, batch=2, seed=1):
    c = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    proj_dim = c.get("embedding_proj_dim") or c["embedding_dim"]
    tokens = () if c.get("added_emb_type", "prd") else (c["num_embeddings"],)
    x = dict(hidden_states=torch.randn(batch, *tokens, c["embedding_dim"], generator=g),
             proj_embedding=torch.randn(batch, proj_dim, generator=g))
    if c.get("encoder_hid_proj_type", "linear"):
        x["encoder_hidden_states"] = torch.randn(batch, c["num_embeddings"], c["embedding_dim"], generator=g)
        mask = torch.ones(batch, c["num_embeddings"], dtype=torch.bool)
        mask[0, 4:] = False  # a padded prompt
        x["attention_mask"] = mask
    return x


def close(ours, ref, atol=1e-5):
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("timestep", [0, 999, torch.tensor(37), torch.tensor([5, 600])])
def test_forward_matches_reference(name, timestep):
    ours, ref = pair(name)
    x = inputs(name)
    with torch.no_grad():
        a = ref(timestep=timestep, **x).predicted_image_embedding
        b = ours(timestep=timestep, **x).predicted_image_embedding
        close(b, a)
        close(ours(timestep=timestep, return_dict=False, **x)[0], a)
        if "attention_mask" in x:  # without a mask the reference applies no causal mask either
            x.pop("attention_mask")
            close(ours(timestep=timestep, **x)[0], ref(timestep=timestep, **x)[0])


def test_mask_changes_the_output():
    ours, _ = pair("kandinsky22")
    x = inputs("kandinsky22")
    with torch.no_grad():
        masked = ours(timestep=10, **x)[0]
        x["attention_mask"] = torch.ones_like(x["attention_mask"])
        assert not torch.allclose(masked[0], ours(timestep=10, **x)[0][0], atol=1e-4)


def test_missing_encoder_hidden_states_is_an_error():
    ours, _ = pair("kandinsky22")
    x = inputs("kandinsky22")
    x.pop("encoder_hidden_states")
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(timestep=1, **x)


def test_post_process_latents():
    ours, ref = pair("karlo")
    latents = torch.randn(3, CONFIGS["karlo"]["embedding_dim"])
    with torch.no_grad():
        close(ours.post_process_latents(latents), ref.post_process_latents(latents), atol=0)


@pytest.mark.parametrize("name", ["kandinsky22", "options"])
def test_save_and_load_both_ways(name, tmp_path):
    ours, ref = pair(name)
    x = inputs(name)
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    loaded = PriorTransformer.from_pretrained(tmp_path / "ref")
    back = diffusers.PriorTransformer.from_pretrained(tmp_path / "ours")
    assert loaded.config == ours.config
    with torch.no_grad():
        expected = ref(timestep=3, **x)[0]
        close(loaded(timestep=3, **x)[0], expected, atol=0)
        close(back(timestep=3, **x)[0], expected, atol=0)


@pytest.mark.parametrize("preset,params", [("KANDINSKY22_PRIOR", 1_026.2e6), ("KARLO_PRIOR", 1_022.0e6)])
def test_real_config_on_meta_device(preset, params):
    config = getattr(presets, preset)
    with torch.device("meta"):
        ours = PriorTransformer(**config)
        ref = diffusers.PriorTransformer(**config)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert abs(ours.num_parameters() - params) < 0.05e6

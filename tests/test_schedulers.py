"""Schedulers: whole trajectories step by step against the reference, properties, config round trips."""
import inspect
import json

import diffusers
import pytest
import torch

import cascade.schedulers as ours
from cascade import presets

K22_DECODER = presets.KANDINSKY22_DECODER_SCHEDULER
K22_PRIOR = presets.KANDINSKY22_PRIOR_SCHEDULER
UPSCALER = presets.LATENT_UPSCALER_SCHEDULER

DDPM_CONFIGS = [
    K22_DECODER,
    {},
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="scaled_linear", prediction_type="sample", thresholding=True, sample_max_value=2.0),
    dict(timestep_spacing="linspace", variance_type="fixed_small_log", clip_sample_range=2.0),
    dict(variance_type="fixed_large", rescale_betas_zero_snr=True, timestep_spacing="trailing",
         clip_sample=False, prediction_type="v_prediction"),
    dict(variance_type="learned_range", num_train_timesteps=100),
    dict(variance_type="learned", trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
]
DDIM_CONFIGS = [
    K22_DECODER,
    dict(set_alpha_to_one=False, clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085,
         beta_end=0.012, steps_offset=1),
    dict(prediction_type="sample", thresholding=True, timestep_spacing="trailing"),
    dict(prediction_type="v_prediction", timestep_spacing="linspace", rescale_betas_zero_snr=True),
]
UNCLIP_CONFIGS = [
    K22_PRIOR,
    presets.KARLO_PRIOR_SCHEDULER,
    presets.KARLO_DECODER_SCHEDULER,
    presets.KARLO_SUPER_RES_SCHEDULER,
]
EULER_CONFIGS = [
    UPSCALER,
    {},
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True),
    dict(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True),
]


def pair(name, config):
    """(reference, ours) by from_config, which drops other schedulers' keys (a DDPM config -> DDIM)."""
    return getattr(diffusers, name).from_config(config), getattr(ours, name).from_config(config)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(b, a, atol=atol, rtol=1e-5 if atol else 0)


def drive(ref, mine, timesteps, shape=(2, 4, 8, 8), out_channels=None, step_kwargs=None, seed=0, dtype=None,
          atol=1e-6):
    """Run both schedulers over `timesteps` from the same start with the same seeds; compare every step."""
    step_kwargs = step_kwargs or (lambda i, t: {})
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * float(getattr(ref, "init_noise_sigma", 1.0))).to(dtype)
    x_ref, x_ours = x.clone(), x.clone()
    g_ref, g_ours = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    out_shape = (shape[0], out_channels or shape[1], *shape[2:])
    for i, t in enumerate(timesteps):
        close(ref.scale_model_input(x_ref, t), mine.scale_model_input(x_ours, t), atol)
        eps = torch.randn(out_shape, generator=g).to(dtype)
        eps[:, shape[1]:] = eps[:, shape[1]:].abs()  # learned variances are positive
        takes_generator = "generator" in inspect.signature(ref.step).parameters
        a = ref.step(eps, t, x_ref, **({"generator": g_ref} if takes_generator else {}), **step_kwargs(i, t))
        b = mine.step(eps, t, x_ours, **({"generator": g_ours} if takes_generator else {}), **step_kwargs(i, t))
        close(a.prev_sample, b.prev_sample, atol)
        if getattr(a, "pred_original_sample", None) is not None:
            close(a.pred_original_sample, b.pred_original_sample, atol)
        x_ref, x_ours = a.prev_sample, b.prev_sample
    return x_ref, x_ours


@pytest.mark.parametrize("config", DDPM_CONFIGS)
@pytest.mark.parametrize("steps", [10, 25])
def test_ddpm_trajectory(config, steps):
    ref, mine = pair("DDPMScheduler", config)
    ref.set_timesteps(steps)
    mine.set_timesteps(steps)
    assert torch.equal(ref.timesteps, mine.timesteps)
    learned = config.get("variance_type", "").startswith("learned")
    drive(ref, mine, ref.timesteps, out_channels=8 if learned else None)


def test_ddpm_full_chain_and_custom_timesteps():
    ref, mine = pair("DDPMScheduler", dict(num_train_timesteps=50))
    drive(ref, mine, ref.timesteps)  # no set_timesteps: every training step
    custom = [999, 800, 500, 123, 7, 0]
    ref, mine = pair("DDPMScheduler", K22_DECODER)
    ref.set_timesteps(timesteps=custom)
    mine.set_timesteps(timesteps=custom)
    assert torch.equal(ref.timesteps, mine.timesteps)
    drive(ref, mine, ref.timesteps)
    with pytest.raises(ValueError):
        mine.set_timesteps(timesteps=[5, 10])


@pytest.mark.parametrize("config", DDIM_CONFIGS)
@pytest.mark.parametrize("eta,clipped", [(0.0, False), (1.0, False), (0.5, True)])
def test_ddim_trajectory(config, eta, clipped):
    ref, mine = pair("DDIMScheduler", config)
    ref.set_timesteps(20)
    mine.set_timesteps(20)
    assert torch.equal(ref.timesteps, mine.timesteps)
    drive(ref, mine, ref.timesteps, step_kwargs=lambda i, t: dict(eta=eta, use_clipped_model_output=clipped))


@pytest.mark.parametrize("config", UNCLIP_CONFIGS)
@pytest.mark.parametrize("pass_prev", [True, False])
def test_unclip_trajectory(config, pass_prev):
    ref, mine = pair("UnCLIPScheduler", config)
    ref.set_timesteps(25)
    mine.set_timesteps(25)
    assert torch.equal(ref.timesteps, mine.timesteps)
    ts = ref.timesteps

    def prev(i, t):  # as the unCLIP and Kandinsky prior pipelines call it
        return {"prev_timestep": ts[i + 1] if pass_prev and i + 1 < len(ts) else None}

    learned = config["variance_type"] == "learned_range"
    drive(ref, mine, ts, shape=(2, 32) if not learned else (2, 3, 8, 8), out_channels=6 if learned else None,
          step_kwargs=prev)


@pytest.mark.parametrize("config", [{}, dict(scaler=2.0), dict(scaler=0.5, s=0.01)])
def test_wuerstchen_trajectory(config):
    ref, mine = pair("DDPMWuerstchenScheduler", config)
    for kwargs in (dict(num_inference_steps=12), dict(timesteps=[1.0, 0.6667, 0.3333, 0.0])):
        ref.set_timesteps(**kwargs)
        mine.set_timesteps(**kwargs)
        assert torch.equal(ref.timesteps, mine.timesteps)
        # Würstchen steps every timestep but the final 0, each expanded to the batch.
        drive(ref, mine, [t.expand(2) for t in ref.timesteps[:-1]], shape=(2, 16, 6, 6))
    x, eps, t = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6), torch.tensor([0.3, 0.9])
    close(ref.add_noise(x, eps, t), mine.add_noise(x, eps, t))


@pytest.mark.parametrize("config", EULER_CONFIGS)
@pytest.mark.parametrize("churn", [0.0, 2.0])
def test_euler_trajectory(config, churn):
    ref, mine = pair("EulerDiscreteScheduler", config)
    ref.set_timesteps(20)
    mine.set_timesteps(20)
    assert torch.equal(ref.timesteps, mine.timesteps)
    close(ref.sigmas, mine.sigmas, atol=0)
    close(torch.as_tensor(ref.init_noise_sigma), torch.as_tensor(mine.init_noise_sigma), atol=0)
    drive(ref, mine, ref.timesteps, step_kwargs=lambda i, t: dict(s_churn=churn))


DECODER_V = {**K22_DECODER, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}  # the demo's
SAMPLER_CONFIGS = [
    ("DPMSolverMultistepScheduler", K22_DECODER), ("DPMSolverMultistepScheduler", DECODER_V),
    ("DPMSolverMultistepScheduler", {**K22_DECODER, "use_karras_sigmas": True}),
    # (Karras sigmas on the cosine schedule repeat timesteps, which the reference's cursor then skips.)
    ("DPMSolverMultistepScheduler", {**K22_DECODER, "algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                     "prediction_type": "sample", "thresholding": True}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++",
                                     "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("DPMSolverMultistepScheduler", {**K22_PRIOR, "beta_schedule": "squaredcos_cap_v2"}),
    ("UniPCMultistepScheduler", K22_DECODER), ("UniPCMultistepScheduler", DECODER_V),
    ("UniPCMultistepScheduler", {**UPSCALER, "use_karras_sigmas": True}),
    ("UniPCMultistepScheduler", {**DECODER_V, "solver_type": "bh1", "predict_x0": False, "solver_order": 3,
                                 "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "disable_corrector": [0, 2], "prediction_type": "sample",
                                 "timestep_spacing": "trailing"}),
    ("EulerAncestralDiscreteScheduler", K22_DECODER), ("EulerAncestralDiscreteScheduler", DECODER_V),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("HeunDiscreteScheduler", K22_DECODER), ("HeunDiscreteScheduler", DECODER_V),
    ("HeunDiscreteScheduler", {**UPSCALER, "use_karras_sigmas": True}),
    ("HeunDiscreteScheduler", {"clip_sample": True, "timestep_spacing": "leading", "steps_offset": 1}),
    ("EulerDiscreteScheduler", DECODER_V),
]


@pytest.mark.parametrize("name,config", SAMPLER_CONFIGS)
@pytest.mark.parametrize("steps", [4, 10, 20])
def test_sampler_trajectory(name, config, steps):
    """Every sampler, step by step, against the reference class on the same config, outputs and noise."""
    ref, mine = pair(name, config)
    ref.set_timesteps(steps)
    mine.set_timesteps(steps)
    torch.testing.assert_close(mine.timesteps.to(ref.timesteps.dtype), ref.timesteps, atol=0, rtol=0)
    close(ref.sigmas, mine.sigmas)
    close(torch.as_tensor(ref.init_noise_sigma), torch.as_tensor(mine.init_noise_sigma))
    drive(ref, mine, ref.timesteps, atol=1e-5)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"])
def test_sampler_add_noise_mid_schedule(name):
    ref, mine = pair(name, K22_DECODER)
    for s in (ref, mine):
        s.set_timesteps(10)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = ref.timesteps[4:5].repeat(2)
    close(ref.add_noise(x, eps, t), mine.add_noise(x, eps, t))


@pytest.mark.parametrize("name,config,kwargs", [
    ("DDPMScheduler", K22_DECODER, {}), ("DDPMScheduler", {"thresholding": True}, {}),
    ("DDIMScheduler", K22_DECODER, {"eta": 1.0}), ("UnCLIPScheduler", K22_PRIOR, {}),
    ("EulerDiscreteScheduler", UPSCALER, {"s_churn": 1.0})])
def test_half_precision_trajectories_are_bit_identical(name, config, kwargs):
    ref, mine = pair(name, config)
    ref.set_timesteps(10)
    mine.set_timesteps(10)
    drive(ref, mine, ref.timesteps, dtype=torch.float16, atol=0, step_kwargs=lambda i, t: kwargs)


def test_euler_add_noise_mid_schedule():
    ref, mine = pair("EulerDiscreteScheduler", UPSCALER)
    for s in (ref, mine):
        s.set_timesteps(10)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = ref.timesteps[3:4].repeat(2)
    close(ref.add_noise(x, eps, t), mine.add_noise(x, eps, t))
    for s in (ref, mine):
        s.set_begin_index(3)
    close(ref.add_noise(x, eps, t), mine.add_noise(x, eps, t))
    drive(ref, mine, ref.timesteps[3:])


@pytest.mark.parametrize("name,config", [("DDPMScheduler", K22_DECODER), ("DDIMScheduler", {}),
                                         ("UnCLIPScheduler", K22_PRIOR)])
def test_add_noise_and_generator_lists(name, config):
    ref, mine = pair(name, config)
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    close(ref.add_noise(x, eps, t), mine.add_noise(x, eps, t))
    close(ref.add_noise(x, eps, t[1]), mine.add_noise(x, eps, t[1]))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    ref.set_timesteps(10)
    mine.set_timesteps(10)
    kw = {"eta": 1.0} if name == "DDIMScheduler" else {}
    t = ref.timesteps[2]
    expected = ref.step(eps, t, x, generator=gens(), **kw).prev_sample
    close(expected, mine.step(eps, t, x, generator=gens(), **kw)[0])


# --- properties


@pytest.mark.parametrize("name,config", [("DDPMScheduler", c) for c in DDPM_CONFIGS]
                         + [("UnCLIPScheduler", K22_PRIOR), ("EulerDiscreteScheduler", UPSCALER)])
def test_alphas_cumprod_decrease_inside_unit_interval(name, config):
    a = getattr(ours, name)(**config).alphas_cumprod
    assert (a[1:] < a[:-1]).all()
    assert a[0] < 1 and (a[:-1] > 0).all()  # zero terminal SNR ends at 0 exactly by design
    assert a[-1] > 0 or config.get("rescale_betas_zero_snr")


@pytest.mark.parametrize("name,config", [("DDPMScheduler", c) for c in DDPM_CONFIGS]
                         + [("DDIMScheduler", c) for c in DDIM_CONFIGS]
                         + [("UnCLIPScheduler", c) for c in UNCLIP_CONFIGS]
                         + [("EulerDiscreteScheduler", c) for c in EULER_CONFIGS])
@pytest.mark.parametrize("steps", [1, 7, 50, 999])
def test_timesteps_strictly_decreasing_in_range(name, config, steps):
    s = getattr(ours, name).from_config(config)
    if name == "UnCLIPScheduler" and steps == 1:
        return  # the reference divides by steps - 1
    steps = min(steps, s.config.num_train_timesteps)
    s.set_timesteps(steps)
    t = s.timesteps
    assert len(t) == steps and (t[1:] < t[:-1]).all()
    assert t.min() >= 0 and t.max() < s.config.num_train_timesteps


def test_ddim_with_oracle_eps_ends_at_x0():
    s = ours.DDIMScheduler.from_config(K22_DECODER, clip_sample=False)
    s.set_timesteps(10)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    x = s.add_noise(x0, eps, s.timesteps[:1])
    for t in s.timesteps:
        x = s.step(eps, t, x).prev_sample
    close(x0, x, atol=1e-5)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="beta_schedule"):
        ours.DDPMScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="variance_type"):
        ours.UnCLIPScheduler(variance_type="fixed_small")
    with pytest.raises(ValueError, match="prediction_type"):
        ours.DDIMScheduler(prediction_type="flow")


# --- configs: save and load both ways


ALL = [("DDPMScheduler", K22_DECODER), ("DDIMScheduler", {"set_alpha_to_one": False}),
       ("UnCLIPScheduler", K22_PRIOR), ("DDPMWuerstchenScheduler", {"scaler": 2.0}),
       ("EulerDiscreteScheduler", UPSCALER), ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
       ("UniPCMultistepScheduler", {"solver_order": 3}), ("EulerAncestralDiscreteScheduler", {}),
       ("HeunDiscreteScheduler", {})]


@pytest.mark.parametrize("name,config", ALL)
def test_config_roundtrip_both_ways(name, config, tmp_path):
    ref, mine = pair(name, config)
    ref.save_pretrained(tmp_path / "ref")
    mine.save_pretrained(tmp_path / "ours" / "scheduler")
    written = json.loads((tmp_path / "ours" / "scheduler" / "scheduler_config.json").read_text())
    reference = json.loads((tmp_path / "ref" / "scheduler_config.json").read_text())
    assert written["_class_name"] == name
    assert set(written) == set(reference)
    loaded = getattr(ours, name).from_pretrained(tmp_path / "ref")
    assert loaded.config == mine.config
    back = getattr(diffusers, name).from_pretrained(tmp_path / "ours", subfolder="scheduler")
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
           {k: v for k, v in reference.items() if not k.startswith("_")}


def test_from_config_of_another_scheduler():
    ddpm = ours.DDPMScheduler(**K22_DECODER)
    ddim = ours.DDIMScheduler.from_config(ddpm.config, set_alpha_to_one=False)
    ref_ddpm = diffusers.DDPMScheduler(**K22_DECODER)
    ref = diffusers.DDIMScheduler.from_config(ref_ddpm.config, set_alpha_to_one=False)
    # The reference also carries the DDPM-only `variance_type` along (and writes it to disk); we drop it.
    assert ddim.config.to_dict() == {k: v for k, v in ref.config.items() if k in ddim.config}
    euler = ours.EulerDiscreteScheduler.from_config(dict(ddpm.config.items()))
    assert euler.config.beta_end == 0.012 and euler.config.timestep_spacing == "leading"


def test_hub_config_with_foreign_keys_loads(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EulerDiscreteScheduler", "skip_prk_steps": True, "set_alpha_to_one": False,
         **UPSCALER}))
    loaded = ours.EulerDiscreteScheduler.from_pretrained(tmp_path)
    assert loaded.config.prediction_type == UPSCALER["prediction_type"]

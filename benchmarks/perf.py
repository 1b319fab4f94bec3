"""cascade against the reference, side by side in one run (issue 15): import, load, call and peak memory.

Each measurement runs in its own worker process, the two libraries alternating, the median of `--pairs`
pairs reported (speed drifts 10-20 % between processes on the shared CPU). Every worker appends its
figures to out/perf/results.jsonl (`--out` for another folder), so several short runs add up to one table
(`--report`). Each job's folder is built once, with random weights, by cascade's `save_pretrained` in the
reference's format, and both libraries load it. `--libs` names the runs of a round (a library with +lever for
each lever it turns on, so a lever's share is measured on its own); `--interleave` loads them all in one
process and alternates their calls, for call-time ratios free of the drift between processes.

    python benchmarks/perf.py --job medium [--dtype bfloat16] [--pairs 3]   # Kandinsky 2.2 decoder job
    python benchmarks/perf.py --job decoder --steps 2                       # real-size decoder, 512 px
    python benchmarks/perf.py --job upscaler [--size 256] [--steps 2]       # real-size x2 upscaler, 256 -> 512 px
    python benchmarks/perf.py --job wuerstchen [--size 512] [--steps 2]     # real-size Würstchen v2, 512 px
    python benchmarks/perf.py --tiling 512,768,1024,2048 [--measure]        # MoVQ decode memory, tiled or not
    python benchmarks/perf.py --job decoder --device cuda --dtype float16 --peak-tflops 989
    python benchmarks/perf.py --job decoder --libs cascade,cascade+channels_last,diffusers   # a lever's share
    python benchmarks/perf.py --job decoder --interleave --pairs 3       # call times only, one process, alternating
    python benchmarks/perf.py --report

The medium job is the Kandinsky 2.2 decoder with the real block types at reduced width (UNet 134 M,
MoVQ 17 M parameters, random weights saved once in the reference's format), 256 x 256, guidance 4.
The upscaler job is StableDiffusionLatentUpscalePipeline at real size (UNet 373 M, VAE 84 M parameters):
a fixed random `--size` image upscaled 2x with `--steps` Euler steps at the default guidance 9; 256 -> 512 px
in 2 steps is about 4 TFLOP, 2.5 of them the VAE decode. The wuerstchen job is WuerstchenCombinedPipeline at
real size (stage C 994 M, stage B 1055 M, VQGAN 18 M parameters, 8.3 GB in float32): a `--size` image,
`--steps` steps in each stage at the default guidance (4, then 0); 512 px, 2 + 2 steps, is about 3 TFLOP
(1024 px: 12.5). Stage C's output convolution is scaled by 0.01, near the identity as a trained stage C is at
t = 1: random weights would divide by 1 - b near 0 there and swamp the comparison. Both jobs' CLIP text
encoders have the real width (768; 1280 and 1024) but 2 layers, with a byte-level tokenizer of 77 tokens:
they are transformers code in both libraries, so their size would not tell the two apart. cascade imports
transformers while loading, the reference while importing: compare import_s + load_s. In bfloat16 or float16
Würstchen's outputs differ from the reference's by design: cascade computes the timestep embedding from a
float32 r, the reference from r x 10^4 rounded to the low-precision dtype.
Peak memory: the worker's ru_maxrss (everything: torch runtime, weights, activations), its resident size
after import and after loading; with CUDA, the allocator's peak. TFLOP/s (Kandinsky jobs): the decoder
steps' operations (FlopCounterMode on the meta device: exact, independent of the load) over the call's wall
time, MoVQ decode included, so a lower bound on the steps' own rate.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Each job: its pipeline, its default size and steps, and preset overrides (the medium job's narrower models).
JOBS = {"medium": dict(pipeline="KandinskyV22Pipeline", size=256, steps=10,
                       presets={"KANDINSKY22_UNET": dict(block_out_channels=(128, 256, 320, 384)),
                                "MOVQ": dict(block_out_channels=(64, 128, 128, 256))}),
        "decoder": dict(pipeline="KandinskyV22Pipeline", size=512, steps=2),
        "upscaler": dict(pipeline="StableDiffusionLatentUpscalePipeline", size=256, steps=2),
        "wuerstchen": dict(pipeline="WuerstchenCombinedPipeline", size=512, steps=2)}
# Levers a run can turn on (`--libs cascade+channels_last`): each is measured on its own against the plain run.
# compile: torch.compile on the denoisers, its warm-up call timed apart; cuda_graphs: the same in mode
# "reduce-overhead" (CUDA graphs; the plain compile elsewhere).
LEVERS = {"channels_last", "compile", "cuda_graphs"}
COMPILING = {"compile", "cuda_graphs"}
DENOISERS = {"KandinskyV22Pipeline": ("unet",), "StableDiffusionLatentUpscalePipeline": ("unet",),
             "WuerstchenCombinedPipeline": ("prior_prior", "decoder")}
# --tiny (hidden): every block type at toy width and depth, to check the script itself in seconds.
TINY = {"KANDINSKY22_UNET": dict(block_out_channels=(64, 64, 128, 128), layers_per_block=1),
        "MOVQ": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        "LATENT_UPSCALER_UNET": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                                     cross_attention_dim=32, attention_head_dim=8, time_cond_proj_dim=128 + 32),
        "LATENT_UPSCALER_VAE": dict(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                                    up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, layers_per_block=1),
        "WUERSTCHEN_PRIOR": dict(c=32, c_cond=32, c_r=8, depth=2, nhead=4),
        "WUERSTCHEN_DECODER": dict(c_r=8, c_cond=16, c_hidden=(16, 32, 32), nhead=(-1, 4, 4), blocks=(1, 2, 1),
                                   level_config=("CT", "CTA", "CTA"), inject_effnet=(False, True, True),
                                   clip_embd=24),
        "WUERSTCHEN_VQGAN": dict(bottleneck_blocks=2, embed_dim=16, num_vq_embeddings=32)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_of(a) -> Path:
    return Path(a.out) / f"folder-{a.job}{'-tiny' if a.tiny else ''}"


def preset(name: str, a) -> dict:
    from cascade import presets

    return {**getattr(presets, name), **JOBS[a.job].get("presets", {}).get(name, {}),
            **(TINY.get(name, {}) if a.tiny else {})}


def clip_text(width: int):
    """A 2-layer CLIP text encoder of the given width, with the byte-level CLIP tokenizer the tests use."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel

    from cascade.demo import byte_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = byte_tokenizer(Path(tmp), max_length=77)
    n = len(tok)
    config = CLIPTextConfig(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
                            hidden_size=width, intermediate_size=4 * width, num_attention_heads=max(1, width // 64),
                            num_hidden_layers=2, max_position_embeddings=77)
    return tok, CLIPTextModel(config).eval()


def build_kandinsky(a):
    from cascade import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel, presets

    unet, movq = UNet2DConditionModel(**preset("KANDINSKY22_UNET", a)), VQModel(**preset("MOVQ", a))
    return KandinskyV22Pipeline(unet=unet, movq=movq,
                                scheduler=DDPMScheduler(**presets.KANDINSKY22_DECODER_SCHEDULER))


def build_upscaler(a):
    from cascade import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline,
                         UNet2DConditionModel, presets)

    unet = UNet2DConditionModel(**preset("LATENT_UPSCALER_UNET", a))
    vae = AutoencoderKL(**preset("LATENT_UPSCALER_VAE", a))
    tok, text = clip_text(unet.config.cross_attention_dim)
    return StableDiffusionLatentUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                                scheduler=EulerDiscreteScheduler(**presets.LATENT_UPSCALER_SCHEDULER))


def build_wuerstchen(a):
    import torch

    from cascade import (DDPMWuerstchenScheduler, PaellaVQModel, WuerstchenCombinedPipeline, WuerstchenDiffNeXt,
                         WuerstchenPrior, presets)

    prior = WuerstchenPrior(**preset("WUERSTCHEN_PRIOR", a))
    with torch.no_grad():  # near the identity, as a trained stage C is at t = 1 (see the module docstring)
        prior.out[1].weight.mul_(0.01)
        prior.out[1].bias.mul_(0.01)
    decoder = WuerstchenDiffNeXt(**preset("WUERSTCHEN_DECODER", a))
    vqgan = PaellaVQModel(**preset("WUERSTCHEN_VQGAN", a))
    tok, text = clip_text(decoder.config.clip_embd)
    _, prior_text = clip_text(prior.config.c_cond)
    scheduler = presets.WUERSTCHEN_SCHEDULER
    return WuerstchenCombinedPipeline(
        tokenizer=tok, text_encoder=text, decoder=decoder, scheduler=DDPMWuerstchenScheduler(**scheduler),
        vqgan=vqgan, prior_tokenizer=tok, prior_text_encoder=prior_text, prior_prior=prior,
        prior_scheduler=DDPMWuerstchenScheduler(**scheduler))


def build(folder: Path, a):
    import torch

    torch.manual_seed(0)
    PARTS[JOBS[a.job]["pipeline"]][0](a).save_pretrained(folder)


def inputs_kandinsky(pipe, a, dtype) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    embeds, negative = (torch.randn(1, pipe.unet.config.encoder_hid_dim, generator=g).to(a.device, dtype)
                        for _ in range(2))
    return dict(image_embeds=embeds, negative_image_embeds=negative, height=a.size, width=a.size,
                num_inference_steps=a.steps)


def inputs_upscaler(pipe, a, dtype) -> dict:
    import numpy as np
    import PIL.Image

    pixels = np.random.default_rng(0).integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    return dict(prompt="a photograph of a cat", image=PIL.Image.fromarray(pixels), num_inference_steps=a.steps)


def inputs_wuerstchen(pipe, a, dtype) -> dict:
    return dict(prompt="a photograph of a cat", height=a.size, width=a.size, prior_num_inference_steps=a.steps,
                num_inference_steps=a.steps)


# Per pipeline: how its folder is built, and the call's inputs (besides generator and output_type).
PARTS = {"KandinskyV22Pipeline": (build_kandinsky, inputs_kandinsky),
         "StableDiffusionLatentUpscalePipeline": (build_upscaler, inputs_upscaler),
         "WuerstchenCombinedPipeline": (build_wuerstchen, inputs_wuerstchen)}


def decoder_flops(folder: str, size: int) -> float:
    """Operations of one guided decoder step (a UNet forward on a batch of two), counted on meta tensors with
    cascade's UNet built from the folder's config (both libraries run the same architecture)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cascade import UNet2DConditionModel
    from cascade.config import read_json

    path = Path(folder) / "unet" / "config.json"
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNet2DConditionModel.config_class.from_dict(read_json(path), str(path)))
        c = unet.config
        x = torch.randn(2, c.in_channels, size // 8, size // 8)
        embeds = torch.randn(2, c.encoder_hid_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([500] * 2), None, added_cond_kwargs={"image_embeds": embeds})
    return counter.get_total_flops()


def pipeline_class(lib: str, a):
    module = __import__(lib)
    if lib == "diffusers" and a.job == "wuerstchen":
        # The reference loads Würstchen folders (its own too) only with these models on its top level.
        from diffusers.pipelines.deprecated import wuerstchen

        for name in ("WuerstchenPrior", "WuerstchenDiffNeXt", "PaellaVQModel"):
            setattr(module, name, getattr(wuerstchen, name))
    return getattr(module, JOBS[a.job]["pipeline"])


def open_pipeline(spec: str, folder: str, a):
    """The job's pipeline as `spec` asks: a library, with "+lever" for each lever of LEVERS it turns on."""
    import torch

    lib, *levers = spec.split("+")
    layout = {"memory_format": torch.channels_last} if lib == "cascade" and "channels_last" in levers else {}
    pipe = pipeline_class(lib, a).from_pretrained(folder, torch_dtype=getattr(torch, a.dtype), **layout).to(a.device)
    if lib == "diffusers" and "channels_last" in levers:
        pipe.unet.to(memory_format=torch.channels_last)  # the reference's documented way
    if COMPILING & set(levers):
        for part in DENOISERS[JOBS[a.job]["pipeline"]]:
            getattr(pipe, part).compile(mode="reduce-overhead" if "cuda_graphs" in levers else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def worker(spec: str, folder: str, a) -> dict:
    """One measured run of `spec` in this process: import, load, a call (after a warm-up one with compile)."""
    lib, *levers = spec.split("+")
    t0 = time.perf_counter()
    import torch

    pipeline_class(lib, a)  # the import being timed
    name = JOBS[a.job]["pipeline"]
    t_import, rss_import = time.perf_counter() - t0, rss_mb()
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    pipe = open_pipeline(spec, folder, a)
    t_load, rss_load = time.perf_counter() - t0, rss_mb()
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    inputs = PARTS[name][1](pipe, a, dtype)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    t0, warmup = time.perf_counter(), {}
    if COMPILING & set(levers):  # compiling happens in the first call: not the one timed
        generate(pipe, inputs)
        sync()
        warmup = {"warmup_s": time.perf_counter() - t0}
    sync()
    t0 = time.perf_counter()
    image = generate(pipe, inputs)
    sync()
    t_call = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else peak_mb()
    np_path = Path(a.out) / f"{spec}-{a.job}-{a.dtype}.npy"
    __import__("numpy").save(np_path, image)
    result = dict(lib=spec, job=a.job, dtype=a.dtype, device=a.device, size=a.size, steps=a.steps,
                  import_s=t_import, load_s=t_load, call_s=t_call, peak_mb=peak, rss_import_mb=rss_import,
                  rss_load_mb=rss_load, finite=bool(__import__("numpy").isfinite(image).all()), **warmup)
    if a.peak_tflops:
        flops = decoder_flops(folder, a.size) * a.steps
        result.update(tflops=flops / t_call / 1e12, peak_fraction=flops / t_call / 1e12 / a.peak_tflops)
    return result


def generate(pipe, inputs: dict):
    """The measured call: the job's inputs, seed 0, images as numpy arrays."""
    import torch

    return pipe(**inputs, generator=torch.Generator().manual_seed(0), output_type="np").images


def built_folder(a) -> Path:
    """The job's folder, built first if missing."""
    folder = folder_of(a)
    if not (folder / "model_index.json").is_file():
        build(folder, a)
    return folder


def run_pairs(a):
    out_dir, folder = Path(a.out), built_folder(a)
    for i in range(a.pairs):
        # Odd rounds run in reverse order: whoever runs first after other jobs reads a cold page cache.
        for spec in a.libs if i % 2 == 0 else a.libs[::-1]:
            cmd = [sys.executable, __file__, "--worker", spec, "--job", a.job, "--dtype", a.dtype,
                   "--device", a.device, "--size", str(a.size), "--steps", str(a.steps),
                   "--peak-tflops", str(a.peak_tflops or 0), "--out", a.out] + ["--tiny"] * a.tiny
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["load_avg"] = float(Path("/proc/loadavg").read_text().split()[0])
            with open(out_dir / "results.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result))
    import numpy as np

    first, *others = (np.load(out_dir / f"{spec}-{a.job}-{a.dtype}.npy") for spec in a.libs)
    for spec, other in zip(a.libs[1:], others):
        print(f"max difference, {a.libs[0]} to {spec}: {float(np.abs(first - other).max()):.2e}")


def interleaved(a):
    """Every run of `--libs` loaded in this one process, their calls alternating for `--pairs` rounds: call
    times without the 10-20 % drift between processes (memory and start-up need a process each: run_pairs)."""
    import numpy as np
    import torch

    folder = built_folder(a)
    pipes = {spec: open_pipeline(spec, str(folder), a) for spec in a.libs}
    inputs = {spec: PARTS[JOBS[a.job]["pipeline"]][1](pipe, a, getattr(torch, a.dtype)) for spec, pipe in pipes.items()}
    rounds, images = [], {}
    for i in range(a.pairs + 1):  # round 0 warms up (first-call allocations, compiling) and is not counted
        times = {}
        for spec, pipe in pipes.items():
            t0 = time.perf_counter()
            images[spec] = generate(pipe, inputs[spec])
            times[spec] = time.perf_counter() - t0
        print(json.dumps({"round": i, **times}))
        rounds += [times] if i else []
    first = a.libs[0]
    for spec in a.libs[1:]:
        ratios = [r[spec] / r[first] for r in rounds]
        print(f"{spec} / {first}: call {statistics.median(ratios):.3f} (rounds {', '.join(f'{x:.3f}' for x in ratios)}),"
              f" largest difference {float(np.abs(images[spec] - images[first]).max()):.2e}")


class LiveBytes:
    """Bytes of the tensors ops allocate (views and in-place results excluded), their peak while alive:
    a decode's activation memory, counted on meta tensors in no time and at any size."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not any(r.alias_info for r in func._schema.returns):
                    counter.track(out)
                return out

        self.mode, self.live, self.peak = Mode(), 0, 0

    def track(self, out):
        import weakref

        import torch

        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self.free, n)

    def free(self, n):
        self.live -= n


def tiling_curve(sizes: list[int], measured: bool) -> list[dict]:
    """Peak activation memory of a real-size MoVQ decode at each size, tiled or not: counted on the meta
    device, and with `measured` also a real decode's growth of the resident size, each in its own process."""
    import torch

    from cascade import VQModel, presets
    from cascade.loading import no_init

    with torch.device("meta"), no_init():
        movq = VQModel(**presets.MOVQ).eval()
    rows = []
    for size in sizes:
        row = {"size": size}
        for tiled in (False, True):
            movq.enable_tiling() if tiled else movq.disable_tiling()
            counter = LiveBytes()
            with torch.no_grad(), torch.device("meta"), counter.mode:
                movq.decode(torch.randn(1, 4, size // 8, size // 8), force_not_quantize=True)
            mode = "tiled" if tiled else "untiled"
            row[f"{mode}_mb"] = counter.peak / 2**20
            if measured:
                out = subprocess.run([sys.executable, __file__, "--tiling-worker", f"{size},{int(tiled)}"],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                row.update({f"{mode}_{k}": v for k, v in json.loads(out.stdout.splitlines()[-1]).items()})
        rows.append(row)
        print(json.dumps(row))
    return rows


def tiling_worker(size: int, tiled: bool) -> dict:
    """A real decode of random latents by a real-size MoVQ (random weights): how far the resident size grows
    over what the process held before, and how long it takes."""
    import torch

    from cascade import VQModel, presets

    torch.manual_seed(0)
    movq = VQModel(**presets.MOVQ).eval()
    movq.enable_tiling() if tiled else movq.disable_tiling()
    latents = torch.randn(1, 4, size // 8, size // 8)
    before, earlier, t0 = rss_mb(), peak_mb(), time.perf_counter()
    with torch.no_grad():
        movq.decode(latents, force_not_quantize=True)
    if peak_mb() <= earlier:  # building the model peaked higher: the decode's own peak is hidden
        raise RuntimeError(f"the decode's peak is under the build's ({earlier:.0f} MB)")
    return {"rss_growth_mb": peak_mb() - before, "decode_s": time.perf_counter() - t0}


def report(out_dir: Path):
    """Medians per library (with its levers) and job/dtype from results.jsonl, each over the reference's."""
    rows = [json.loads(line) for line in open(out_dir / "results.jsonl")]
    keys = ("import_s", "load_s", "call_s", "peak_mb")
    for setting in sorted({(r["job"], r["dtype"], r["device"]) for r in rows}):
        runs = [r for r in rows if (r["job"], r["dtype"], r["device"]) == setting]
        specs = sorted({r["lib"] for r in runs}, key=lambda s: (s.startswith("diffusers"), s))
        med = {s: {k: statistics.median(r[k] for r in runs if r["lib"] == s) for k in keys} for s in specs}
        print(f"{' '.join(setting)}: " + ", ".join(f"{s} ({sum(r['lib'] == s for r in runs)} runs)" for s in specs))
        ref = med.get("diffusers", {})
        for k in keys:
            cells = "".join(f"{med[s][k]:10.2f} ({med[s][k] / ref.get(k, float('nan')):.2f})" for s in specs)
            print(f"  {k:10}{cells}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--job", choices=list(JOBS), default="medium")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--libs", default="cascade,diffusers",
                   help=f"the runs of a round, in order: a library, with +lever for each lever of {LEVERS} it uses")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak: prints the fraction")
    p.add_argument("--tiling", help="comma-separated sizes: MoVQ decode memory with and without tiling")
    p.add_argument("--measure", action="store_true", help="--tiling: also decode for real, measuring memory")
    p.add_argument("--tiling-worker", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true")
    p.add_argument("--interleave", action="store_true", help="every run in one process, calls alternating")
    p.add_argument("--out", default="out/perf", help="folder of results.jsonl, the job folders and outputs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.size, a.steps = a.size or JOBS[a.job]["size"], a.steps or JOBS[a.job]["steps"]
    a.libs = a.libs.split(",")
    for spec in a.libs:
        lib, *levers = spec.split("+")
        if lib not in ("cascade", "diffusers") or not set(levers) <= LEVERS:
            p.error(f"--libs: {spec!r} is not cascade or diffusers with +lever for levers of {sorted(LEVERS)}")
    if a.peak_tflops and JOBS[a.job]["pipeline"] != "KandinskyV22Pipeline":
        p.error("--peak-tflops counts Kandinsky decoder steps only")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.worker:
        print(json.dumps(worker(a.worker, str(folder_of(a)), a)))
    elif a.tiling:
        tiling_curve([int(s) for s in a.tiling.split(",")], a.measure)
    elif a.tiling_worker:
        size, tiled = a.tiling_worker.split(",")
        print(json.dumps(tiling_worker(int(size), tiled == "1")))
    elif a.report:
        report(Path(a.out))
    elif a.interleave:
        interleaved(a)
    else:
        run_pairs(a)


if __name__ == "__main__":
    main()

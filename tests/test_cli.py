"""The `cascade` command end to end on tiny saved checkpoints: files, metadata, replay, errors, exit codes."""
import json
import shutil
import subprocess
import sys
from argparse import Namespace

import numpy as np
import PIL.Image
import pytest

import cascade
from cascade import __version__
from cascade.cli import main
from cascade.jobs import write_new
from test_jobs import huge_png

FAST = ["--steps", "1", "--prior-steps", "2", "--seed", "3", "-q"]


def cli(capsys, *argv):
    """Run `cascade ARGV` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path):
    return np.asarray(PIL.Image.open(path))


def picture(path, size=32, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": (3,), "L": ()}[mode]
    PIL.Image.fromarray(rng.integers(0, 256, (size, size, *channels), dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture(scope="module")
def made(kandinsky_root, tmp_path_factory):
    """Two images from `generate -n 2 --json`, shared by the tests that read them."""
    out = tmp_path_factory.mktemp("made")
    argv = ["generate", kandinsky_root / "combined_text2img", "a cat", "--size", "32x32", "-n", "2",
            "--negative", "a dog", "--scheduler", "ddim", "--out", out, "--json", *FAST]
    assert main([str(a) for a in argv]) == 0
    return out


def test_generate_writes_files_and_metadata(made, kandinsky_root):
    assert sorted(p.name for p in made.iterdir()) == ["generate-3.png", "generate-4.png"]
    text = PIL.Image.open(made / "generate-4.png").text
    assert text["task"] == "text2img" and text["cascade"] == __version__
    assert text["model"] == str(kandinsky_root / "combined_text2img")  # as given
    assert text["parameters"].startswith("a cat\nNegative prompt: a dog\nSteps: 1, Sampler: DDIM, CFG scale: 4, ")
    assert (text["prompt"], text["negative"], text["seed"], text["size"]) == ("a cat", "a dog", "4", "32x32")
    # Defaults are recorded as the values used, not left out.
    used = [text[k] for k in ("steps", "prior_steps", "guidance", "prior_guidance")]
    assert used == ["1", "2", "4.0", "4.0"]
    assert (text["scheduler"], text["dtype"], text["device"]) == ("ddim", "float32", "cpu")


def test_generate_json_and_replay_is_pixel_identical(made, capsys):
    code, out, _ = cli(capsys, "generate", "--from", made / "generate-4.png", "--out", made, "-q", "--json")
    assert code == 0
    [record] = json.loads(out)
    assert record["path"] == str(made / "generate-4-1.png")  # a new name: nothing is overwritten
    assert (record["seed"], record["width"], record["height"], record["scheduler"]) == (4, 32, 32, "ddim")
    assert np.array_equal(pixels(made / "generate-4-1.png"), pixels(made / "generate-4.png"))
    assert not np.array_equal(pixels(made / "generate-3.png"), pixels(made / "generate-4.png"))


def test_never_overwrites_unless_asked(tmp_path):
    names = [write_new(tmp_path, "generate-1", b"x%d" % i).name for i in range(3)]
    assert names == ["generate-1.png", "generate-1-1.png", "generate-1-2.png"]
    assert write_new(tmp_path, "generate-1", b"new", overwrite=True).name == "generate-1.png"
    assert [(tmp_path / n).read_bytes() for n in names] == [b"new", b"x1", b"x2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary file left


def test_img2img_and_inpaint_with_a_mask(kandinsky_root, made, tmp_path, capsys, monkeypatch):
    image = made / "generate-3.png"
    mask = picture(tmp_path / "mask.png", mode="L")
    code, out, _ = cli(capsys, "img2img", kandinsky_root / "combined_text2img", "a dog", "--image", image,
                       "--strength", "1", "--size", "32x32", "--out", tmp_path, *FAST)
    assert code == 0 and out.strip() == str(tmp_path / "img2img-3.png")
    text = PIL.Image.open(tmp_path / "img2img-3.png").text
    assert (text["image"], text["strength"], text["size"]) == (str(image), "1.0", "32x32")  # as given
    # A relative path is recorded relative to the output folder, where --from looks for it.
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "inpaint", kandinsky_root / "combined_inpaint", "a dog", "--image", image,
                       "--mask", "mask.png", "--size", "32x32", "--out", "shots", *FAST)
    assert code == 0 and PIL.Image.open(out.strip()).text["mask"] == "../mask.png"
    code, again, _ = cli(capsys, "generate", "--from", out.strip(), "--out", "shots", "-q")
    assert code == 0 and np.array_equal(pixels(again.strip()), pixels(out.strip()))


def test_inpaint_rect_replays_with_its_inputs(kandinsky_root, made, tmp_path, capsys):
    code, out, _ = cli(capsys, "inpaint", kandinsky_root / "combined_inpaint", "a dog", "--image",
                       made / "generate-3.png", "--rect", "4,4,16,8", "--size", "32x32", "--out", tmp_path, *FAST)
    first = out.strip()
    assert code == 0 and PIL.Image.open(first).text["rect"] == "4,4,16,8"
    code, out, _ = cli(capsys, "generate", "--from", first, "--out", tmp_path, "-q")
    assert code == 0 and out.strip().endswith("inpaint-3-1.png")
    assert np.array_equal(pixels(out.strip()), pixels(first))


def test_controlnet_decoder_whose_card_names_its_prior(kandinsky_root, tmp_path, capsys):
    decoder = shutil.copytree(kandinsky_root / "controlnet", tmp_path / "controlnet")
    (decoder / "README.md").write_text(f"---\nprior: {kandinsky_root / 'prior'}\n---\n")
    # The tiny UNet's hint path downsamples 8x, its MoVQ 2x: a 128 px hint for 32 px images.
    hint = picture(tmp_path / "depth.png", size=128)
    code, out, _ = cli(capsys, "controlnet", decoder, "a dog", "--hint", hint, "--size", "32x32",
                       "--out", tmp_path, *FAST)
    assert code == 0 and PIL.Image.open(out.strip()).text["hint"] == str(hint)
    assert PIL.Image.open(out.strip()).size == (32, 32)


def test_interpolate_text_and_image(kandinsky_root, made, tmp_path, capsys):
    item = f"{made / 'generate-3.png'}=0.7"
    code, out, _ = cli(capsys, "interpolate", kandinsky_root / "combined_text2img", "--item", "a cat=0.3",
                       "--item", item, "--size", "32x32", "--out", tmp_path, *FAST)
    assert code == 0
    assert json.loads(PIL.Image.open(out.strip()).text["item"]) == ["a cat=0.3", item]


def test_progress_per_stage_on_stderr_unless_quiet(kandinsky_root, tmp_path, capsys):
    argv = ["generate", kandinsky_root / "combined_text2img", "a cat", "--size", "32x32", "--guidance", "1",
            "--prior-guidance", "1", "--steps", "1", "--prior-steps", "2", "--seed", "0", "--out", tmp_path]
    code, out, err = cli(capsys, *argv)
    assert code == 0 and "prior" in err and "decoder" in err and "wrote" in err
    assert out.strip() == str(tmp_path / "generate-0.png")


def test_info_reads_headers_only(kandinsky_root, capsys):
    code, out, _ = cli(capsys, "info", kandinsky_root / "combined_text2img", "--json")
    assert code == 0
    found = json.loads(out)
    parts = {c["name"]: c for c in found["components"]}
    assert found["pipeline"] == "KandinskyV22CombinedPipeline"
    unet = cascade.UNet2DConditionModel.from_pretrained(kandinsky_root / "combined_text2img" / "unet")
    assert parts["unet"]["parameters"] == sum(p.numel() for p in unet.parameters())
    assert parts["unet"]["dtype"] == "float32" and parts["unet"]["bytes"] >= 4 * parts["unet"]["parameters"]
    assert parts["prior_tokenizer"]["parameters"] is None
    code, out, _ = cli(capsys, "info", kandinsky_root / "combined_text2img")
    assert code == 0 and "UNet2DConditionModel" in out and "on disk" in out


@pytest.mark.parametrize("case,argv,words", [
    ("missing model", ["generate", "{tmp}/nowhere", "a cat"], "no such folder"),
    ("unreadable image", ["img2img", "{k}/combined_text2img", "a", "--image", "{tmp}/junk.png"], "not an im"),
    ("missing image", ["img2img", "{k}/combined_text2img", "a", "--image", "{tmp}/none.png"], "no such"),
    ("mask size", ["inpaint", "{k}/combined_inpaint", "a", "--image", "{tmp}/a.png", "--mask", "{tmp}/m.png"],
     "same size"),
    ("bad size", ["generate", "{k}/combined_text2img", "a", "--size", "30x30", *FAST], "multiples of"),
    ("unsupported option", ["generate", "{k}/combined_text2img", "a", "--super-res-steps", "3"], "no such"),
    ("scheduler", ["generate", "{k}/combined_text2img", "a", "--scheduler", "karras"], "invalid choice"),
    ("wrong scheduler", ["generate", "{k}/combined_text2img", "a", "--scheduler", "wuerstchen"], "runs with"),
    ("zero steps", ["generate", "{k}/combined_text2img", "a", "--steps", "0"], "positive integer"),
    ("not a recipe", ["generate", "--from", "{tmp}/a.png"], "no cascade recipe"),
])
def test_bad_input_is_one_line_and_nonzero(kandinsky_root, tmp_path, capsys, case, argv, words):
    (tmp_path / "junk.png").write_bytes(b"not a png")
    picture(tmp_path / "a.png", 32)
    picture(tmp_path / "m.png", 16, mode="L")
    argv = [a.format(k=kandinsky_root, tmp=tmp_path) for a in argv]
    try:
        code, _, err = cli(capsys, *argv, "--out", tmp_path)
    except SystemExit as exit:  # argparse's errors
        code, err = exit.code, capsys.readouterr().err
    assert code != 0 and words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("generate-*.png"))


def test_help_in_a_subprocess():
    run = subprocess.run([sys.executable, "-m", "cascade", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0
    for command in ("generate", "img2img", "inpaint", "controlnet", "variations", "interpolate", "upscale",
                    "info", "demo"):
        assert command in run.stdout


def test_every_subcommand_documents_its_options(capsys):
    for command, words in [("generate", ["--from", "--negative", "--scheduler", "--json"]),
                           ("inpaint", ["--mask", "--rect"]), ("interpolate", ["--item"]),
                           ("controlnet", ["--hint", "--strength"]), ("info", ["--json"])]:
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit.value.code == 0 and all(w in out for w in words)


# --------------------------------------------------------------------------------------------- other families

def test_karlo_generate_and_variations(request, tmp_path, capsys):
    pytest.importorskip("cascade.pipelines.unclip")
    unclip_root = request.getfixturevalue("unclip_root")  # conftest's tiny Karlo folders
    steps = ["--steps", "2", "--prior-steps", "2", "--super-res-steps", "2", "--seed", "0", "-q",
             "--out", tmp_path]
    code, out, _ = cli(capsys, "generate", unclip_root / "unclip", "a cat", *steps)
    assert code == 0 and PIL.Image.open(out.strip()).text["super_res_steps"] == "2"
    code, again, _ = cli(capsys, "generate", "--from", out.strip(), "-q", "--out", tmp_path)
    assert code == 0 and np.array_equal(pixels(again.strip()), pixels(out.strip()))
    code, _, err = cli(capsys, "generate", unclip_root / "unclip", "a cat", "--size", "64x64", *steps)
    assert code == 1 and "--size" in err
    image = picture(tmp_path / "p.png")
    code, _, err = cli(capsys, "variations", unclip_root / "variation", "--image", image, *steps)
    assert code == 1 and "--prior-steps: UnCLIPImageVariationPipeline has no such setting" in err  # no prior
    no_prior = steps[:2] + steps[4:]
    code, out, _ = cli(capsys, "variations", unclip_root / "variation", "--image", image, *no_prior)
    assert code == 0 and PIL.Image.open(out.strip()).text["task"] == "variation"  # the recipe's task


def test_wuerstchen_generate(wuerstchen_root, tmp_path, capsys):
    root = wuerstchen_root
    code, out, _ = cli(capsys, "generate", root / "combined", "a cat", "--size", "128x128", "--steps", "1",
                       "--prior-steps", "1", "--seed", "0", "-q", "--out", tmp_path)
    assert code == 0 and PIL.Image.open(out.strip()).text["scheduler"] == "wuerstchen"
    code, again, _ = cli(capsys, "generate", "--from", out.strip(), "-q", "--out", tmp_path)
    assert code == 0 and np.array_equal(pixels(again.strip()), pixels(out.strip()))
    for option, words in (("--deepcache", "no UNet2DConditionModel"), ("--scheduler", "runs with wuerstchen")):
        code, _, err = cli(capsys, "generate", "--from", out.strip(), "-q", "--out", tmp_path, option,
                           "2" if option == "--deepcache" else "ddim")
        assert code == 1 and err.startswith(f"cascade: error: {option}: ") and words in err
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_upscale(request, tmp_path, capsys):
    pytest.importorskip("cascade.pipelines.latent_upscale")
    folder = request.getfixturevalue("upscaler_folder")  # conftest's tiny upscaler
    image = picture(tmp_path / "p.png", 16)
    code, out, _ = cli(capsys, "upscale", folder, "a cat", "--image", image,
                       "--steps", "2", "--seed", "0", "-q", "--out", tmp_path)
    assert code == 0 and PIL.Image.open(out.strip()).size == (32, 32)


def test_info_of_a_hub_repo_reads_headers_remotely(kandinsky_root, monkeypatch, capsys):
    """Only config files come down; sizes and weight headers are asked of the Hub (here, stubbed)."""
    from types import SimpleNamespace

    import huggingface_hub

    from cascade.cli import tensors
    from cascade.pipelines import core

    folder = kandinsky_root / "combined_text2img"
    files = [p for p in folder.rglob("*") if p.is_file()]
    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(core, "resolve", lambda repo, sub, patterns, **hub: asked.append(patterns) or folder)
    siblings = [SimpleNamespace(rfilename=p.relative_to(folder).as_posix(), size=p.stat().st_size)
                for p in files]

    def header(repo, name):
        return SimpleNamespace(tensors={i: SimpleNamespace(dtype="F32", shape=shape)
                                        for i, (_, shape) in enumerate(tensors(folder / name))})

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, **kw: SimpleNamespace(
        siblings=siblings))
    monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata", header)
    code, remote, _ = cli(capsys, "info", "owner/tiny-kandinsky", "--json")
    code_local, local, _ = cli(capsys, "info", folder, "--json")
    assert code == code_local == 0 and not any("*.safetensors" in p for p in asked[0])
    strip = lambda found: {k: v for k, v in found.items() if k != "model"}  # noqa: E731
    assert strip(json.loads(remote)) == strip(json.loads(local))


# --------------------------------------------------------------------------------------------- issue 14: no traceback

def broken_folders(kandinsky_root, tmp):
    """Model folders a careless or hostile user may hand over."""
    import torch

    no_class = shutil.copytree(kandinsky_root / "combined_text2img", tmp / "no_class")
    index = json.loads((no_class / "model_index.json").read_text())
    (no_class / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "_class_name"}))
    pickled = shutil.copytree(kandinsky_root / "combined_text2img", tmp / "pickled")
    for f in (pickled / "prior_text_encoder").glob("*.safetensors"):
        f.unlink()
    torch.save({"x": Namespace()}, pickled / "prior_text_encoder" / "pytorch_model.bin")  # refused by weights_only
    lying = shutil.copytree(kandinsky_root / "combined_text2img", tmp / "lying")
    with open(next((lying / "unet").glob("*.safetensors")), "r+b") as f:
        f.write((2**62).to_bytes(8, "little"))


@pytest.mark.parametrize("case,argv,status,words", [
    ("no _class_name", ["generate", "{tmp}/no_class", "a"], 1, "no _class_name"),
    ("a refused .bin", ["generate", "{tmp}/pickled", "a", *FAST, "--size", "32x32"], 1, "refused unrun"),
    ("a header of 2**62 bytes", ["info", "{tmp}/lying"], 1, "header"),
    ("a decompression bomb", ["img2img", "{k}/combined_text2img", "a", "--image", "{tmp}/huge.png"], 1,
     "too many pixels"),
    ("over the pixel limit", ["img2img", "{k}/combined_text2img", "a", "--image", "{tmp}/big.png"], 1,
     "megapixel limit"),
    ("seed 2**70", ["generate", "{k}/combined_text2img", "a", "--seed", str(2**70)], 2, "--seed"),
    ("seed + n", ["generate", "{k}/combined_text2img", "a", "--seed", str(2**64 - 1), "-n", "2"], 1, "--seed"),
    ("guidance inf", ["generate", "{k}/combined_text2img", "a", "--guidance", "inf"], 1, "--guidance: expected"),
    ("strength 2", ["img2img", "{k}/combined_text2img", "a", "--image", "{tmp}/a.png", "--strength", "2"], 1,
     "--strength"),
    ("item nan", ["interpolate", "{k}/combined_text2img", "--item", "a red circle=nan"], 1, "--item"),
    ("out is a file", ["generate", "{k}/combined_text2img", "a", "--out", "{tmp}/a.png"], 1, "not a folder"),
    ("out dangling", ["generate", "{k}/combined_text2img", "a", "--out", "{tmp}/dangling"], 1, "dangling"),
    ("from a plain PNG", ["generate", "--from", "{tmp}/a.png"], 1, "holds no cascade recipe"),
    ("from a missing file", ["generate", "--from", "{tmp}/gone.png"], 1, "no such file"),
    ("unknown sampler", ["demo", "--scheduler", "karras"], 2, "invalid choice"),
    ("demo output not png", ["demo", "--output", "{tmp}/x.jpg"], 1, "--output: expected a .png"),
])
def test_what_users_cause_is_one_line_never_a_traceback(kandinsky_root, tmp_path, capsys, case, argv, status,
                                                        words):
    broken_folders(kandinsky_root, tmp_path)
    picture(tmp_path / "a.png", 32)
    huge_png(tmp_path / "huge.png", 60000, 60000)
    huge_png(tmp_path / "big.png", 9000, 9000)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    out = tmp_path / "out"
    argv = [a.format(k=kandinsky_root, tmp=tmp_path) for a in argv]
    argv += [] if "--out" in argv or argv[0] == "info" else ["--out", out] if argv[0] != "demo" else []
    before = set(tmp_path.rglob("*"))
    try:
        code, _, err = cli(capsys, *argv)
    except SystemExit as exit:  # argparse's errors
        code, err = exit.code, capsys.readouterr().err
    assert code == status and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith("cascade")
    assert set(tmp_path.rglob("*")) == before  # nothing written, nothing left behind
    if case in ("out is a file", "seed + n"):
        assert "loading" not in err  # refused before any model loads


def test_ctrl_c_exits_130_with_one_line(kandinsky_root, tmp_path, capsys, monkeypatch):
    import cascade.jobs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cascade.jobs, "prepare", interrupted)
    code, _, err = cli(capsys, "generate", kandinsky_root / "combined_text2img", "a", "--out", tmp_path)
    assert code == 130 and err == "cascade: interrupted\n" and not list(tmp_path.iterdir())


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"cascade {__version__}\n"


def test_info_of_the_demo_lists_every_part_and_the_samplers(capsys):
    from cascade.schedulers import samplers_for

    code, out, _ = cli(capsys, "info", "demo", "--json")
    found = json.loads(out)
    parts = {c["name"]: c["class"] for c in found["components"]}
    assert code == 0 and {"prior_text_encoder": "CLIPTextModelWithProjection", "prior_prior": "PriorTransformer",
                          "prior_image_encoder": "CLIPVisionModelWithProjection", "unet": "UNet2DConditionModel",
                          "movq": "VQModel", "inpaint_unet": "UNet2DConditionModel"}.items() <= parts.items()
    assert found["samplers"] == samplers_for(cascade.KandinskyV22CombinedPipeline) and "ddim" in found["samplers"]
    counts = {c["name"]: c["parameters"] for c in found["components"]}
    assert all(counts[n] > 0 for n in ("prior_text_encoder", "prior_prior", "unet", "movq", "inpaint_unet"))
    assert found["parameters"] == sum(n or 0 for n in counts.values())


def test_demo_keeps_the_file_rules_and_writes_a_recipe(tmp_path, capsys):
    argv = ["demo", "a red circle on a blue background", "--output", tmp_path / "d.png", "--steps", "2",
            "--prior-steps", "2", "--seed", "5", "-q"]
    assert cli(capsys, *argv)[0] == 0 and cli(capsys, *argv)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-1.png", "d.png"]  # never overwritten
    assert np.array_equal(pixels(tmp_path / "d.png"), pixels(tmp_path / "d-1.png"))
    text = PIL.Image.open(tmp_path / "d.png").text
    assert (text["model"], text["seed"], text["steps"], text["size"]) == ("demo", "5", "2", "64x64")
    code, out, _ = cli(capsys, "generate", "--from", tmp_path / "d.png", "--out", tmp_path, "-q")
    assert code == 0 and np.array_equal(pixels(out.strip()), pixels(tmp_path / "d.png"))


def test_scheduler_and_deepcache_are_recorded_and_replayed(tmp_path, capsys):
    code, out, err = cli(capsys, "generate", "demo", "a red circle on a blue background", "--steps", "3",
                         "--prior-steps", "2", "--scheduler", "ddim", "--deepcache", "2", "--seed", "1", "--out",
                         tmp_path)
    assert code == 0 and "prior 2/2" in err and "decoder 3/3" in err
    text = PIL.Image.open(out.strip()).text
    assert (text["scheduler"], text["deepcache"]) == ("ddim", "2") and "Sampler: DDIM" in text["parameters"]
    code, again, _ = cli(capsys, "generate", "--from", out.strip(), "--out", tmp_path, "-q")
    assert code == 0 and np.array_equal(pixels(again.strip()), pixels(out.strip()))
    code, plain, _ = cli(capsys, "generate", "--from", out.strip(), "--out", tmp_path, "-q", "--scheduler", "ddpm")
    assert code == 0 and PIL.Image.open(plain.strip()).text["scheduler"] == "ddpm"

"""The job layer (cascade/jobs.py): recipes checked on construction, PNG round trips, the AUTOMATIC1111
parameters chunk, atomic files, and runs of the demo model: seeds, progress, cancel, per-call samplers."""
import io
import math
import os
import threading
import zlib

import numpy as np
import PIL.Image
import pytest

from cascade.jobs import (Cancelled, Models, Recipe, RecipeError, check_folder, open_image, parameters,
                          parse_parameters, prepare, read_png, rebase, run, write_new)

DEMO = dict(model="demo", prompt="a red circle on a blue background", steps=2, prior_steps=2)


@pytest.fixture(scope="module")
def models():
    return Models()


def pixels(image):
    return np.asarray(image)


# --------------------------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("field,value", [
    ("seed", 2**70), ("seed", -1), ("seed", True), ("seed", "7"), ("steps", 0), ("steps", 2.5),
    ("steps", 10**9), ("prior_steps", -1), ("guidance", math.inf), ("guidance", math.nan), ("strength", 1.5),
    ("size", (0, 64)), ("size", "64by64"), ("size", (100032, 64)), ("scheduler", "karras"), ("task", "paint"),
    ("dtype", "int8"), ("n", 0), ("n", 10**6), ("item", ["a cat"]), ("item", ["a cat=nan"]),
    ("deepcache", 0), ("model", None), ("model", " "), ("prompt", ["a", "b"]),
])
def test_a_bad_value_names_its_field(field, value):
    values = {**DEMO, field: value}
    if field == "item":
        values.update(task="interpolate", prompt=None)
    with pytest.raises(RecipeError) as error:
        Recipe(**values)
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


def test_values_are_normalised_and_inputs_match_the_task():
    r = Recipe(**DEMO, guidance=4, size="96x64")
    assert (r.guidance, r.size) == (4.0, (96, 64))
    assert Recipe(**{**DEMO, "seed": 2**64 - 1}).seed == 2**64 - 1
    with pytest.raises(RecipeError, match="^seed: seed \\+ n - 1"):
        Recipe(**DEMO, seed=2**64 - 1, n=2)
    cases = [(dict(image="a.png"), "image: text2img takes no image"),
             (dict(task="img2img"), "image: img2img needs an image"),
             (dict(task="inpaint", image="a.png"), "mask: inpaint needs one of mask or rect"),
             (dict(task="inpaint", image="a.png", mask="m.png", rect="0,0,1,1"), "mask: inpaint needs one of"),
             (dict(task="inpaint", image="a.png", rect="1,2"), "rect: expected X,Y,W,H"),
             (dict(prompt=None), "prompt: text2img needs a prompt")]
    for changes, words in cases:
        with pytest.raises(RecipeError, match=f"^{words}"):
            Recipe(**{**DEMO, **changes})


def test_dict_round_trip_and_unknown_keys():
    r = Recipe(**DEMO, seed=7, size=(96, 64), scheduler="ddim", task="interpolate", item=("a.png=0.5", "x=1"))
    d = r.to_dict()
    assert d["size"] == "96x64" and d["item"] == ["a.png=0.5", "x=1"] and "n" not in d
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict({"prompt": "p"}, {"model": "demo", "steps": 3}).steps == 3  # defaults under a line
    assert Recipe.from_dict({"task": "generate", "model": "m", "prompt": "p"}).task == "text2img"  # old PNGs
    with pytest.raises(RecipeError, match="^stepz: not a recipe key"):
        Recipe.from_dict({**d, "stepz": 3})
    with pytest.raises(RecipeError, match="^model: missing"):
        Recipe.from_dict({"prompt": "p"})
    with pytest.raises(RecipeError, match="^recipe: expected a JSON object"):
        Recipe.from_dict(["model", "demo"])


def test_parameters_are_automatic1111s_infotext():
    r = Recipe(**DEMO, negative="a square, green", seed=7, guidance=4, size=(64, 64), scheduler="dpm++2m")
    text = parameters(r)
    assert text.splitlines()[:2] == ["a red circle on a blue background", "Negative prompt: a square, green"]
    assert text.splitlines()[2].startswith("Steps: 2, Sampler: DPM++ 2M, CFG scale: 4, Seed: 7, Size: 64x64, "
                                           "Model: demo, ")
    back = parse_parameters(text)
    assert (back["prompt"], back["negative_prompt"], back["Sampler"], back["Seed"]) == (
        r.prompt, r.negative, "DPM++ 2M", "7")
    a1111 = "a cat, photo\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, " \
            'Size: 512x768, Model hash: abc, Lora hashes: "a: 1, b: 2"'
    back = parse_parameters(a1111)
    assert back["prompt"] == "a cat, photo" and back["Lora hashes"] == "a: 1, b: 2" and back["Size"] == "512x768"
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


def test_a_png_without_our_recipe_is_a_clear_error(tmp_path):
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="plain.png: holds no cascade recipe"):
        Recipe.from_png(tmp_path / "plain.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not an image"):
        Recipe.from_png(tmp_path / "junk.png")


# --------------------------------------------------------------------------------------------- images and files

def huge_png(path, width=60000, height=60000):
    """A tiny file whose header claims a huge image (IHDR rewritten, CRC fixed)."""
    out = io.BytesIO()
    PIL.Image.new("RGB", (4, 4)).save(out, "png")
    data = bytearray(out.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def test_images_are_bounded_and_16_bit_is_scaled(tmp_path):
    for w, h in ((60000, 60000), (9000, 9000)):
        with pytest.raises(ValueError, match="image .*(too many pixels|megapixel limit)"):
            open_image(huge_png(tmp_path / f"{w}.png", w, h))
    grey = np.array([[0, 32768, 65535]], np.uint16)
    PIL.Image.fromarray(grey).save(tmp_path / "16.png")
    assert pixels(open_image(tmp_path / "16.png", "L")).tolist() == [[0, 128, 255]]
    with pytest.raises(ValueError, match="image nowhere.png: no such file"):
        open_image(tmp_path / "nowhere.png", name="nowhere.png")


def test_write_new_is_atomic_and_never_writes_through_links(tmp_path):
    target = tmp_path / "elsewhere.txt"
    os.symlink(target, tmp_path / "a.png")  # dangling
    assert write_new(tmp_path, "a", b"1").name == "a-1.png" and not target.exists()
    assert write_new(tmp_path, "a", b"2", overwrite=True).name == "a.png"
    assert not (tmp_path / "a.png").is_symlink() and not target.exists() and (tmp_path / "a.png").read_bytes() == b"2"
    threads = [threading.Thread(target=write_new, args=(tmp_path, "b", b"x")) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(p.name for p in tmp_path.glob("b*")) == sorted(["b.png"] + [f"b-{k}.png" for k in range(1, 8)])
    assert not list(tmp_path.glob(".*tmp"))


def test_output_folders(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for name, words in (("file", "not a folder"), ("dangling", "a dangling symlink"), ("file/sub", "cannot write")):
        with pytest.raises(RecipeError, match=f"^out: .*{words}"):
            check_folder(tmp_path / name)
    assert check_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_rebase_keeps_absolute_paths_and_names(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    r = Recipe(model="demo", task="img2img", prompt="p", image="in/a.png")
    moved = rebase(r, tmp_path, tmp_path / "out")
    assert moved.image == "../in/a.png" and moved.model == "demo"
    absolute = r.replace(image=str(tmp_path / "in" / "a.png"))
    assert rebase(absolute, tmp_path, tmp_path / "out").image == str(tmp_path / "in" / "a.png")
    items = Recipe(model="demo", task="interpolate", item=("in/a.png=0.5", "a cat=0.5"))
    assert rebase(items, tmp_path, tmp_path / "out").item == ("../in/a.png=0.5", "a cat=0.5")


# --------------------------------------------------------------------------------------------- runs

def test_run_reports_progress_and_round_trips_through_png(models):
    steps = []
    [result] = run(Recipe(**DEMO, seed=7), models, on_step=lambda *a: steps.append(a))
    assert steps == [("prior", 1, 2), ("prior", 2, 2), ("decoder", 1, 2), ("decoder", 2, 2)]
    r = result.recipe
    assert (r.seed, r.size, r.guidance, r.scheduler, r.dtype, r.device, r.n) == (
        7, (64, 64), 4.0, "dpm++sde", "float32", "cpu", 1)
    png = result.png()
    text = read_png(png)
    assert text["parameters"].startswith(DEMO["prompt"] + "\nSteps: 2, Sampler: DPM++ 2M SDE, CFG scale: 4, Seed: 7")
    back = Recipe.from_png(png)
    assert back == r
    [again] = run(back, models)
    assert np.array_equal(pixels(again.image), pixels(result.image)) and len(models) == 1


def test_each_image_has_its_own_seed(models):
    two = run(Recipe(**DEMO, seed=11, n=2), models)
    assert [r.recipe.seed for r in two] == [11, 12]
    [alone] = run(Recipe(**DEMO, seed=12), models)
    assert np.array_equal(pixels(alone.image), pixels(two[1].image))
    assert not np.array_equal(pixels(two[0].image), pixels(two[1].image))


def test_cancel_stops_within_one_step(models):
    cancel, seen = threading.Event(), []

    def on_step(stage, step, total):
        seen.append((stage, step))
        if stage == "decoder":
            cancel.set()

    with pytest.raises(Cancelled, match="decoder step 1"):
        run(Recipe(**{**DEMO, "steps": 5}), models, on_step=on_step, cancel=cancel)
    assert seen[-1] == ("decoder", 1)


def test_sampler_per_call_leaves_the_cached_pipeline_alone(models):
    job = prepare(Recipe(**DEMO, seed=1, scheduler="ddim"), models)
    cached = next(iter(models._pipes.values()))
    assert type(job.pipe.scheduler).__name__ == "DDIMScheduler"
    assert type(cached.scheduler).__name__ == "DDPMScheduler" and job.pipe.scheduler is not cached.scheduler
    assert job.pipe.unet is cached.unet  # models shared, not copied
    assert job.make(1).recipe.scheduler == "ddim"


def test_inputs_from_memory_equal_inputs_from_files(models, tmp_path):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), np.uint8))
    image.save(tmp_path / "in.png")
    recipe = Recipe(**DEMO, task="img2img", image="in.png", strength=0.5, seed=3)
    [from_file] = run(recipe, models, root=tmp_path)
    [from_memory] = run(recipe.replace(image="upload"), models, images={"image": image})
    assert np.array_equal(pixels(from_file.image), pixels(from_memory.image))
    # The model's native size at the input's aspect ratio, in the UNet's steps of 32 px: not 64x32 pixels.
    assert from_file.recipe.size == (96, 32) and from_file.image.size == (96, 32)


def test_errors_come_before_any_model_runs(models, tmp_path):
    cases = [(Recipe(**DEMO, super_res_steps=2), "super_res_steps: KandinskyV22CombinedPipeline has no such"),
             (Recipe(**DEMO, scheduler="wuerstchen"), "scheduler: KandinskyV22CombinedPipeline runs with"),
             (Recipe(**DEMO, device="nonsense"), "device: expected cpu"),
             (Recipe(**{**DEMO, "model": str(tmp_path)}), "model_index.json is missing"),
             (Recipe(**DEMO, task="inpaint", image="a.png", rect="0,0,8,8"), "image a.png: no such file")]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    cases.append((Recipe(**{**DEMO, "model": str(tmp_path / "bad")}), "no _class_name"))
    for recipe, words in cases:
        with pytest.raises((ValueError, OSError), match=words):
            prepare(recipe, models, root=tmp_path)

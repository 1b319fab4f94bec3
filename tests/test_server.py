"""`cascade serve` over HTTP: the real server on 127.0.0.1 with the demo model, called the way AUTOMATIC1111
clients (Open WebUI, SillyTavern), OpenAI SDKs and the page call it."""
import base64
import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from serving import FAST, PROMPT, decode, picture, pixels, png_b64, start

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def url():
    server = start()
    yield server.url
    server.stop()


@pytest.fixture()
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def txt2img(http, **fields):
    return http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, **FAST, **fields})


def test_open_webui_calls(http):
    """Open WebUI: read options, post them back with the model picked, list models, then txt2img."""
    options = http.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "demo"
    assert http.post("/sdapi/v1/options", json={**options, "sd_model_checkpoint": "demo"}).status_code == 200
    models = http.get("/sdapi/v1/sd-models").json()
    assert [(m["title"], m["model_name"]) for m in models] == [("demo", "demo")]
    r = txt2img(http, batch_size=2, width=64, height=64, negative_prompt="green", seed=21)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    images = [decode(b) for b in body["images"]]
    assert [i.size for i in images] == [(64, 64)] * 2 and all(i.format == "PNG" for i in images)
    info = json.loads(body["info"])
    assert (info["seed"], info["all_seeds"], info["negative_prompt"]) == (21, [21, 22], "green")
    assert info["infotexts"][1].startswith(f"{PROMPT}\nNegative prompt: green\nSteps: 2, Sampler: DPM++ 2M SDE, ")
    assert "Seed: 22, Size: 64x64, Model: demo" in info["infotexts"][1]
    assert body["parameters"]["batch_size"] == 2 and body["parameters"]["prompt"] == PROMPT
    assert images[0].text["seed"] == "21" and images[1].text["parameters"] == info["infotexts"][1]


def test_sillytavern_calls(http):
    """SillyTavern: ping (options), samplers, schedulers, upscalers, VAEs, models, set-model then progress
    until idle, and txt2img with its whole form, unknown fields included."""
    assert http.get("/sdapi/v1/options").status_code == 200
    samplers = [s["name"] for s in http.get("/sdapi/v1/samplers").json()]
    assert samplers[:3] == ["DPM++ 2M SDE", "DDPM", "DDIM"]  # the demo's default first
    for name in ("schedulers", "upscalers", "latent-upscale-modes", "sd-vae"):
        assert http.get(f"/sdapi/v1/{name}").json() == []
    title = http.get("/sdapi/v1/sd-models").json()[0]["title"]
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
    progress = http.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    form = {"prompt": PROMPT, "negative_prompt": "", "sampler_name": "DDIM", "scheduler": "Automatic",
            "steps": 2, "prior_steps": 2, "cfg_scale": 5, "width": 64, "height": 64, "restore_faces": False,
            "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7,
            "hr_second_pass_steps": 0, "seed": 7, "clip_skip": 1, "save_images": False, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False,
            "override_settings_restore_afterwards": True,
            "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
            "url": "http://127.0.0.1:7860", "auth": ""}
    r = http.post("/sdapi/v1/txt2img", json=form)
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert (image.text["scheduler"], image.text["guidance"], image.text["seed"]) == ("ddim", "5.0", "7")


def test_interrupt_stops_the_running_job_within_a_step(url, http):
    """A long txt2img, polled through /progress as clients do, then /interrupt: the request ends with 409 and
    no step runs after the one in flight."""
    answer = {}
    long = threading.Thread(target=lambda: answer.update(r=txt2img(httpx.Client(base_url=url, timeout=120),
                                                                   steps=400, seed=1)))
    long.start()
    for _ in range(600):
        state = http.get("/sdapi/v1/progress").json()
        if state["state"]["sampling_step"] >= 3:
            break
        time.sleep(0.05)
    assert 0 < state["progress"] < 1 and state["eta_relative"] > 0 and state["state"]["job_count"] == 1
    assert http.post("/sdapi/v1/interrupt").json() == {}
    stopped_at = http.get("/sdapi/v1/progress").json()["state"]["sampling_step"]
    long.join(60)
    assert answer["r"].status_code == 409 and "interrupted" in answer["r"].json()["detail"]
    job_id = state["state"]["job"]
    job = http.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["step"] <= stopped_at + 1
    assert http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_txt2img_equals_cascade_generate(http, tmp_path):
    from cascade.cli import main

    argv = ["generate", "demo", PROMPT, "--steps", "2", "--prior-steps", "2", "--seed", "11",
            "--guidance", "3", "--out", str(tmp_path), "-q"]
    assert main(argv) == 0
    made = next(tmp_path.glob("*.png"))
    r = txt2img(http, seed=11, cfg_scale=3)
    served = decode(r.json()["images"][0])
    assert np.array_equal(pixels(served), pixels(decode(base64.b64encode(made.read_bytes()))))


def test_png_info_reads_back_what_we_wrote(http):
    image = txt2img(http, seed=5, negative_prompt="a dog").json()["images"][0]
    found = http.post("/sdapi/v1/png-info", json={"image": image}).json()
    infotext = f"{PROMPT}\nNegative prompt: a dog\nSteps: 2, Sampler: DPM++ 2M SDE, CFG scale: 4"
    assert found["info"].startswith(infotext)
    assert found["items"]["model"] == "demo" and found["items"]["seed"] == "5"
    assert found["parameters"]["Seed"] == "5" and found["parameters"]["negative_prompt"] == "a dog"
    own = http.post("/api/png-info", content=base64.b64decode(image)).json()
    assert own["recipe"] == {"model": "demo", "task": "text2img", "prompt": PROMPT, "negative": "a dog",
                             "seed": 5, "steps": 2, "prior_steps": 2, "guidance": 4.0, "prior_guidance": 4.0,
                             "size": "64x64", "scheduler": "dpm++sde", "deepcache": 3, "dtype": "float32",
                             "device": "cpu"}
    assert http.post("/api/png-info", content=base64.b64decode(png_b64(picture()))).json()["recipe"] is None


def test_img2img_and_inpainting(http):
    source = picture(64, seed=3)
    body = {"prompt": PROMPT, **FAST, "init_images": [png_b64(source)], "denoising_strength": 0.5, "seed": 2}
    r = http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert (image.text["task"], image.text["strength"]) == ("img2img", "0.5")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    import PIL.Image

    r = http.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(PIL.Image.fromarray(mask))})
    assert r.status_code == 200, r.text
    painted = pixels(decode(r.json()["images"][0])).astype(int)
    assert decode(r.json()["images"][0]).text["task"] == "inpaint"
    # Outside the mask the source stays (up to the autoencoder's round trip); inside it is repainted.
    change = np.abs(painted - pixels(source))
    outside, inside = change[:8].mean(), change[24:40].mean()
    assert inside > outside


def test_openai_calls(url, http):
    assert http.get("/v1/models").json()["data"][0] == {"id": "demo", "object": "model", "created": 0,
                                                        "owned_by": "cascade"}
    r = http.post("/v1/images/generations", json={"model": "dall-e-2", "prompt": PROMPT, "n": 2, "seed": 9,
                                                  "size": "64x64", "negative_prompt": "green", **FAST})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [decode(d["b64_json"]).text["seed"] for d in data] == ["9", "10"]
    assert decode(data[0]["b64_json"]).text["negative"] == "green"
    linked = http.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "url", "seed": 9,
                                                       "negative_prompt": "green", **FAST})
    linked = linked.json()["data"][0]["url"]
    assert linked.startswith(url) and np.array_equal(
        pixels(decode(base64.b64encode(http.get(linked).content))), pixels(decode(data[0]["b64_json"])))
    source = picture(64, seed=4).convert("RGBA")
    hole = source.copy()
    hole.putalpha(255)
    hole.paste((0, 0, 0, 0), (16, 16, 48, 48))
    files = {"image": ("a.png", base64.b64decode(png_b64(hole)), "image/png")}
    fields = {"prompt": PROMPT, "steps": "2", "prior_steps": "2", "seed": "4"}
    r = http.post("/v1/images/edits", data=fields, files=files)
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]["b64_json"]).text["task"] == "inpaint"
    files = {"image": ("a.png", base64.b64decode(png_b64(source.convert("RGB"))), "image/png")}
    r = http.post("/v1/images/variations", data={"steps": "2", "prior_steps": "2", "n": "1"}, files=files)
    assert r.status_code == 200, r.text
    # The demo has no unCLIP variation pipeline: a variation is image to image without a prompt.
    assert decode(r.json()["data"][0]["b64_json"]).text["task"] == "img2img"


def test_own_job_api_streams_progress(http):
    r = http.post("/api/jobs", json={"prompt": PROMPT, "steps": 6, "prior_steps": 2, "n": 2, "seed": 40})
    assert r.status_code == 202
    job = r.json()
    assert job["steps"] == 16 and job["recipe"]["seed"] == 40
    events = []
    with http.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    steps = [e["step"] for e in events if e["status"] == "running"]
    assert steps == sorted(steps) and steps[-1] >= 15 and {"prior", "decoder"} <= {e["stage"] for e in events}
    end = events[-1]
    assert end["status"] == "done" and [r["seed"] for r in end["results"]] == [40, 41]
    download = http.get(end["results"][1]["url"])
    assert download.headers["content-disposition"] == 'attachment; filename="text2img-41.png"'
    assert decode(base64.b64encode(download.content)).text["seed"] == "41"


def test_cancel_a_queued_job(http):
    first = http.post("/api/jobs", json={"prompt": PROMPT, "steps": 300, "prior_steps": 2}).json()
    second = http.post("/api/jobs", json={"prompt": PROMPT, **FAST}).json()
    assert http.post(f"/api/jobs/{second['id']}/cancel").json()["status"] == "cancelled"
    assert http.delete(f"/api/jobs/{first['id']}").json()["status"] in ("running", "cancelled")
    for _ in range(200):
        if http.get(f"/api/jobs/{first['id']}").json()["status"] == "cancelled":
            break
        time.sleep(0.05)
    assert http.get(f"/api/jobs/{first['id']}").json()["status"] == "cancelled"
    assert http.get(f"/api/jobs/{second['id']}").json()["step"] == 0


def test_a_failure_inside_a_model_is_500_and_the_server_goes_on(http, monkeypatch):
    from cascade import jobs

    def broken(self, seed, on_step=None, cancel=None):
        raise RuntimeError("the UNet fell over")

    monkeypatch.setattr(jobs.Job, "make", broken)
    r = txt2img(http)
    assert r.status_code == 500 and r.json()["error"]["message"] == "RuntimeError: the UNet fell over"
    monkeypatch.undo()
    assert txt2img(http).status_code == 200


def test_the_core_never_imports_fastapi():
    code = ("import sys, cascade, cascade.jobs, cascade.cli, cascade.server; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_without_the_serve_extra_one_clear_line():
    code = ("import sys; sys.modules['fastapi'] = None; from cascade.server import main; "
            "sys.exit(main(['demo', '--port', '1']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last == "cascade serve: error: cascade serve needs FastAPI and uvicorn: " \
        "pip install 'cascade-diffusion[serve]'"

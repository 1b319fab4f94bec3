"""Every bad request gets its 4xx JSON error, naming the field, before a model runs; the API key rule; the
host rule. The server is alive after all of them."""
import base64

import httpx
import pytest

from serving import FAST, PROMPT, bomb_png, lying_png, picture, png_b64, start

pytest.importorskip("fastapi")
IMAGE = png_b64(picture(64))
BOMB = base64.b64encode(bomb_png()).decode()
LIAR = base64.b64encode(lying_png(6000, 6000)).decode()
HUGE_LIAR = base64.b64encode(lying_png()).decode()


@pytest.fixture(scope="module")
def url():
    server = start()
    yield server.url
    server.stop()


def a1111(**fields):
    return {"prompt": PROMPT, **FAST, **fields}


def img2img(**fields):
    return {"prompt": PROMPT, **FAST, "init_images": [IMAGE], **fields}


CASES = [  # (name, method, path, request keywords, status, field)
    ("steps 0", "POST", "/sdapi/v1/txt2img", {"json": a1111(steps=0)}, 422, "steps"),
    ("steps text", "POST", "/sdapi/v1/txt2img", {"json": a1111(steps="many")}, 422, "steps"),
    ("steps over the limit", "POST", "/sdapi/v1/txt2img", {"json": a1111(steps=5000)}, 422, "steps"),
    ("steps fraction", "POST", "/sdapi/v1/txt2img", {"json": a1111(steps=2.5)}, 422, "steps"),
    ("cfg negative", "POST", "/sdapi/v1/txt2img", {"json": a1111(cfg_scale=-1)}, 422, "cfg_scale"),
    ("prior cfg text", "POST", "/sdapi/v1/txt2img", {"json": a1111(prior_cfg_scale="x")}, 422,
     "prior_cfg_scale"),
    ("seed text", "POST", "/sdapi/v1/txt2img", {"json": a1111(seed="lucky")}, 422, "seed"),
    ("prompt not text", "POST", "/sdapi/v1/txt2img", {"json": a1111(prompt=["a"])}, 422, "prompt"),
    ("width not a multiple", "POST", "/sdapi/v1/txt2img", {"json": a1111(width=72)}, 422, "width"),
    ("width too large", "POST", "/sdapi/v1/txt2img", {"json": a1111(width=100000)}, 422, "width"),
    ("batch too large", "POST", "/sdapi/v1/txt2img", {"json": a1111(batch_size=9)}, 422, "batch_size"),
    ("unknown sampler", "POST", "/sdapi/v1/txt2img", {"json": a1111(sampler_name="LMS")}, 422,
     "sampler_name"),
    ("model path", "POST", "/sdapi/v1/txt2img",
     {"json": a1111(override_settings={"sd_model_checkpoint": "/etc"})}, 404,
     "override_settings.sd_model_checkpoint"),
    ("options model path", "POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": "../models"}}, 404,
     "sd_model_checkpoint"),
    ("not JSON", "POST", "/sdapi/v1/txt2img", {"content": b"{prompt"}, 400, "body"),
    ("JSON list", "POST", "/sdapi/v1/txt2img", {"json": [1, 2]}, 400, "body"),
    ("no init image", "POST", "/sdapi/v1/img2img", {"json": a1111()}, 422, "init_images"),
    ("bad base64", "POST", "/sdapi/v1/img2img", {"json": img2img(init_images=["%%%"])}, 422, "init_images"),
    ("not an image", "POST", "/sdapi/v1/img2img",
     {"json": img2img(init_images=[base64.b64encode(b"GIF89a....").decode()])}, 422, "init_images"),
    ("strength leaves no step", "POST", "/sdapi/v1/img2img", {"json": img2img(denoising_strength=0.1)}, 422,
     "denoising_strength"),
    ("mask of another size", "POST", "/sdapi/v1/img2img",
     {"json": img2img(mask=png_b64(picture(32, mode="L")))}, 422, "mask"),
    ("decompression bomb", "POST", "/sdapi/v1/img2img", {"json": img2img(init_images=[BOMB])}, 413,
     "init_images"),
    ("header claims 36 Mpx", "POST", "/sdapi/v1/img2img", {"json": img2img(init_images=[LIAR])}, 413,
     "init_images"),
    ("header claims 900 Mpx", "POST", "/sdapi/v1/png-info", {"json": {"image": HUGE_LIAR}}, 413, "image"),
    ("png-info without image", "POST", "/sdapi/v1/png-info", {"json": {}}, 422, "image"),
    ("body over the limit", "POST", "/sdapi/v1/txt2img", {"content": b"x" * (33 << 20)}, 413, "body"),
    ("openai no prompt", "POST", "/v1/images/generations", {"json": {"n": 1}}, 422, "prompt"),
    ("openai format", "POST", "/v1/images/generations", {"json": {"prompt": "a", "response_format": "xml"}},
     422, "response_format"),
    ("openai size", "POST", "/v1/images/generations", {"json": {"prompt": "a", "size": "big"}}, 422, "size"),
    ("openai n 0", "POST", "/v1/images/generations", {"json": {"prompt": "a", "n": 0}}, 422, "n"),
    ("openai webp", "POST", "/v1/images/generations", {"json": {"prompt": "a", "output_format": "webp"}}, 422,
     "output_format"),
    ("edit as JSON", "POST", "/v1/images/edits", {"json": {"prompt": "a"}}, 415, "body"),
    ("edit without image", "POST", "/v1/images/edits", {"data": {"prompt": "a"}, "files": {"x": ("x", b"1")}},
     422, "image"),
    ("job field naming a file", "POST", "/api/jobs", {"json": {"prompt": "a", "image_path": "/etc/passwd"}},
     422, "image_path"),
    ("job model folder", "POST", "/api/jobs", {"json": {"prompt": "a", "model": "/tmp"}}, 404, "model"),
    ("job task the model lacks", "POST", "/api/jobs", {"json": {"prompt": "a", "task": "variation"}}, 422,
     "task"),
    ("job image missing", "POST", "/api/jobs", {"json": {"prompt": "a", "task": "img2img"}}, 422, "image"),
    ("job size text", "POST", "/api/jobs", {"json": {"prompt": "a", "size": "huge"}}, 422, "size"),
    ("job n text", "POST", "/api/jobs", {"json": {"prompt": "a", "n": "two"}}, 422, "n"),
    ("job sampler", "POST", "/api/jobs", {"json": {"prompt": "a", "scheduler": "plms"}}, 422, "scheduler"),
    ("unknown job", "GET", "/api/jobs/12-nothing", {}, 404, "id"),
    ("unknown image", "GET", "/api/jobs/12-nothing/images/0.png", {}, 404, "id"),
    ("unknown route", "GET", "/sdapi/v1/nothing", {}, 404, "path"),
    ("wrong method", "GET", "/sdapi/v1/txt2img", {}, 405, "method"),
]


@pytest.mark.parametrize("name, method, path, kw, status, field", CASES, ids=[c[0] for c in CASES])
def test_bad_request(url, name, method, path, kw, status, field):
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.request(method, path, **kw)
        assert r.status_code == status, r.text
        body = r.json()
        assert body["error"]["field"] == field and body["detail"].startswith(f"{field}: ")
        assert http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0  # nothing was queued


def test_still_serving_after_the_bad_requests(url):
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/sdapi/v1/txt2img", json=a1111(seed=1))
        assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_api_key():
    server = start(api_key="s3cret")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = http.get("/sdapi/v1/options", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
                assert r.headers["www-authenticate"] == "Bearer"
            assert http.post("/sdapi/v1/txt2img", json=a1111()).status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            basic = base64.b64encode(b"anyone:s3cret").decode()  # what A1111 clients send for "user:KEY"
            basic = {"Authorization": f"Basic {basic}"}
            assert http.get("/sdapi/v1/sd-models", headers=basic).status_code == 200
            # The page's files hold no data: a browser loads them, then sends the key with each API call.
            assert http.get("/").status_code == 200 and http.get("/static/app.js").status_code == 200
            assert http.get("/api/models").status_code == 401
    finally:
        server.stop()


@pytest.mark.parametrize("host, key, refused", [("127.0.0.1", None, False), ("::1", None, False),
                                                 ("localhost", None, False), ("0.0.0.0", None, True),
                                                 ("192.168.1.5", None, True), ("0.0.0.0", "k", False)])
def test_host_rule(host, key, refused):
    from cascade.server import check_host

    if refused:
        with pytest.raises(ValueError, match=f"--host {host}: serving beyond this machine needs --api-key"):
            check_host(host, key)
    else:
        check_host(host, key)


def test_serve_refuses_an_open_host_before_loading_anything(capsys):
    from cascade.server import main

    assert main(["demo", "--host", "0.0.0.0"]) == 1
    assert capsys.readouterr().err.startswith("cascade serve: error: --host 0.0.0.0: serving beyond")


def test_cascade_serve_is_a_subcommand(capsys):
    from cascade.cli import main

    assert main(["serve", "demo", "--host", "0.0.0.0"]) == 1
    assert "--host 0.0.0.0: serving beyond this machine needs --api-key" in capsys.readouterr().err

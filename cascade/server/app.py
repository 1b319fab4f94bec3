"""The HTTP layer: routes that translate (api.py) and hand recipes to an executor (executor.py). `create_app`
takes any executor with `served`, `submit`, `job`, `cancel` and `waiting`."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..recipe import RecipeError
from . import api, engine
from .errors import ApiError, invalid
from .guard import Guard
from .images import Limits, from_base64, open_image

STATIC = Path(__file__).parent / "static"
OVER = ("done", "failed", "cancelled")


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except ValueError as error:
        raise ApiError(400, "body", f"expected a JSON object ({error})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body", "expected a JSON object")
    return body


async def finished(job) -> None:
    """Wait, without holding a thread, until the worker is done with `job`."""
    loop, over = asyncio.get_running_loop(), asyncio.Event()

    def on_event(event):
        if event["status"] in OVER:
            loop.call_soon_threadsafe(over.set)

    job.listen(on_event)
    try:
        await over.wait()
    finally:
        job.unlisten(on_event)


async def submit(executor, request: api.Request, limits: Limits):
    """Check a translated request and queue it; the pipeline's own checks (options, sampler, inputs) answer
    422 here, before anything runs, naming the field as the request named it."""
    recipe = request.recipe(limits)
    try:
        return await asyncio.to_thread(executor.submit, recipe, request.inputs)
    except RecipeError as error:
        raise invalid(request.names.get(error.field, error.field), str(error).split(": ", 1)[1]) from None
    except FileNotFoundError as error:
        raise ApiError(404, "model", str(error)) from None


async def run(executor, request: api.Request, limits: Limits) -> tuple:
    """Queue a request and wait for its images; a cancelled job answers with what it finished, or 409."""
    job = await submit(executor, request, limits)
    await finished(job)
    if job.status == "failed":
        field = request.names.get(job.error_field, job.error_field)
        raise ApiError(job.error_status, field, job.error)
    if job.status == "cancelled" and not job.results:
        raise ApiError(409, None, f"job {job.id} was interrupted before an image was finished")
    return job, job.results


def result_info(job, index: int, result: dict) -> dict:
    """An image of a job as the job API lists it: its recipe and where to download it."""
    meta = {k: v for k, v in result.items() if k not in ("png", "b64")}
    return {**meta, "url": f"/api/jobs/{job.id}/images/{index}.png"}


def job_json(job) -> dict:
    return {**job.event(), "recipe": job.recipe.to_dict(),
            "results": [result_info(job, i, r) for i, r in enumerate(job.results)]}


def a1111_progress(executor) -> dict:
    job = executor.running
    waiting = executor.waiting()
    if job is None:
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": waiting,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    state = {"skipped": False, "interrupted": job.cancel_event.is_set(), "job": job.id,
             "job_count": waiting + 1, "job_timestamp": time.strftime("%Y%m%d%H%M%S",
                                                                      time.localtime(job.created)),
             "job_no": len(job.results), "sampling_step": job.step, "sampling_steps": job.steps}
    return {"progress": job.progress(), "eta_relative": job.eta() or 0.0, "state": state,
            "current_image": None, "textinfo": job.stage or None}


def png_info(raw: bytes, limits: Limits) -> dict:
    return engine.png_info(open_image(raw, "image", limits, None))


def create_app(executor, api_key: str | None = None, limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="cascade", docs_url=None, redoc_url=None)  # their pages load scripts from a CDN
    app.state.executor, app.state.limits = executor, limits
    app.state.current = next(iter(executor.served))

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        return JSONResponse(ApiError(500, None, f"{type(error).__name__}: {error}").body(), status_code=500)

    @app.exception_handler(404)
    async def not_found(request, error):
        return JSONResponse(ApiError(404, "path", f"no route {request.method} {request.url.path}").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request, error):
        return JSONResponse(ApiError(405, "method", f"{request.method} is not allowed on {request.url.path}")
                            .body(), status_code=405)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    own_routes(app)
    a1111_routes(app)
    openai_routes(app)
    return Guard(app, api_key, limits.body_bytes)


def own_routes(app: FastAPI) -> None:
    executor, limits = app.state.executor, app.state.limits

    def find(job_id: str):
        job = executor.job(job_id)
        if job is None:
            raise ApiError(404, "id", f"no job {job_id!r} (finished jobs are kept a while, then forgotten)")
        return job

    @app.get("/api/models")
    async def models():
        return {"models": [m.describe() for m in executor.served.values()], "default": app.state.current}

    @app.post("/api/jobs", status_code=202)
    async def create_job(request: Request):
        translated = api.own_request(await json_body(request), executor.served, app.state.current, limits)
        job = await submit(executor, translated, limits)
        return job_json(job)

    @app.get("/api/jobs/{job_id}")
    async def status(job_id: str):
        return job_json(find(job_id))

    @app.post("/api/jobs/{job_id}/cancel")
    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str):
        return job_json(executor.cancel(find(job_id).id))

    @app.get("/api/jobs/{job_id}/images/{index}.png")
    async def image(job_id: str, index: int):
        job = find(job_id)
        if not 0 <= index < len(job.results):
            raise ApiError(404, "index", f"job {job_id} has {len(job.results)} images")
        result = job.results[index]
        name = f"{result['task']}-{result['seed']}.png"
        return Response(result["png"], media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str):
        return StreamingResponse(stream(find(job_id)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/png-info")
    async def read_png(request: Request):
        return png_info(await request.body(), limits)


async def stream(job):
    """Server-sent events: the job's state at once, then on every step; the last one carries the results."""
    loop, messages = asyncio.get_running_loop(), asyncio.Queue()

    def on_event(event):
        loop.call_soon_threadsafe(messages.put_nowait, event)

    job.listen(on_event)
    try:
        event = job.event()
        while True:
            if event["status"] in OVER:
                event = job_json(job)
            yield f"event: {'end' if event['status'] in OVER else 'progress'}\ndata: {json.dumps(event)}\n\n"
            if event["status"] in OVER:
                return
            event = await messages.get()
    finally:
        job.unlisten(on_event)


def a1111_routes(app: FastAPI) -> None:
    executor, limits = app.state.executor, app.state.limits

    async def generate(request: Request, img2img: bool):
        body = await json_body(request)
        translated = api.a1111_request(body, executor.served, app.state.current, limits, img2img)
        _, results = await run(executor, translated, limits)
        return api.a1111_response(body, results, translated.model.name)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate(request, False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate(request, True)

    @app.get("/sdapi/v1/progress")
    async def progress():
        return a1111_progress(executor)

    @app.post("/sdapi/v1/interrupt")
    @app.post("/sdapi/v1/skip")
    async def interrupt():
        executor.cancel(None)
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info_a1111(request: Request):
        body = await json_body(request)
        found = png_info(from_base64(body.get("image"), "image", limits), limits)
        return api.a1111_png_info(found["text"], found["fields"])

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return api.a1111_models(executor.served)

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return api.a1111_samplers(executor.served)

    @app.get("/sdapi/v1/options")
    async def options():
        return {"sd_model_checkpoint": app.state.current, "sd_checkpoint_hash": None, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await json_body(request)  # clients post back the whole dict; only the model matters here
        if "sd_model_checkpoint" in body:
            app.state.current = api.choose("sd_model_checkpoint", body["sd_model_checkpoint"],
                                           executor.served).name
        return None

    for name in ("schedulers", "upscalers", "latent-upscale-modes", "sd-vae"):  # asked for by SillyTavern
        app.add_api_route(f"/sdapi/v1/{name}", lambda: [], methods=["GET"])


def openai_routes(app: FastAPI) -> None:
    executor, limits = app.state.executor, app.state.limits

    async def form(request: Request) -> dict:
        """multipart/form-data -> {field: text or file bytes}; `image[]` (several images) takes the first."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "body", "expected multipart/form-data with an image file")
        values = {}
        async with request.form(max_files=4, max_fields=64) as data:
            for key, value in data.multi_items():
                key = key.removesuffix("[]")
                if key in values:
                    continue
                values[key] = await value.read() if hasattr(value, "read") else value
        return values

    async def generate(request: Request, values: dict, task: str):
        translated = api.openai_request(values, executor.served, app.state.current, limits, task)
        job, results = await run(executor, translated, limits)
        base = str(request.base_url).rstrip("/")
        return api.openai_response(results, values.get("response_format", "b64_json"),
                                   lambda i: f"{base}/api/jobs/{job.id}/images/{i}.png")

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await generate(request, await json_body(request), "text2img")

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        return await generate(request, await form(request), "edit")

    @app.post("/v1/images/variations")
    async def variations(request: Request):
        return await generate(request, await form(request), "variation")

    @app.get("/v1/models")
    async def models():
        return api.openai_models(executor.served)

"use strict";
// The page of `cascade serve`: a form that becomes a recipe, a job followed over server-sent events, and a
// gallery of what this page made. No libraries; the API key (if the server has one) lives in sessionStorage.
const $ = (id) => document.getElementById(id);
const TASKS = { text2img: "Text to image", img2img: "Image to image", inpaint: "Inpainting",
                variation: "Variations", upscale: "Upscale" };
const NEEDS_IMAGE = ["img2img", "inpaint", "variation", "upscale"];
const SETTINGS = ["steps", "prior_steps", "guidance", "prior_guidance", "strength"];
const OVER = ["done", "failed", "cancelled"];
const state = { models: [], job: null, image: null, mask: null, painted: false };

function auth(extra = {}) {
  const key = sessionStorage.getItem("cascade-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: auth(options.headers || {}) });
  if (response.status === 401) {
    $("key-box").classList.remove("hidden");
    throw new Error("this server needs its API key: enter it at the top right");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).detail || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function fail(error) {
  $("error").textContent = String(error.message || error);
  $("error").classList.remove("hidden");
}

function model() {
  return state.models.find((m) => m.name === $("model").value) || state.models[0];
}

function options(select, values, labels = {}) {
  const keep = select.value;
  select.replaceChildren(...values.map((v) => new Option(labels[v] || v, v)));
  if (values.includes(keep)) select.value = keep;
}

async function loadModels() {
  const data = await (await call("/api/models")).json();
  state.models = data.models;
  options($("model"), data.models.map((m) => m.name));
  $("model").value = data.default;
  applyModel();
}

function applyModel() {
  const m = model();
  $("pipeline").textContent = m.pipeline;
  options($("task"), m.tasks, TASKS);
  options($("scheduler"), ["", ...m.samplers], { "": `model default (${m.samplers[0]})` });
  for (const label of document.querySelectorAll("[data-setting]")) {
    label.classList.toggle("hidden", !m.settings.includes(label.dataset.setting));
  }
  $("width").placeholder = m.size ? m.size[0] : "default";
  $("height").placeholder = m.size ? m.size[1] : "default";
  applyTask();
}

function applyTask() {
  const task = $("task").value;
  $("inputs").classList.toggle("hidden", !NEEDS_IMAGE.includes(task));
  $("mask-tools").classList.toggle("hidden", task !== "inpaint");
  $("mask-canvas").classList.toggle("hidden", task !== "inpaint");
  const strength = document.querySelector("[data-setting=strength]");
  strength.classList.toggle("hidden", task !== "img2img" || !model().settings.includes("strength"));
  $("prompt").disabled = task === "variation";
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function chooseImage(file) {
  state.image = await readFile(file);
  state.mask = null;
  const img = $("image-preview");
  img.onload = () => {
    const canvas = $("mask-canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    state.painted = false;
  };
  img.src = state.image;
  $("canvas-box").classList.remove("hidden");
}

function paint(event) {
  if (!(event.buttons & 1) || $("task").value !== "inpaint") return;
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "white";
  ctx.beginPath();
  ctx.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
          Number($("brush").value) * scale / 2, 0, 2 * Math.PI);
  ctx.fill();
  state.painted = true;
}

function paintedMask() {
  // White where painted, black elsewhere, at the image's size.
  const canvas = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return out.toDataURL("image/png");
}

function recipe() {
  const body = { model: $("model").value, task: $("task").value, prompt: $("prompt").value,
                 negative: $("negative").value, n: Number($("n").value) || 1 };
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  for (const key of SETTINGS) {
    const input = $(key);
    if (input.value !== "" && !input.closest("label").classList.contains("hidden")) body[key] = Number(input.value);
  }
  if ($("width").value && $("height").value) body.size = `${$("width").value}x${$("height").value}`;
  if (!$("random").checked && $("seed").value !== "") body.seed = Number($("seed").value);
  if (NEEDS_IMAGE.includes(body.task)) body.image = state.image;
  if (body.task === "inpaint") body.mask = state.mask || (state.painted ? paintedMask() : null);
  if (body.task === "variation") delete body.prompt;
  return body;
}

function busy(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
}

async function generate(event) {
  event.preventDefault();
  $("error").classList.add("hidden");
  busy(true);
  try {
    const response = await call("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(recipe()) });
    const job = await response.json();
    state.job = job.id;
    show(job);
    await follow(job.id);
  } catch (error) {
    fail(error);
  } finally {
    busy(false);
    state.job = null;
  }
}

async function follow(id) {
  // Server-sent events read from a fetch stream, so the API key can travel in a header.
  const response = await call(`/api/jobs/${id}/events`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data: "))
        .map((l) => l.slice(6)).join("\n");
      buffer = buffer.slice(cut + 2);
      if (!data) continue;
      const event = JSON.parse(data);
      show(event);
      if (OVER.includes(event.status)) {
        await finish(event);
        return;
      }
    }
  }
}

function show(event) {
  $("progress").value = event.progress || 0;
  const parts = [event.status];
  if (event.stage) parts.push(event.stage);
  if (event.steps) parts.push(`step ${event.step}/${event.steps}`);
  if (event.eta !== null && event.eta !== undefined && event.status === "running") parts.push(`ETA ${event.eta.toFixed(1)} s`);
  $("status").textContent = parts.join(" · ");
}

async function finish(event) {
  if (event.status === "failed") fail(event.error);
  const seeds = event.results.map((r) => r.seed);
  if (seeds.length) {
    $("seed-used").textContent = `seed used: ${seeds.join(", ")}`;
    $("seed").value = seeds[0];
  }
  for (const result of event.results) await addCard(result);
}

async function addCard(result) {
  const blob = await (await call(result.url)).blob();
  const url = URL.createObjectURL(blob);
  const card = document.createElement("div");
  card.className = "card";
  const img = document.createElement("img");
  img.src = url;
  img.alt = result.prompt || result.task;
  const meta = document.createElement("div");
  meta.className = "meta";
  const line = (text) => { const p = document.createElement("p"); p.textContent = text; p.title = text; return p; };
  meta.append(line(result.prompt || `(${result.task})`),
              line(`seed ${result.seed} · ${result.size.join("x")} · ${result.scheduler || "default"}`));
  const row = document.createElement("div");
  row.className = "row";
  const link = document.createElement("a");
  link.href = url;
  link.download = `${result.task}-${result.seed}.png`;
  link.textContent = "Download PNG";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Reuse settings";
  reuse.onclick = () => fillForm(result);
  row.append(link, reuse);
  meta.append(row);
  card.append(img, meta);
  $("gallery").prepend(card);
}

function fillForm(r) {
  if (r.model && state.models.some((m) => m.name === r.model)) $("model").value = r.model;
  applyModel();
  if (r.task && [...$("task").options].some((o) => o.value === r.task)) $("task").value = r.task;
  applyTask();
  $("prompt").value = r.prompt || "";
  $("negative").value = r.negative || "";
  $("scheduler").value = [...$("scheduler").options].some((o) => o.value === r.scheduler) ? r.scheduler : "";
  for (const key of SETTINGS) $(key).value = r[key] ?? "";
  const size = Array.isArray(r.size) ? r.size : r.size ? r.size.split("x").map(Number) : null;
  $("width").value = size ? size[0] : "";
  $("height").value = size ? size[1] : "";
  if (r.seed !== undefined && r.seed !== null) {
    $("seed").value = r.seed;
    $("random").checked = false;
    $("seed").disabled = false;
  }
  $("n").value = 1;
}

async function loadPng(file) {
  $("error").classList.add("hidden");
  try {
    const response = await call("/api/png-info", { method: "POST", headers: { "Content-Type": "image/png" }, body: file });
    const info = await response.json();
    if (!info.recipe) throw new Error("this PNG carries no cascade recipe");
    fillForm(info.recipe);
    $("status").textContent = `settings loaded from ${file.name}`;
  } catch (error) {
    fail(error);
  }
}

function wire() {
  $("model").onchange = applyModel;
  $("task").onchange = applyTask;
  $("form").onsubmit = generate;
  $("cancel").onclick = () => state.job && call(`/api/jobs/${state.job}/cancel`, { method: "POST" }).catch(fail);
  $("image-file").onchange = (e) => e.target.files[0] && chooseImage(e.target.files[0]).catch(fail);
  $("mask-file").onchange = async (e) => { if (e.target.files[0]) state.mask = await readFile(e.target.files[0]); };
  $("mask-clear").onclick = () => {
    const canvas = $("mask-canvas");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    state.painted = false;
    state.mask = null;
  };
  $("mask-canvas").onpointerdown = paint;
  $("mask-canvas").onpointermove = paint;
  $("random").onchange = () => { $("seed").disabled = $("random").checked; };
  $("seed").disabled = $("random").checked;
  $("png-file").onchange = (e) => e.target.files[0] && loadPng(e.target.files[0]);
  $("key-save").onclick = () => {
    sessionStorage.setItem("cascade-key", $("key").value);
    $("key-box").classList.add("hidden");
    $("error").classList.add("hidden");
    loadModels().catch(fail);
  };
  document.addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.remove("hidden"); });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) $("drop").classList.add("hidden"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    $("drop").classList.add("hidden");
    const file = e.dataTransfer.files[0];
    if (file) loadPng(file);
  });
}

wire();
loadModels().catch(fail);

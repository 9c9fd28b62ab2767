// The saliency explorer: one page over the HTTP/JSON API (the proto's JSON mapping).
// GetModel gives the methods and their defaults; /openapi.json each parameter's type;
// /explorer/choices the named values a parameter takes (offered as a list).
"use strict";

// Every string from the server (labels, names, messages) goes into the page as text:
// elements are built with el()/svgEl() and textContent, never from HTML strings.
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "saliency-token";  // in sessionStorage: this tab only, gone when it closes
const NARROW = window.matchMedia("(max-width: 760px)");  // explorer.css's one-column layout

const state = {
  schemas: {}, choices: { methods: {}, resize: [] }, info: null, report: null,
  image: null, imageElement: null, results: new Map(), runs: 0, started: 0, timer: 0,
  welcome: "",
};

function el(tag, props = {}, ...children) {
  const element = Object.assign(document.createElement(tag), props);
  element.append(...children);
  return element;
}

function svgEl(tag, attributes = {}, text = "") {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text) element.textContent = text;
  return element;
}

// ---- calls -------------------------------------------------------------------------------

function headers() {
  const token = $("token").value.trim();
  const out = { "content-type": "application/json" };
  if (token) out.authorization = `Bearer ${token}`;
  return out;
}

class ApiError extends Error {
  constructor(status, data) {
    super(describeError(status, data));
    this.status = status;
  }
}

async function api(path, body) {
  const options = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function describeError(status, data) {
  const error = (data && data.error) || {};
  return `${status} ${error.status || ""}: ${error.message || "request failed"}`;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function showError(error) {
  setStatus(error.message, true);
  if (error.status === 401) {  // the server has tokens: ask for one where it goes
    $("auth").open = true;
    $("token").focus();
    setStatus(`${error.message} — paste the server's token under "Bearer token"`, true);
  }
}

// ---- models, methods and their parameters ------------------------------------------------

async function loadModels() {
  const spec = await api("/openapi.json");
  state.schemas = spec.components.schemas;
  state.choices = await api("/explorer/choices");
  const listed = await api("/api/v1/models");
  const select = $("model");
  select.replaceChildren();
  for (const model of listed.models || []) {
    const option = new Option(`${model.name} v${model.version}${model.ready ? "" : " (not ready)"}`,
                              model.name);
    option.disabled = !model.ready;
    option.title = model.error || "";
    select.add(option);
  }
  const ready = (listed.models || []).find((m) => m.ready);
  if (ready) { select.value = ready.name; await loadModel(ready.name); }
  else setStatus("no model is ready", true);
}

async function loadModel(name) {
  const info = await api(`/api/v1/models/${encodeURIComponent(name)}`);
  if (state.info && state.info.status.name !== info.status.name) clearResults();
  state.info = info;
  const shape = info.input.shape || [];
  $("model-status").textContent =
    `input ${shape.slice(1).join("×")} · ${info.class_labels.length} classes · ` +
    `${info.methods.length} methods`;
  const target = $("target");
  target.replaceChildren(new Option("predicted class", ""));
  info.class_labels.forEach((label, index) => target.add(new Option(`${index}: ${label}`, index)));
  const resize = $("resize");
  resize.replaceChildren(new Option(`model's default (${info.input.resize || "stretch"})`, ""));
  for (const mode of state.choices.resize || []) resize.add(new Option(mode.replace("_", " "), mode));
  const chosen = new Set(selectedMethods().map((option) => option.dataset.method));
  $("methods").replaceChildren(...info.methods.map((method) => methodOption(method, chosen)));
  updateRunButton();
  loadReport(name);
}

async function loadReport(model) {
  state.report = null;
  try {
    state.report = await api(`/explorer/evaluation?model=${encodeURIComponent(model)}`);
  } catch (error) {
    // No cost-vs-quality table for this model (404): no chart rather than another model's.
  }
  if (state.info && state.info.status.name !== model) return;  // another model was picked
  $("chart-button").hidden = !state.report;
  if (!state.report) $("chart").hidden = true;
  else if (!$("chart").hidden) showChart();
}

function paramProperties(method) {
  const request = state.schemas.ExplainRequest;
  const ref = request && request.properties[method] && request.properties[method].$ref;
  const schema = ref ? state.schemas[ref.split("/").pop()] : null;
  return schema ? schema.properties : {};
}

function methodOption(method, chosen) {
  const wrap = el("div", { className: "method-option" });
  wrap.dataset.method = method.name;
  const box = el("input", { type: "checkbox", value: method.name, id: `m-${method.name}`,
                            checked: chosen.has(method.name) });
  const measured = method.mean_seconds > 0 ? ` · ~${formatMs(method.mean_seconds * 1000)}` : "";
  const label = el("label", { htmlFor: box.id, title: method.description || "" }, box,
                   el("span", { textContent: method.name }),
                   el("span", { className: "engine", textContent: `${method.engine}${measured}` }));
  const params = el("div", { className: "params" });
  const properties = paramProperties(method.name);
  const order = Object.keys(properties);  // the proto's field order (a map has none)
  const defaults = Object.entries(method.defaults || {})
    .sort(([a], [b]) => order.indexOf(a) - order.indexOf(b));
  for (const [name, text] of defaults) {
    const input = paramInput(method.name, name, text, properties[name] || {});
    input.id = `p-${method.name}-${name}`;
    params.append(el("label", { htmlFor: input.id }, el("span", { textContent: name })), input);
  }
  const sync = () => {
    params.hidden = !box.checked || !params.childElementCount;
    wrap.classList.toggle("chosen", box.checked);
  };
  box.addEventListener("change", () => { sync(); updateRunButton(); });
  sync();
  wrap.append(label, params);
  return wrap;
}

function namedValues(method, name, property) {
  const listed = (state.choices.methods[method] || {})[name];
  if (listed) return listed.map((value) => [value, value]);
  if (name === "layer" && property.type === "string" && state.info) {
    const info = state.info;
    const layers = [["", `default (${info.cam_layer || "the model's CAM layer"})`]];
    for (const output of info.scale_outputs || []) layers.push([output, output]);
    return layers;
  }
  const enumName = property.$ref && property.$ref.split("/").pop();
  const values = enumName && state.schemas[enumName] && state.schemas[enumName].enum;
  return values ? values.filter((v) => v === v.toLowerCase()).map((v) => [v, v]) : null;
}

function paramInput(method, name, text, property) {
  let input;
  const values = namedValues(method, name, property);
  if (values) {
    input = el("select");
    for (const [value, shown] of values) input.add(new Option(shown, value));
    input.value = text;
    input.dataset.kind = "string";
  } else if (property.type === "boolean") {
    input = el("input", { type: "checkbox", checked: text === "True" });
    input.dataset.kind = "boolean";
  } else if (property.type === "array") {
    input = el("input", { type: "text", placeholder: "comma-separated",
                          value: text.replace(/[()[\]]/g, "").replace(/,\s*$/, "") });
    input.dataset.kind = "array";
  } else if (property.type === "string") {
    input = el("input", { type: "text", value: text });
    input.dataset.kind = "string";
  } else {
    input = el("input", { type: "number", value: text, step: "any" });
    input.dataset.kind = "number";
  }
  input.name = name;
  input.dataset.initial = valueOf(input);
  return input;
}

function valueOf(input) {
  if (input.dataset.kind === "boolean") return String(input.checked);
  return input.value;
}

function chosenParams(option) {
  const out = {};
  for (const input of option.querySelectorAll(".params [name]")) {
    const value = valueOf(input);
    if (value === input.dataset.initial) continue;  // unchanged: the server's default
    const kind = input.dataset.kind;
    if (kind === "boolean") out[input.name] = input.checked;
    else if (kind === "number") out[input.name] = Number(value);
    else if (kind === "array") {
      out[input.name] = value.split(",").map((v) => v.trim()).filter(Boolean).map(Number);
    } else out[input.name] = value;
  }
  return out;
}

function selectedMethods() {
  return [...document.querySelectorAll(".method-option")]
    .filter((option) => option.querySelector("input[type=checkbox]").checked);
}

function updateRunButton() {
  const count = selectedMethods().length;
  $("run").disabled = !(state.image && state.info && count);
  $("run-hint").textContent = !state.image ? "choose or generate an image"
    : !count ? "tick one or more methods"
      : `${count} method${count > 1 ? "s" : ""} on ${state.info ? state.info.status.name : ""}`;
}

// ---- the image ---------------------------------------------------------------------------

function showImage(b64, mime, caption, truth) {
  state.image = b64;
  const source = `data:${mime};base64,${b64}`;
  $("input-image").src = source;
  state.imageElement = new Image();
  state.imageElement.src = source;
  $("input-caption").textContent = caption;
  $("truth-figure").hidden = !truth;
  if (truth) $("truth-image").src = `data:image/png;base64,${truth}`;
  $("input-view").hidden = false;
  updateRunButton();
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const [head, data] = String(reader.result).split(",", 2);
    const mime = (head.match(/^data:([^;]+)/) || [])[1] || "image/png";
    showImage(data, mime, file.name, null);
  };
  reader.readAsDataURL(file);
}

async function generateCell() {
  const size = state.info ? Number(state.info.input.shape[2]) : 128;
  const index = Math.max(0, Math.trunc(Number($("cell-index").value)) || 0);
  const cell = await api(`/explorer/cell?index=${index}&size=${size}`);
  showImage(cell.image, "image/png", `cell ${cell.index}: ${cell.label}`, cell.ground_truth);
}

// ---- running methods ---------------------------------------------------------------------

function input() {
  return { images: { images: [state.image] } };
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
}

function tick() {
  const now = performance.now();
  for (const card of document.querySelectorAll(".result.running")) {
    card.querySelector(".elapsed").textContent = formatMs(now - Number(card.dataset.started));
  }
  $("elapsed").textContent = formatMs(now - state.started);
}

function bringResultsIntoView() {
  // Beside the form on wide screens (sticky, in view already); below it on narrow ones.
  const box = $("output").getBoundingClientRect();
  if (NARROW.matches || box.top < 0 || box.top > window.innerHeight * 0.6) {
    $("output").scrollIntoView({ block: "start" });
  }
}

async function run() {
  const methods = selectedMethods();
  if (!methods.length || !state.image) return;
  const runId = ++state.runs;
  const model = $("model").value;
  state.results.clear();
  state.started = performance.now();
  clearInterval(state.timer);
  state.timer = setInterval(tick, 100);
  $("run-status").classList.add("busy");
  setStatus(`predicting on ${model}…`);
  $("prediction").replaceChildren();
  $("results").replaceChildren();
  $("elapsed").textContent = "";
  const cards = methods.map((option) => card(option.dataset.method));
  bringResultsIntoView();
  try {
    const predicted = await api("/api/v1/predict", { model, input: input(), top_k: 5,
                                                     ...resizeField() });
    if (runId !== state.runs) return;
    showPrediction(predicted);
  } catch (error) {
    finish(runId);
    for (const element of cards) fail(element, "not run: the prediction failed");
    showError(error);
    return;
  }
  setStatus(`running ${methods.length} method${methods.length > 1 ? "s" : ""}…`);
  await Promise.all(methods.map((option, i) =>
    explain(cards[i], model, option.dataset.method, chosenParams(option))));
  if (runId !== state.runs) return;
  finish(runId);
  const failed = document.querySelectorAll(".result.failed").length;
  setStatus(failed ? `${failed} of ${methods.length} failed` : `done: ${methods.length} ` +
            `method${methods.length > 1 ? "s" : ""}`, failed > 0);
}

function clearResults() {
  state.runs += 1;  // a run still streaming no longer writes here
  state.results.clear();
  clearInterval(state.timer);
  $("run-status").classList.remove("busy");
  $("prediction").replaceChildren();
  $("results").replaceChildren();
  $("elapsed").textContent = "";
  setStatus(state.welcome);
}

function finish(runId) {
  if (runId !== state.runs) return;
  tick();
  clearInterval(state.timer);
  $("run-status").classList.remove("busy");
}

function resizeField() {
  return $("resize").value ? { resize: $("resize").value } : {};
}

function showPrediction(response) {
  const top = (response.predictions[0] || { top: [] }).top;
  const rows = top.map((score) => {
    const fill = el("span");
    fill.style.width = `${Math.round(score.probability * 100)}%`;
    return el("tr", {},
      el("td", { className: "index", textContent: String(score.index) }),
      el("td", { textContent: score.label }),
      el("td", { className: "probability", title: score.probability.toFixed(3) },
         el("span", { className: "bar" }, fill)),
      el("td", { className: "note", textContent: score.probability.toFixed(3) }));
  });
  const ms = formatMs(response.cost.wall_seconds * 1000);
  const thumbnail = el("img", { className: "thumbnail", alt: "input", src: $("input-image").src });
  $("prediction").replaceChildren(thumbnail, el("div", {},
    el("strong", { textContent: "Prediction" }), " ",
    el("span", { className: "note", textContent: `(${ms})` }), el("table", {}, ...rows)));
}

function card(method) {
  const element = el("article", { className: "result running" });
  element.dataset.method = method;
  element.dataset.updates = "0";
  element.dataset.started = String(performance.now());
  const info = state.info && state.info.methods.find((m) => m.name === method);
  // No value: an indeterminate bar until (and unless) the method reports its steps.
  const bar = el("progress", { max: 1 });
  bar.removeAttribute("value");
  element.append(
    el("h3", {}, el("span", { textContent: method }),
       el("span", { className: "engine", textContent: info ? info.engine : "" }),
       el("span", { className: "elapsed", textContent: "0.0 ms" })),
    el("div", { className: "picture" },
       el("span", { className: "waiting", textContent: "computing…" }),
       el("canvas", { className: "map", hidden: true }),
       el("img", { className: "overlay", alt: `${method} overlay`, hidden: true })),
    bar, el("p", { className: "progress-text note", textContent: "running" }),
    el("p", { className: "explained" }), el("p", { className: "cost" }));
  $("results").append(element);
  return element;
}

async function explain(element, model, method, params) {
  const body = { model, method, input: input(), seed: Number($("seed").value) || 0,
                 return_overlay: true, ...resizeField() };
  if (Object.keys(params).length) body[method] = params;
  if ($("target").value !== "") body.target = { class_index: Number($("target").value) };
  try {
    const response = await fetch("/api/v1/explain/stream",
                                 { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      throw new ApiError(response.status, await response.json().catch(() => null));
    }
    await readEvents(response, (name, data) => onEvent(element, name, data));
    if (element.classList.contains("running")) fail(element, "the stream ended without a result");
  } catch (error) {
    fail(element, error.message);
  }
}

async function readEvents(response, handle) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (name && data) handle(name, JSON.parse(data));
    }
  }
}

function onEvent(element, name, data) {
  if (name === "progress") {
    element.dataset.updates = String(Number(element.dataset.updates) + 1);
    const bar = element.querySelector("progress");
    bar.max = Math.max(1, data.total_steps);
    bar.value = data.step;
    element.querySelector(".progress-text").textContent =
      `step ${data.step}/${data.total_steps} · best fitness ${data.best_fitness.toFixed(3)} · ` +
      `${data.forward_passes} forward passes`;
    if (data.saliency && data.saliency.data) drawMap(element, data.saliency);
  } else if (name === "result") {
    showResult(element, data);
  } else if (name === "error") {
    fail(element, describeError(data.error.code, data));
  }
}

function showResult(element, response) {
  element.classList.replace("running", "done");
  state.results.set(element.dataset.method, response);
  const bar = element.querySelector("progress");
  bar.max = 1;
  bar.value = 1;
  element.querySelector(".waiting").hidden = true;
  const overlay = element.querySelector("img.overlay");
  if (response.overlays && response.overlays.length) {
    overlay.src = `data:image/png;base64,${response.overlays[0]}`;
    overlay.hidden = false;
    element.querySelector("canvas").hidden = true;
  } else {
    drawMap(element, response.saliency);
  }
  const target = response.targets[0];
  const labels = state.info ? state.info.class_labels : [];
  element.querySelector(".explained").textContent =
    `explained class: ${target} ${labels[target] || ""}`;
  const cost = response.cost;
  element.querySelector(".progress-text").textContent = "done";
  element.querySelector(".cost").textContent =
    `cost: ${cost.forward_passes} forward, ${cost.backward_passes} backward, ` +
    `${(cost.wall_seconds * 1000).toFixed(1)} ms${cost.truncated ? " (truncated)" : ""}`;
}

function fail(element, message) {
  element.classList.remove("running");
  element.classList.add("failed");
  const bar = element.querySelector("progress");
  bar.max = 1;
  bar.value = 0;
  element.querySelector(".waiting").textContent = "failed";
  element.querySelector(".progress-text").textContent = "";
  element.querySelector(".cost").textContent = message;
  element.querySelector(".cost").classList.add("error");
}

// ---- drawing -----------------------------------------------------------------------------

// The server's overlay colour map (saliency_service.render.drawing.jet) and its blend, so a
// search's intermediate maps look as its final overlay does.
const OVERLAY_ALPHA = 0.5;

function colour(value) {
  const v = Math.min(1, Math.max(0, value));
  return [3, 2, 1].map((centre) =>
    Math.floor(Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - centre))) * 255));
}

function floats(tensor) {
  const bytes = Uint8Array.from(atob(tensor.data), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

function drawMap(element, tensor) {
  const canvas = element.querySelector("canvas.map");
  const [, height, width] = tensor.shape.map(Number);
  const values = floats(tensor);
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  let base = null;
  if (state.imageElement && state.imageElement.complete && state.imageElement.naturalWidth) {
    context.drawImage(state.imageElement, 0, 0, width, height);
    base = context.getImageData(0, 0, width, height).data;
  }
  const image = context.createImageData(width, height);
  for (let i = 0; i < width * height; i += 1) {
    const heat = colour(values[i]);
    for (let c = 0; c < 3; c += 1) {
      image.data[i * 4 + c] = base
        ? Math.min(255, base[i * 4 + c] * (1 - OVERLAY_ALPHA) + heat[c] * OVERLAY_ALPHA)
        : heat[c];
    }
    image.data[i * 4 + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  canvas.hidden = false;
  element.querySelector(".waiting").hidden = true;
}

// ---- the cost-vs-quality chart -----------------------------------------------------------

function showChart() {
  const chart = $("chart");
  const report = state.report;
  if (!report) { chart.hidden = true; return; }
  chart.hidden = false;
  $("chart-title").textContent = report.title || "Cost vs quality";
  $("chart-plot").replaceChildren(scatter(report.rows));
  chart.scrollIntoView({ block: "nearest" });
}

async function openReport(event) {
  event.preventDefault();  // a plain link sends no token: fetch it, then show it as text
  try {
    const response = await fetch($("report-link").getAttribute("href"), { headers: headers() });
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    const url = URL.createObjectURL(new Blob([await response.text()], { type: "text/plain" }));
    window.open(url, "_blank", "noopener");
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (error) {
    showError(error);
  }
}

function scatter(rows) {
  // Drawn at the width it is shown (at most 880 px), so its text stays legible on a phone.
  const width = Math.round(Math.min(880, Math.max(320, $("chart-plot").clientWidth || 640)));
  const height = Math.round(width * 0.56), pad = 44;
  const xs = rows.map((r) => Math.log10(r.p50_ms));
  const ys = rows.map((r) => r.rcap);
  const [x0, x1] = [Math.floor(Math.min(...xs)), Math.ceil(Math.max(...xs))];
  const [y0, y1] = [0, Math.ceil(Math.max(...ys) * 10) / 10];
  const px = (x) => pad + ((x - x0) / Math.max(1e-9, x1 - x0)) * (width - 2 * pad);
  const py = (y) => height - pad - ((y - y0) / Math.max(1e-9, y1 - y0)) * (height - 1.6 * pad);
  const plot = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
                              "aria-label": "cost versus RCAP" });
  for (let d = x0; d <= x1; d += 1) {
    plot.append(svgEl("line", { x1: px(d), x2: px(d), y1: pad * 0.6, y2: height - pad,
                                stroke: "#e3e6eb" }),
                svgEl("text", { x: px(d), y: height - pad + 16, "text-anchor": "middle" },
                      d < 3 ? `${10 ** d} ms` : `${10 ** (d - 3)} s`));
  }
  for (let y = y0; y <= y1 + 1e-9; y += 0.1) {
    plot.append(svgEl("text", { x: pad - 6, y: py(y) + 4, "text-anchor": "end" }, y.toFixed(1)));
  }
  plot.append(svgEl("text", { x: width / 2, y: height - 8, "text-anchor": "middle" },
                    "p50 ms per image (log)"),
              svgEl("text", { x: 12, y: height / 2, transform: `rotate(-90 12 ${height / 2})`,
                              "text-anchor": "middle" }, "RCAP ↑"));
  const placed = [];  // label boxes so far: a label moves up or down until it overlaps none
  const order = rows.map((row, i) => i).sort((a, b) => Number(rows[b].front) - Number(rows[a].front)
                                             || ys[b] - ys[a]);
  for (const i of order) {
    const row = rows[i];
    const text = `${row.method}${row.front ? " ★" : ""}`;
    const [cx, cy] = [px(xs[i]), py(ys[i])];
    const wide = text.length * 6.4;
    const left = cx + 6 + wide > width ? Math.max(0, cx - 6 - wide) : cx + 6;
    const free = (top) => placed.every(([l, t, w]) => left + wide < l || left > l + w ||
                                                       top + 11 < t || top > t + 11);
    // Crowded points keep their dot and name on hover; the front's names are placed first.
    const top = [0, -11, 11, -22, 22].map((shift) => cy - 9 + shift)
      .find((y) => y > 0 && y + 11 < height - pad && free(y));
    const dot = svgEl("circle", { cx, cy, r: 4, fill: row.front ? "#d9480f" : "#3d6fe0" });
    dot.append(svgEl("title", {}, `${text}: ${row.p50_ms} ms, RCAP ${row.rcap}`));
    plot.append(dot);
    if (top === undefined && !row.front) continue;
    const y = top === undefined ? cy - 9 : top;
    placed.push([left, y, wide]);
    plot.append(svgEl("text", { x: left, y: y + 9, class: row.front ? "front" : "" }, text));
  }
  return plot;
}

// ---- wiring ------------------------------------------------------------------------------

function wire() {
  state.welcome = $("status").textContent.replace(/\s+/g, " ").trim();
  localStorage.removeItem(TOKEN_KEY);  // where earlier versions kept it, beyond the tab
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    setStatus(state.welcome);
    loadModels().catch(showError);
  });
  $("model").addEventListener("change", () => loadModel($("model").value).catch(showError));
  $("file-input").addEventListener("change", (event) => {
    if (event.target.files.length) readFile(event.target.files[0]);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) readFile(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file-input").click(); }
  });
  $("cell-button").addEventListener("click", () => generateCell().catch(showError));
  $("run").addEventListener("click", run);
  $("target").addEventListener("change", () => { if (state.results.size) run(); });
  $("chart-button").addEventListener("click", showChart);
  $("report-link").addEventListener("click", openReport);
  loadModels().catch(retryWhileLoading);
}

function retryWhileLoading(error) {
  if (error.status !== 503) { showError(error); return; }
  setStatus("the server is loading its models…");  // it answers 503 until they are ready
  setTimeout(() => loadModels().then(() => setStatus(state.welcome)).catch(retryWhileLoading),
             2000);
}

wire();

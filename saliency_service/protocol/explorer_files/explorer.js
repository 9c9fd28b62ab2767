// The saliency explorer: one page over the HTTP/JSON API (the proto's JSON mapping).
// GetModel gives the methods and their defaults; /openapi.json gives each parameter's type.
"use strict";

// Every string from the server (labels, names, messages) goes into the page as text:
// elements are built with el()/svgEl() and textContent, never from HTML strings.
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "saliency-token";  // in sessionStorage: this tab only, gone when it closes

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
const state = { schemas: {}, info: null, image: null, results: new Map() };

function headers() {
  const token = $("token").value.trim();
  const out = { "content-type": "application/json" };
  if (token) out.authorization = `Bearer ${token}`;
  return out;
}

async function api(path, body) {
  const options = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(describeError(response.status, data));
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

// ---- models, methods and their parameters ------------------------------------------------

async function loadModels() {
  const spec = await api("/openapi.json");
  state.schemas = spec.components.schemas;
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
  state.info = info;
  const shape = info.input.shape || [];
  $("model-status").textContent =
    `input ${shape.slice(1).join("×")}, ${info.class_labels.length} classes, ` +
    `${info.methods.length} methods`;
  const target = $("target");
  target.replaceChildren(new Option("predicted", ""));
  info.class_labels.forEach((label, index) => target.add(new Option(`${index}: ${label}`, index)));
  const fieldset = $("methods");
  fieldset.replaceChildren(Object.assign(document.createElement("legend"),
                                         { textContent: "Methods" }));
  for (const method of info.methods) fieldset.append(methodOption(method));
  updateRunButton();
}

function paramProperties(method) {
  const request = state.schemas.ExplainRequest;
  const ref = request && request.properties[method] && request.properties[method].$ref;
  const schema = ref ? state.schemas[ref.split("/").pop()] : null;
  return schema ? schema.properties : {};
}

function methodOption(method) {
  const wrap = document.createElement("div");
  wrap.className = "method-option";
  wrap.dataset.method = method.name;
  const box = Object.assign(document.createElement("input"),
                            { type: "checkbox", value: method.name, id: `m-${method.name}` });
  const label = document.createElement("label");
  label.htmlFor = box.id;
  const measured = method.mean_seconds > 0 ? `, ~${(method.mean_seconds * 1000).toFixed(0)} ms` : "";
  label.append(method.name, " ", el("span", { className: "engine",
                                             textContent: `${method.engine}${measured}` }));
  label.title = method.description || "";
  const params = document.createElement("div");
  params.className = "params";
  params.hidden = true;
  const properties = paramProperties(method.name);
  const order = Object.keys(properties);  // the proto's field order (a map has none)
  const defaults = Object.entries(method.defaults || {})
    .sort(([a], [b]) => order.indexOf(a) - order.indexOf(b));
  for (const [name, text] of defaults) {
    params.append(Object.assign(document.createElement("span"), { textContent: name }));
    params.append(paramInput(name, text, properties[name] || {}));
  }
  box.addEventListener("change", () => {
    params.hidden = !box.checked || !params.childElementCount;
    updateRunButton();
  });
  wrap.append(box, label, params);
  return wrap;
}

function paramInput(name, text, property) {
  let input;
  const enumName = property.$ref && property.$ref.split("/").pop();
  if (enumName && state.schemas[enumName] && state.schemas[enumName].enum) {
    input = document.createElement("select");
    for (const value of state.schemas[enumName].enum) {
      if (value === value.toLowerCase()) input.add(new Option(value, value));
    }
    input.value = text;
    input.dataset.kind = "enum";
  } else if (property.type === "boolean") {
    input = Object.assign(document.createElement("input"), { type: "checkbox" });
    input.checked = text === "True";
    input.dataset.kind = "boolean";
  } else if (property.type === "array") {
    input = Object.assign(document.createElement("input"), { type: "text" });
    input.value = text.replace(/[()[\]]/g, "").replace(/,\s*$/, "");
    input.placeholder = "comma-separated";
    input.dataset.kind = "array";
  } else if (property.type === "string") {
    input = Object.assign(document.createElement("input"), { type: "text", value: text });
    input.dataset.kind = "string";
  } else {
    input = Object.assign(document.createElement("input"), { type: "number", value: text,
                                                             step: "any" });
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
  $("run").disabled = !(state.image && state.info && selectedMethods().length);
}

// ---- the image ---------------------------------------------------------------------------

function showImage(b64, caption, truth) {
  state.image = b64;
  $("input-image").src = `data:image/png;base64,${b64}`;
  $("input-caption").textContent = caption;
  $("truth-figure").hidden = !truth;
  if (truth) $("truth-image").src = `data:image/png;base64,${truth}`;
  $("input-view").hidden = false;
  updateRunButton();
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => showImage(String(reader.result).split(",", 2)[1], file.name, null);
  reader.readAsDataURL(file);
}

async function generateCell() {
  const size = state.info ? state.info.input.shape[2] : 128;
  const index = Math.max(0, Number($("cell-index").value) || 0);
  const cell = await api(`/explorer/cell?index=${index}&size=${size}`);
  showImage(cell.image, `cell ${cell.index}: ${cell.label}`, cell.ground_truth);
}

// ---- running methods ---------------------------------------------------------------------

function input() {
  return { images: { images: [state.image] } };
}

async function run() {
  const methods = selectedMethods();
  if (!methods.length || !state.image) return;
  const model = $("model").value;
  setStatus("running…");
  $("results").replaceChildren();
  try {
    const predicted = await api("/api/v1/predict", { model, input: input(), top_k: 5 });
    showPrediction(predicted);
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  const runs = methods.map((option) => explain(model, option.dataset.method, chosenParams(option)));
  await Promise.all(runs);
  const failed = document.querySelectorAll(".result.failed").length;
  setStatus(failed ? `${failed} method(s) failed` : "done", failed > 0);
}

function showPrediction(response) {
  const top = (response.predictions[0] || { top: [] }).top;
  const rows = top.map((score) => el("tr", {},
    el("td", { textContent: String(score.index) }), el("td", { textContent: score.label }),
    el("td", { textContent: score.probability.toFixed(3) })));
  const ms = (response.cost.wall_seconds * 1000).toFixed(1);
  $("prediction").replaceChildren(el("strong", { textContent: "Prediction" }), " ",
    el("span", { className: "note", textContent: `(${ms} ms)` }), el("table", {}, ...rows));
}

function card(method) {
  const element = document.createElement("article");
  element.className = "result running";
  element.dataset.method = method;
  element.dataset.updates = "0";
  element.append(el("h3", { textContent: method }), el("progress", { max: 1, value: 0 }),
    el("p", { className: "progress-text note" }), el("canvas", { className: "map", hidden: true }),
    el("img", { className: "overlay", alt: `${method} overlay`, hidden: true }),
    el("p", { className: "explained" }), el("p", { className: "cost" }));
  $("results").append(element);
  return element;
}

async function explain(model, method, params) {
  const element = card(method);
  const body = { model, method, input: input(), seed: Number($("seed").value) || 0,
                 return_overlay: true };
  if (Object.keys(params).length) body[method] = params;
  if ($("target").value !== "") body.target = { class_index: Number($("target").value) };
  try {
    const response = await fetch("/api/v1/explain/stream",
                                 { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(describeError(response.status, await response.json()));
    await readEvents(response, (name, data) => onEvent(element, name, data));
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
    if (data.saliency && data.saliency.data) drawMap(element.querySelector("canvas"), data.saliency);
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
  const overlay = element.querySelector("img.overlay");
  if (response.overlays && response.overlays.length) {
    overlay.src = `data:image/png;base64,${response.overlays[0]}`;
    overlay.hidden = false;
    element.querySelector("canvas").hidden = true;
  } else {
    drawMap(element.querySelector("canvas"), response.saliency);
  }
  const target = response.targets[0];
  const labels = state.info ? state.info.class_labels : [];
  element.querySelector(".explained").textContent =
    `explained class: ${target} ${labels[target] || ""}`;
  const cost = response.cost;
  element.querySelector(".cost").textContent =
    `cost: ${cost.forward_passes} forward, ${cost.backward_passes} backward, ` +
    `${(cost.wall_seconds * 1000).toFixed(1)} ms${cost.truncated ? " (truncated)" : ""}`;
}

function fail(element, message) {
  element.classList.remove("running");
  element.classList.add("failed");
  element.querySelector(".cost").textContent = message;
  element.querySelector(".cost").classList.add("error");
}

// ---- drawing -----------------------------------------------------------------------------

const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

function colour(value) {
  const position = Math.min(1, Math.max(0, value)) * (STOPS.length - 1);
  const low = Math.floor(position);
  const high = Math.min(STOPS.length - 1, low + 1);
  const t = position - low;
  return STOPS[low].map((c, i) => Math.round(c + (STOPS[high][i] - c) * t));
}

function floats(tensor) {
  const bytes = Uint8Array.from(atob(tensor.data), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

function drawMap(canvas, tensor) {
  const [, height, width] = tensor.shape.map(Number);
  const values = floats(tensor);
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  for (let i = 0; i < width * height; i += 1) {
    const [r, g, b] = colour(values[i]);
    image.data.set([r, g, b, 255], i * 4);
  }
  context.putImageData(image, 0, 0);
  canvas.hidden = false;
}

async function showChart() {
  const chart = $("chart");
  chart.hidden = false;
  let report;
  try {
    report = await api("/explorer/evaluation");
  } catch (error) {
    $("chart-plot").textContent = error.message;
    return;
  }
  $("chart-title").textContent = report.title || "Cost vs quality";
  $("chart-plot").replaceChildren(scatter(report.rows));
  chart.scrollIntoView();
}

function scatter(rows) {
  const width = 640, height = 360, pad = 48;
  const xs = rows.map((r) => Math.log10(r.p50_ms));
  const ys = rows.map((r) => r.rcap);
  const [x0, x1] = [Math.floor(Math.min(...xs)), Math.ceil(Math.max(...xs))];
  const [y0, y1] = [0, Math.ceil(Math.max(...ys) * 10) / 10];
  const px = (x) => pad + ((x - x0) / Math.max(1e-9, x1 - x0)) * (width - 2 * pad);
  const py = (y) => height - pad - ((y - y0) / Math.max(1e-9, y1 - y0)) * (height - 2 * pad);
  const plot = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                              "aria-label": "cost versus RCAP" });
  for (let d = x0; d <= x1; d += 1) {
    plot.append(svgEl("line", { x1: px(d), x2: px(d), y1: pad, y2: height - pad,
                                stroke: "#e3e6eb" }),
                svgEl("text", { x: px(d), y: height - pad + 16, "text-anchor": "middle" },
                      `${10 ** d} ms`));
  }
  for (let y = y0; y <= y1 + 1e-9; y += 0.1) {
    plot.append(svgEl("text", { x: pad - 6, y: py(y) + 4, "text-anchor": "end" }, y.toFixed(1)));
  }
  plot.append(svgEl("text", { x: width / 2, y: height - 8, "text-anchor": "middle" },
                    "p50 ms per image (log)"),
              svgEl("text", { x: 12, y: height / 2, transform: `rotate(-90 12 ${height / 2})`,
                              "text-anchor": "middle" }, "RCAP ↑"));
  rows.forEach((row, i) => {
    plot.append(svgEl("circle", { cx: px(xs[i]), cy: py(ys[i]), r: 4,
                                  fill: row.front ? "#d9480f" : "#3d6fe0" }),
                svgEl("text", { x: px(xs[i]) + 6, y: py(ys[i]) - 4 },
                      `${row.method}${row.front ? " ★" : ""}`));
  });
  return plot;
}

// ---- wiring ------------------------------------------------------------------------------

function wire() {
  localStorage.removeItem(TOKEN_KEY);  // where earlier versions kept it, beyond the tab
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    loadModels().catch((error) => setStatus(error.message, true));
  });
  $("model").addEventListener("change", () => loadModel($("model").value)
    .catch((error) => setStatus(error.message, true)));
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
  $("cell-button").addEventListener("click", () => generateCell()
    .catch((error) => setStatus(error.message, true)));
  $("run").addEventListener("click", run);
  $("target").addEventListener("change", () => { if (state.results.size) run(); });
  $("chart-button").addEventListener("click", showChart);
  loadModels().catch((error) => setStatus(error.message, true));
}

wire();

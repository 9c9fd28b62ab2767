// The saliency explorer: one page over the HTTP/JSON API (the proto's JSON mapping).
// GetModel gives the methods and their defaults; /openapi.json each parameter's type;
// /explorer/choices the named values a parameter takes (offered as a list). For a detector or
// a segmenter, Predict's boxes or class map are drawn over the image as the model sees it, and
// a click on a box or a pixel explains that detection or that class's region.
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
  scene: null,  // a detector's or segmenter's prediction on the image, drawn over it
  pick: null,  // the detection or region clicked: what the methods explain
  scenes: 0,  // predictions asked for the scene; an older answer is dropped
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
  const kind = denseKind(info);
  $("model-status").textContent =
    `input ${shape.slice(1).join("×")} · ${kind ? `${KIND_NAMES[kind]} · ` : ""}` +
    `${info.class_labels.length} classes · ${info.methods.length} methods`;
  const target = $("target");
  $("target-name").textContent = `Explained ${kind ? TARGET_NAMES[kind] : "class"}`;
  $("cell-label").textContent = kind ? "or generated scene" : "or synthetic cell";
  if (kind) {
    target.replaceChildren(new Option(`the ${TARGET_NAMES[kind]} clicked on the image`, "pick"),
                           new Option(`every ${TARGET_NAMES[kind]}, one map each`, "all"));
  } else {
    target.replaceChildren(new Option("predicted class", ""));
    info.class_labels.forEach((label, index) =>
      target.add(new Option(`${index}: ${label}`, index)));
  }
  const resize = $("resize");
  resize.replaceChildren(new Option(`model's default (${info.input.resize || "stretch"})`, ""));
  for (const mode of state.choices.resize || []) resize.add(new Option(mode.replace("_", " "), mode));
  const chosen = new Set(selectedMethods().map((option) => option.dataset.method));
  $("methods").replaceChildren(...info.methods.map((method) => methodOption(method, chosen)));
  updateRunButton();
  loadReport(name);
  refreshScene().catch(showError);
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
  const kind = denseKind(state.info);
  const unpicked = Boolean(kind) && $("target").value === "pick" && !state.pick;
  $("run").disabled = !(state.image && state.info && count) || unpicked;
  $("run-hint").textContent = !state.image ? "choose or generate an image"
    : !count ? "tick one or more methods"
      : unpicked ? `click a ${TARGET_NAMES[kind]} on the image, or explain every one`
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
  refreshScene().catch(showError);
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
  const size = state.info ? inputSize()[0] : 128;
  const index = Math.max(0, Math.trunc(Number($("cell-index").value)) || 0);
  if (denseKind(state.info)) {  // a scene with known objects, at least 32 px
    const scene = await api(`/explorer/scene?index=${index}&size=${Math.max(32, size)}`);
    const names = scene.objects.map((object) => object.label).join(", ");
    showImage(scene.image, "image/png", `scene ${scene.index}: ${names}`, scene.ground_truth);
    return;
  }
  const cell = await api(`/explorer/cell?index=${index}&size=${size}`);
  showImage(cell.image, "image/png", `cell ${cell.index}: ${cell.label}`, cell.ground_truth);
}

// ---- a detector's or segmenter's scene ---------------------------------------------------

const KIND_NAMES = { detection: "detector", segmentation: "segmenter" };
const TARGET_NAMES = { detection: "detection", segmentation: "region" };
const NO_CLASS = 255;  // a class map's pixel where no class reaches 0.5 (sigmoid segmenters)
const CLASS_COLOURS = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                       [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                       [188, 189, 34], [23, 190, 207]];
const LAYER_ALPHA = 0.45;  // the class map over the image; the picked class stands out

function denseKind(info) {
  const kind = info ? info.output_kind || "" : "";
  return kind.startsWith("detection") ? "detection" : kind === "segmentation" ? kind : "";
}

function inputSize() {
  const shape = (state.info.input.shape || []).map(Number);
  return state.info.input.layout === "NHWC" ? [shape[1], shape[2]] : [shape[2], shape[3]];
}

function resizeMode() {
  return $("resize").value || state.info.input.resize || "stretch";
}

function classColour(index) {
  return CLASS_COLOURS[index % CLASS_COLOURS.length];
}

function targetField() {
  // The request's target: {} for the server's default, null while a click is awaited.
  const kind = denseKind(state.info);
  const value = $("target").value;
  if (!kind) return value === "" ? {} : { target: { class_index: Number(value) } };
  if (value === "all") return kind === "detection" ? { target: { min_score: 0 } } : {};
  if (!state.pick) return null;
  if (kind === "detection") {
    const { box, class_index: classIndex } = state.pick.detection;
    return { target: { detection: { box, class_index: classIndex } } };
  }
  return { target: { region: { class_index: state.pick.classIndex } } };
}

function placement(imageWidth, imageHeight, width, height, mode) {
  // Where the image goes in the model's input (protocol/inputs.placement), as drawImage's
  // source and destination rectangles.
  if (mode === "center_crop") {
    const scale = Math.max(height / imageHeight, width / imageWidth);
    const cropHeight = Math.min(imageHeight, Math.max(1, Math.round(height / scale)));
    const cropWidth = Math.min(imageWidth, Math.max(1, Math.round(width / scale)));
    return [Math.floor((imageWidth - cropWidth) / 2), Math.floor((imageHeight - cropHeight) / 2),
            cropWidth, cropHeight, 0, 0, width, height];
  }
  if (mode === "letterbox") {
    const scale = Math.min(height / imageHeight, width / imageWidth);
    const fitHeight = Math.min(height, Math.max(1, Math.round(imageHeight * scale)));
    const fitWidth = Math.min(width, Math.max(1, Math.round(imageWidth * scale)));
    return [0, 0, imageWidth, imageHeight, Math.floor((width - fitWidth) / 2),
            Math.floor((height - fitHeight) / 2), fitWidth, fitHeight];
  }
  return [0, 0, imageWidth, imageHeight, 0, 0, width, height];
}

async function refreshScene() {
  // Predict on the image and draw what the model found over the image as the model sees it.
  const asked = ++state.scenes;
  const kind = denseKind(state.info);
  state.scene = null;
  state.pick = null;
  $("scene").hidden = !(kind && state.image);
  updateRunButton();
  if ($("scene").hidden) return;
  $("scene-hint").textContent = "finding what the model sees…";
  $("scene-boxes").replaceChildren();
  $("scene-legend").replaceChildren();
  const model = state.info.status.name;
  let predicted;
  try {
    predicted = await api("/api/v1/predict", { model, input: input(), ...resizeField() });
  } catch (error) {
    if (asked === state.scenes) $("scene-hint").textContent = "the prediction failed";
    throw error;
  }
  await state.imageElement.decode().catch(() => null);  // drawn black if it cannot be decoded
  if (asked !== state.scenes) return;  // another image, model or fit was chosen meanwhile
  const [height, width] = inputSize();
  state.scene = { kind, height, width, detections: [], classMap: null };
  if (kind === "detection") {
    state.scene.detections = ((predicted.detections || [])[0] || {}).detections || [];
  } else {
    const tensor = predicted.class_map;
    state.scene.height = Number(tensor.shape[1]);
    state.scene.width = Number(tensor.shape[2]);
    state.scene.classMap = Uint8Array.from(atob(tensor.data), (c) => c.charCodeAt(0));
  }
  drawScene();
}

function drawScene() {
  const scene = state.scene;
  const canvas = $("scene-canvas");
  canvas.width = scene.width;
  canvas.height = scene.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "#000";
  context.fillRect(0, 0, scene.width, scene.height);
  const image = state.imageElement;
  if (image.naturalWidth) {
    context.drawImage(image, ...placement(image.naturalWidth, image.naturalHeight,
                                          scene.width, scene.height, resizeMode()));
  }
  if (scene.kind === "detection") drawDetections(scene);
  else drawRegions(scene, context);
}

function drawDetections(scene) {
  const count = scene.detections.length;
  $("scene-hint").textContent = count
    ? `${count} detection${count > 1 ? "s" : ""}: click one to explain it`
    : "the model detects nothing in this image";
  // Larger boxes first, so a box inside another stays on top and clickable.
  const area = ({ box }) => (box.x2 - box.x1) * (box.y2 - box.y1);
  const order = scene.detections.map((d, i) => i)
    .sort((a, b) => area(scene.detections[b]) - area(scene.detections[a]));
  $("scene-boxes").replaceChildren(...order.map((index) => boxButton(scene, index)));
  $("scene-legend").replaceChildren(...scene.detections.map((detection, index) => {
    const text = `${detection.label} ${Number(detection.score).toFixed(3)}`;
    return legendItem(detection.class_index, text, index === (state.pick || {}).index,
                      () => pickDetection(index));
  }));
}

function boxButton(scene, index) {
  const detection = scene.detections[index];
  const { x1, y1, x2, y2 } = detection.box;
  const text = `${detection.label} ${Number(detection.score).toFixed(2)}`;
  const button = el("button", { type: "button", className: "box", title: `explain ${text}` },
                    el("span", { textContent: text }));
  button.dataset.index = String(index);
  const percent = (value, total) => `${(100 * Math.min(total, Math.max(0, value))) / total}%`;
  Object.assign(button.style, {
    left: percent(x1, scene.width), top: percent(y1, scene.height),
    width: percent(x2 - x1, scene.width), height: percent(y2 - y1, scene.height),
  });
  button.style.setProperty("--colour", `rgb(${classColour(detection.class_index).join(" ")})`);
  button.classList.toggle("picked", index === (state.pick || {}).index);
  button.addEventListener("click", () => pickDetection(index));
  return button;
}

function drawRegions(scene, context) {
  const { width, height, classMap } = scene;
  const picked = state.pick ? state.pick.classIndex : -1;
  const pixels = context.getImageData(0, 0, width, height);
  const counts = new Map();
  for (let i = 0; i < width * height; i += 1) {
    const value = classMap[i];
    if (value === NO_CLASS) continue;
    counts.set(value, (counts.get(value) || 0) + 1);
    const alpha = picked < 0 ? LAYER_ALPHA : value === picked ? 0.7 : 0.15;
    const colour = classColour(value);
    for (let c = 0; c < 3; c += 1) {
      pixels.data[i * 4 + c] = pixels.data[i * 4 + c] * (1 - alpha) + colour[c] * alpha;
    }
  }
  context.putImageData(pixels, 0, 0);
  $("scene-hint").textContent = counts.size
    ? "click a pixel, or a class below, to explain that class's region"
    : "the model finds no class in this image";
  const labels = state.info.class_labels;
  $("scene-legend").replaceChildren(...[...counts.keys()].sort((a, b) => a - b).map((value) =>
    legendItem(value, `${value}: ${labels[value] || ""} · ${counts.get(value)} px`,
               value === picked, () => pickRegion(value))));
}

function legendItem(classIndex, text, picked, onPick) {
  const swatch = el("span", { className: "swatch" });
  swatch.style.background = `rgb(${classColour(classIndex).join(" ")})`;
  const button = el("button", { type: "button", className: "legend-item" }, swatch,
                    el("span", { textContent: text }));
  button.classList.toggle("picked", picked);
  button.addEventListener("click", onPick);
  return el("li", {}, button);
}

function pickDetection(index) {
  state.pick = { index, detection: state.scene.detections[index] };
  explainPick();
}

function pickRegion(classIndex) {
  state.pick = { classIndex };
  explainPick();
}

function pickPixel(event) {
  const scene = state.scene;
  if (!scene || !scene.classMap) return;
  const box = $("scene-canvas").getBoundingClientRect();
  const at = (offset, size, cells) =>
    Math.min(cells - 1, Math.max(0, Math.floor((offset / size) * cells)));
  const x = at(event.clientX - box.left, box.width, scene.width);
  const y = at(event.clientY - box.top, box.height, scene.height);
  const value = scene.classMap[y * scene.width + x];
  if (value === NO_CLASS) {
    setStatus(`no class reaches probability 0.5 at pixel (${x}, ${y}): click a coloured pixel`);
    return;
  }
  pickRegion(value);
}

function explainPick() {
  $("target").value = "pick";
  drawScene();
  updateRunButton();
  if (selectedMethods().length) run();
  else setStatus(`tick one or more methods to explain this ${TARGET_NAMES[state.scene.kind]}`);
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
  const target = targetField();
  if (!methods.length || !state.image || !target) return;
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
  // A detector's or segmenter's prediction is the scene drawn over the image already.
  if (!denseKind(state.info) && !await predictClasses(runId, model, cards)) return;
  setStatus(`running ${methods.length} method${methods.length > 1 ? "s" : ""}…`);
  await Promise.all(methods.map((option, i) =>
    explain(cards[i], model, option.dataset.method, chosenParams(option), target)));
  if (runId !== state.runs) return;
  finish(runId);
  const failed = document.querySelectorAll(".result.failed").length;
  setStatus(failed ? `${failed} of ${methods.length} failed` : `done: ${methods.length} ` +
            `method${methods.length > 1 ? "s" : ""}`, failed > 0);
}

async function predictClasses(runId, model, cards) {
  try {
    const predicted = await api("/api/v1/predict", { model, input: input(), top_k: 5,
                                                     ...resizeField() });
    if (runId === state.runs) showPrediction(predicted);
    return runId === state.runs;
  } catch (error) {
    finish(runId);
    for (const element of cards) fail(element, "not run: the prediction failed");
    showError(error);
    return false;
  }
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

async function explain(element, model, method, params, target) {
  const body = { model, method, input: input(), seed: Number($("seed").value) || 0,
                 return_overlay: true, ...resizeField(), ...target };
  if (Object.keys(params).length) body[method] = params;
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
  if (response.explained && response.explained.length) {
    showTargets(element, response);
  } else {
    showClassMap(element, response);
  }
  const cost = response.cost;
  element.querySelector(".progress-text").textContent = "done";
  element.querySelector(".cost").textContent =
    `cost: ${cost.forward_passes} forward, ${cost.backward_passes} backward, ` +
    `${(cost.wall_seconds * 1000).toFixed(1)} ms${cost.truncated ? " (truncated)" : ""}`;
}

function showClassMap(element, response) {
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
}

function showTargets(element, response) {
  // A detector's or segmenter's answer: one map per detection or region, each overlay with
  // its box outlined by the server, listed with what it explains.
  const kind = denseKind(state.info) || "detection";
  const overlays = response.overlays || [];
  const list = el("ol", { className: "maps" });
  response.explained.forEach((target, index) => {
    const item = el("li", {});
    if (overlays[index]) {
      item.append(el("img", { className: "overlay", alt: `map ${index + 1}`,
                              src: `data:image/png;base64,${overlays[index]}` }));
    }
    item.append(el("span", { className: "target-text", textContent: describeTarget(target) }));
    list.append(item);
  });
  const picture = element.querySelector(".picture");
  if (overlays.length) picture.hidden = true;
  else drawMap(element, response.saliency);  // the first map, when the server sent no overlay
  picture.after(list);
  const count = response.explained.length;
  element.querySelector(".explained").textContent = count === 1
    ? `explained ${TARGET_NAMES[kind]}: ${describeTarget(response.explained[0])}`
    : `explained ${count} ${TARGET_NAMES[kind]}s, one map each`;
}

function describeTarget(target) {
  const head = `${target.label || ""} (class ${target.class_index || 0})`;
  const score = Number(target.score || 0).toFixed(3);
  if (Number(target.region_pixels || 0) > 0) {
    return `${head} · ${target.region_pixels} px · mean probability ${score}`;
  }
  return `${head} · score ${score} · box ${boxText(target.box)}`;
}

function boxText(box) {
  const value = (name) => Math.round(Number((box || {})[name] || 0));
  return `(${value("x1")}, ${value("y1")})–(${value("x2")}, ${value("y2")})`;
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
  $("target").addEventListener("change", () => {
    if (state.scene) drawScene();
    updateRunButton();
    if (state.results.size) run();
  });
  $("resize").addEventListener("change", () => refreshScene().catch(showError));
  $("scene-canvas").addEventListener("click", pickPixel);
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

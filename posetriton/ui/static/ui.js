// posetriton ui: photos and a live camera, drawn from the JSON the app returns. No framework, no build step.
"use strict";

// Keypoints below this confidence are not drawn (the CLI's --kpt-threshold default).
const KPT_THRESHOLD = 0.5;
// Camera: frames sent and not yet answered, at most; more would only queue up and add latency.
const MAX_IN_FLIGHT = 2;
const CAPTURE_FPS = 15;
const CAPTURE_MAX_SIDE = 640;
const JPEG_QUALITY = 0.8;
// Request-parameter sliders: the declarations give ranges, not how finely a person sets a value.
const SLIDER_STEP = { float: 0.05, int: 1 };
// A slider bounded by a per-model limit (max_det) stops here, or here when the model states no limit.
const LIMIT_SLIDER_MAX = 300;
const LIMIT_SLIDER_FALLBACK = 100;

const $ = (id) => document.getElementById(id);
// parameters: the app's description of each request parameter (posetriton.core.contract's describe()).
const state = { models: [], model: null, photos: [], config: null, parameters: [] };

// ------------------------------------------------------------------------------------------ drawing

function personColour(index) {
  return `hsl(${(index * 137.508) % 360}, 90%, 55%)`;
}

// Draw boxes, skeletons and labels for `detections` on `canvas`, sized to the image the server saw.
// Line widths and text are set in screen pixels, so a 4K photo and a thumbnail look alike.
function drawPoses(canvas, width, height, detections, skeleton, label) {
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const px = width / (canvas.getBoundingClientRect().width || width); // image pixels per screen pixel
  const line = 2.5 * px;
  ctx.lineJoin = "round";
  ctx.lineCap = "round";
  detections.forEach((det, i) => {
    const colour = personColour(det.track_id ?? i);
    const [x1, y1, x2, y2] = det.box;
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1.5 * px;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const kp = det.keypoints;
    ctx.lineWidth = line;
    for (const [a, b] of skeleton) {
      if (kp[a][2] < KPT_THRESHOLD || kp[b][2] < KPT_THRESHOLD) continue;
      ctx.beginPath();
      ctx.moveTo(kp[a][0], kp[a][1]);
      ctx.lineTo(kp[b][0], kp[b][1]);
      ctx.stroke();
    }
    ctx.fillStyle = colour;
    for (const [x, y, c] of kp) {
      if (c < KPT_THRESHOLD) continue;
      ctx.beginPath();
      ctx.arc(x, y, 3.5 * px, 0, 2 * Math.PI);
      ctx.fill();
    }
    const text = label(det, i);
    const size = 13 * px;
    ctx.font = `600 ${size}px system-ui, sans-serif`;
    const textWidth = ctx.measureText(text).width;
    const top = Math.max(0, y1 - size - 4 * px);
    ctx.fillRect(x1, top, textWidth + 6 * px, size + 4 * px);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x1 + 3 * px, top + size);
  });
}

// ---------------------------------------------------------------------------------- request parameters

// One control per described parameter, its id the parameter's name: a slider when it is bounded (a range, or
// a per-model limit), else a number box whose empty value means the model's default. The tracker's own
// parameters sit with the camera. `onChange(description)` runs when the user moves one.
function buildParameterControls(descriptions, onChange) {
  state.parameters = descriptions;
  for (const description of descriptions) {
    const { name, type, minimum, maximum, exclusive_minimum: exclusive, limit, help, range } = description;
    const label = document.createElement("label");
    label.title = `${help}, ${range}`;
    const input = document.createElement("input");
    input.id = name;
    if (maximum != null || limit != null) {
      const step = SLIDER_STEP[type] || SLIDER_STEP.float;
      Object.assign(input, { type: "range", step, min: (minimum ?? 0) + (exclusive ? step : 0) });
      input.max = maximum ?? LIMIT_SLIDER_FALLBACK;
      const output = document.createElement("output");
      output.id = `${name}-value`;
      label.append(`${name.replaceAll("_", " ")} `, output, input);
    } else {
      Object.assign(input, { type: "number", step: "any", placeholder: "model's" });
      if (minimum != null) input.min = minimum;
      label.append(`${name.replaceAll("_", " ")} `, input);
    }
    input.addEventListener("input", () => {
      showParameter(name);
      onChange(description);
    });
    $(description.tracking_only ? "tracking-parameters" : "parameters").append(label);
  }
}

function showParameter(name) {
  const output = $(`${name}-value`);
  if (output) output.textContent = $(name).value;
}

// The values set, by parameter name; the tracker's own only `withTracking` (they mean nothing to a photo).
function chosenParameters(withTracking) {
  const chosen = {};
  for (const { name, tracking_only: trackingOnly } of state.parameters) {
    const value = $(name).value;
    if (value !== "" && (withTracking || !trackingOnly)) chosen[name] = Number(value);
  }
  return chosen;
}

// --------------------------------------------------------------------------------------- models, sliders

function currentModel() {
  return state.models.find((m) => m.name === state.model) || null;
}

function showBanner(message) {
  $("banner").textContent = message;
  $("banner").hidden = !message;
}

async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON: fall through */ }
  return `the app answered HTTP ${response.status}`;
}

function applyDefaults(model) {
  $("camera-track").disabled = !(model && model.tracking);
  $("camera-track").checked = Boolean(model && model.tracking);
  const defaults = (model && model.defaults) || {};
  const limits = (model && model.limits) || {};
  for (const { name, limit } of state.parameters) {
    const input = $(name);
    if (limit != null && input.type === "range") {
      input.max = Math.min(limits[limit] ?? LIMIT_SLIDER_FALLBACK, LIMIT_SLIDER_MAX);
    }
    if (defaults[name] != null) input.value = defaults[name];
    else if (input.type !== "range") input.value = ""; // the model's default, which it does not state
    showParameter(name);
  }
}

async function loadModels() {
  let response;
  try {
    state.config = await (await fetch("/api/config")).json();
    buildParameterControls(state.config.parameters || [], onParameterChange);
    response = await fetch("/api/models");
  } catch (error) {
    showBanner(`cannot reach the posetriton ui app: ${error}`);
    return;
  }
  if (!response.ok) {
    showBanner(await readError(response));
    return;
  }
  const body = await response.json();
  state.models = body.models;
  const select = $("model");
  select.replaceChildren(...body.models.map((m) => new Option(`${m.name}${m.tracking ? " (tracking)" : ""}`, m.name)));
  if (!body.models.length) {
    showBanner("the Triton server has no pose model ready");
    return;
  }
  state.model = body.models.some((m) => m.name === body.default) ? body.default : body.models[0].name;
  select.value = state.model;
  applyDefaults(currentModel());
  showBanner("");
  document.body.dataset.ready = "true";
}

// ----------------------------------------------------------------------------------------------- photos

function addPhotos(files) {
  for (const file of files) {
    const card = $("photo-card").content.firstElementChild.cloneNode(true);
    const photo = { file, card, url: URL.createObjectURL(file), generation: 0, controller: null };
    card.querySelector(".name").textContent = file.name;
    const img = card.querySelector("img");
    img.alt = file.name;
    img.addEventListener("error", () => img.classList.add("broken"));
    img.src = photo.url;
    $("gallery").append(card);
    state.photos.push(photo);
    runPhoto(photo);
  }
}

async function runPhoto(photo) {
  const model = currentModel();
  if (!model) return;
  if (photo.controller) photo.controller.abort();
  const generation = ++photo.generation;
  photo.controller = new AbortController();
  const { card } = photo;
  card.dataset.state = "pending";
  const limit = state.config && state.config.max_upload_bytes;
  if (limit && photo.file.size > limit) {
    // The app refuses it from its Content-Length anyway; saying so here saves sending it.
    const size = (photo.file.size / 2 ** 20).toFixed(1);
    showPhotoError(photo, `the upload is too large (${size} MiB); the limit is ${limit / 2 ** 20} MiB`);
    return;
  }
  const query = new URLSearchParams({ model: model.name, ...chosenParameters(false) });
  const started = performance.now();
  let response, result, error;
  await takeUploadSlot(); // the app analyses max_uploads photos at once and answers 503 beyond: queue here
  try {
    response = await fetch(`/api/predict?${query}`, {
      method: "POST",
      body: photo.file,
      headers: { "Content-Type": photo.file.type || "application/octet-stream" },
      signal: photo.controller.signal,
    });
    result = response.ok ? await response.json() : null;
    error = response.ok ? null : await readError(response);
  } catch (failure) {
    if (failure.name !== "AbortError") showPhotoError(photo, `the request failed: ${failure.message}`);
    return;
  } finally {
    giveUploadSlot();
  }
  if (generation !== photo.generation) return; // a newer request (slider moved) owns this card now
  if (error) {
    showPhotoError(photo, error);
    return;
  }
  const total = performance.now() - started;
  const canvas = card.querySelector("canvas");
  drawPoses(canvas, result.width, result.height, result.detections, model.skeleton, (det) => det.score.toFixed(2));
  const people = result.detections.length;
  card.dataset.people = String(people);
  card.dataset.width = String(result.width);
  card.dataset.height = String(result.height);
  card.querySelector(".summary").textContent =
    `${people} ${people === 1 ? "person" : "people"} · ${result.width}×${result.height} · ` +
    `${Math.round(total)} ms (Triton ${Math.round(result.latency_ms)} ms) · ${result.model}`;
  card.querySelector(".message").textContent = "";
  card.dataset.state = "done";
}

const uploadSlots = { free: null, waiting: [] };

async function takeUploadSlot() {
  if (uploadSlots.free === null) uploadSlots.free = (state.config && state.config.max_uploads) || 4;
  if (uploadSlots.free > 0) {
    uploadSlots.free -= 1;
    return;
  }
  await new Promise((resolve) => uploadSlots.waiting.push(resolve));
}

function giveUploadSlot() {
  const next = uploadSlots.waiting.shift();
  if (next) next();
  else uploadSlots.free += 1;
}

function showPhotoError(photo, message) {
  const { card } = photo;
  const canvas = card.querySelector("canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  card.dataset.people = "0";
  card.querySelector(".summary").textContent = "";
  card.querySelector(".message").textContent = message;
  card.dataset.state = "error";
}

function rerunPhotos() {
  state.photos.forEach(runPhoto);
}

// ----------------------------------------------------------------------------------------------- camera

const camera = {
  stream: null, socket: null, timer: null, capture: document.createElement("canvas"),
  captured: 0, sent: 0, encoding: 0, answered: 0, sentAt: new Map(), droppedHere: 0, droppedServer: 0,
  shown: [], frames: 0, tracking: false,
};

// Every captured frame is sent, being encoded, or dropped here: one attribute, so a reader sees one moment.
function cameraLedger() {
  const { captured, sent, encoding, answered, droppedHere } = camera;
  $("camera").dataset.ledger = JSON.stringify({ captured, sent, encoding, answered, droppedHere });
}

function cameraStats(latency) {
  const now = performance.now();
  camera.shown = camera.shown.filter((t) => now - t < 2000);
  $("stat-fps").textContent = (camera.shown.length / 2).toFixed(1);
  if (latency != null) $("stat-latency").textContent = `${Math.round(latency)} ms`;
  const dropped = camera.droppedHere + camera.droppedServer;
  $("stat-dropped").textContent = String(dropped);
  $("camera").dataset.dropped = String(dropped);
  cameraLedger();
}

function onCameraMessage(event) {
  const message = JSON.parse(event.data);
  if (message.type === "ready") {
    camera.tracking = message.tracking;
    $("camera-mode").textContent = message.tracking
      ? `${message.model}: server-side tracking (IDs stay with each person)`
      : `${message.model}: one request per frame (no track IDs)`;
    $("camera").dataset.tracking = String(message.tracking);
    return;
  }
  if (message.type === "fatal" || message.type === "settings_error" || message.type === "notice") {
    $("camera-message").textContent = message.error;
    return;
  }
  if (message.type !== "result" && message.type !== "error") return;
  camera.droppedServer = message.dropped || 0;
  const sentAt = camera.sentAt.get(message.seq);
  for (const seq of camera.sentAt.keys()) if (seq <= message.seq) camera.sentAt.delete(seq);
  if (message.seq < camera.answered) return; // an older frame finished after a newer one: already superseded
  camera.answered = message.seq + 1;
  const latency = sentAt != null ? performance.now() - sentAt : null;
  if (message.type === "error") {
    $("camera-message").textContent = message.error;
    cameraStats(latency);
    return;
  }
  $("camera-message").textContent = "";
  camera.frames += 1;
  camera.shown.push(performance.now());
  const model = currentModel();
  const label = (det) => (det.track_id != null ? `#${det.track_id}` : det.score.toFixed(2));
  drawPoses($("camera-overlay"), message.width, message.height, message.detections, model.skeleton, label);
  const ids = message.detections.map((d) => d.track_id).filter((id) => id != null);
  $("stat-people").textContent = String(message.detections.length);
  $("stat-tracks").textContent = ids.length ? ids.map((id) => `#${id}`).join(" ") : "–";
  const panel = $("camera");
  panel.dataset.frames = String(camera.frames);
  panel.dataset.people = String(message.detections.length);
  panel.dataset.trackIds = ids.join(",");
  cameraStats(latency);
}

function captureFrame() {
  const video = $("video");
  if (!camera.socket || camera.socket.readyState !== WebSocket.OPEN || !video.videoWidth) return;
  camera.captured += 1;
  if (camera.sent + camera.encoding - camera.answered >= MAX_IN_FLIGHT) {
    camera.droppedHere += 1; // the server is behind: skip this frame rather than queue it
    cameraStats(null);
    return;
  }
  const scale = Math.min(1, CAPTURE_MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
  camera.capture.width = Math.round(video.videoWidth * scale);
  camera.capture.height = Math.round(video.videoHeight * scale);
  camera.capture.getContext("2d").drawImage(video, 0, 0, camera.capture.width, camera.capture.height);
  camera.encoding += 1;
  cameraLedger();
  camera.capture.toBlob((blob) => {
    camera.encoding -= 1;
    if (!blob || !camera.socket || camera.socket.readyState !== WebSocket.OPEN) return;
    camera.sentAt.set(camera.sent, performance.now());
    camera.sent += 1; // the app numbers binary messages in arrival order, as here
    camera.socket.send(blob);
    cameraLedger();
  }, "image/jpeg", JPEG_QUALITY);
}

async function startCamera() {
  const model = currentModel();
  if (!model) return;
  $("camera-message").textContent = "";
  try {
    camera.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 1280 }, height: { ideal: 720 } }, audio: false,
    });
  } catch (error) {
    $("camera-message").textContent = `no camera: ${error.message || error}`;
    return;
  }
  const video = $("video");
  video.srcObject = camera.stream;
  await video.play();
  Object.assign(camera, {
    captured: 0, sent: 0, encoding: 0, answered: 0, droppedHere: 0, droppedServer: 0, frames: 0, shown: [],
  });
  camera.sentAt.clear();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const mode = $("camera-track").checked ? "track" : "frames";
  const keypoints = $("camera-smooth").checked ? "smoothed" : "raw";
  const query = new URLSearchParams({ model: model.name, mode, keypoints, ...chosenParameters(true) });
  camera.socket = new WebSocket(`${scheme}://${location.host}/api/camera?${query}`);
  camera.socket.addEventListener("message", onCameraMessage);
  camera.socket.addEventListener("close", (event) => {
    // The app names a refusal (e.g. too many camera connections) in the close reason.
    if (camera.stream) $("camera-message").textContent = event.reason || "the connection to the app closed";
  });
  camera.timer = setInterval(captureFrame, 1000 / CAPTURE_FPS);
  $("camera-start").disabled = true;
  $("camera-stop").disabled = false;
  $("camera").dataset.running = "true";
}

function stopCamera() {
  clearInterval(camera.timer);
  const stream = camera.stream;
  camera.stream = null;
  if (camera.socket) camera.socket.close();
  camera.socket = null;
  if (stream) stream.getTracks().forEach((track) => track.stop());
  $("video").srcObject = null;
  $("camera-start").disabled = false;
  $("camera-stop").disabled = true;
  $("camera").dataset.running = "false";
}

function sendCameraSettings() {
  if (camera.socket && camera.socket.readyState === WebSocket.OPEN) {
    camera.socket.send(JSON.stringify(chosenParameters(true)));
  }
}

// ------------------------------------------------------------------------------------------------ wiring

function showTab(name) {
  for (const tab of ["photos", "camera"]) {
    $(tab).hidden = tab !== name;
    $(`tab-${tab}`).setAttribute("aria-pressed", String(tab === name));
  }
  if (name !== "camera") stopCamera();
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

const rerunAll = debounce(() => {
  rerunPhotos();
  sendCameraSettings();
}, 150);
const resendCameraSettings = debounce(sendCameraSettings, 150);

// A parameter the photos use reruns them; the tracker's own only reach the camera.
function onParameterChange(description) {
  if (description.tracking_only) resendCameraSettings();
  else rerunAll();
}

function init() {
  $("model").addEventListener("change", () => {
    state.model = $("model").value;
    applyDefaults(currentModel());
    rerunPhotos();
    if (camera.socket) {
      stopCamera();
      startCamera();
    }
  });
  $("files").addEventListener("change", (event) => {
    addPhotos(event.target.files);
    event.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addPhotos(event.dataTransfer.files);
  });
  $("tab-photos").addEventListener("click", () => showTab("photos"));
  $("tab-camera").addEventListener("click", () => showTab("camera"));
  $("camera-start").addEventListener("click", startCamera);
  $("camera-stop").addEventListener("click", stopCamera);
  $("camera-track").addEventListener("change", () => {
    if (camera.socket) {
      stopCamera();
      startCamera();
    }
  });
  loadModels();
}

init();

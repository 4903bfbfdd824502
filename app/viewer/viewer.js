// The viewer: picks or drops images, asks /v1/preview for each (the image as the service decoded
// it) and /v1/predict for the study, and draws each image as large as the screen allows with its
// detections. A reader zooms (wheel, + and -), pans (drag), sets window and level (shift-drag,
// or w/W and l/L), hides the overlays (o), resets the view (0) and steps through the study (n, p).
// A reading is saved per image (POST /v1/feedback): agree or disagree with the verdict (a, d; on
// a doubt: fracture or no fracture), each box clicked through true / false / unjudged, missed
// fractures drawn after m, saved with s. The API key stays in this page's memory only.
"use strict";

const state = { files: [], previews: [], answer: null, busy: 0, overlays: true, current: 0 };
// per card: { canvas, image, result, zoom, ox, oy, window, level, call, judged, missed, drawing }
const views = [];
const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.error}: ${body.detail}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// A file's preview, or null when the service cannot decode it (its answer says why).
async function preview(file) {
  const form = new FormData();
  form.append("files", file, file.name);
  const r = await fetch("/v1/preview", { method: "POST", body: form, headers: headers() });
  if (!r.ok) return null;
  const blob = await r.blob();
  const image = new Image();
  image.src = URL.createObjectURL(blob);
  await image.decode();
  return {
    image,
    width: Number(r.headers.get("X-Image-Width")),
    height: Number(r.headers.get("X-Image-Height")),
    patient: r.headers.get("X-Patient-Key") || "",
  };
}

async function predict() {
  const form = new FormData();
  for (const file of state.files) form.append("files", file, file.name);
  const fp = Number($("fp").value).toFixed(2);
  const r = await fetch(`/v1/predict?fp_per_image=${fp}`, {
    method: "POST",
    body: form,
    headers: headers(),
  });
  if (!r.ok) throw new Error(await errorText(r));
  return r.json();
}

// --- drawing ----------------------------------------------------------------------------------

// An event's position in canvas pixels (the canvas may be shown smaller than it is).
function canvasPoint(canvas, e) {
  const r = canvas.getBoundingClientRect();
  return [
    ((e.clientX - r.left) * canvas.width) / r.width,
    ((e.clientY - r.top) * canvas.height) / r.height,
  ];
}

function scaleOf(view) {
  return Math.min(view.canvas.width / view.frameW, view.canvas.height / view.frameH) * view.zoom;
}

// Canvas pixels -> the image's own pixels (the frame the answer's boxes are in).
function framePoint(view, x, y) {
  const s = scaleOf(view);
  return [(x - view.ox) / s, (y - view.oy) / s];
}

// The grey preview through the reader's window and level (0-255 units), once per change.
function windowed(view) {
  const { image } = view;
  if (view.cache && view.cache.window === view.window && view.cache.level === view.level) {
    return view.cache.canvas;
  }
  const off = document.createElement("canvas");
  off.width = image.naturalWidth;
  off.height = image.naturalHeight;
  const ctx = off.getContext("2d");
  ctx.drawImage(image, 0, 0);
  if (view.window !== 255 || view.level !== 127.5) {
    const data = ctx.getImageData(0, 0, off.width, off.height);
    const lut = new Uint8ClampedArray(256);
    const low = view.level - view.window / 2;
    for (let v = 0; v < 256; v++) lut[v] = ((v - low) / view.window) * 255;
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const g = lut[px[i]];
      px[i] = g;
      px[i + 1] = g;
      px[i + 2] = g;
    }
    ctx.putImageData(data, 0, 0);
  }
  view.cache = { window: view.window, level: view.level, canvas: off };
  return off;
}

// Label rectangles never overlap one another nor the box they name: above the box, else below,
// else moved down until free.
function placeLabel(ctx, text, box, placed, bounds) {
  const w = ctx.measureText(text).width + 6;
  const h = parseInt(ctx.font, 10) + 4;
  const [x1, y1, , y2] = box;
  const x = Math.min(Math.max(0, x1), bounds.width - w);
  const tries = [y1 - h - 2, y2 + 2];
  for (let y = y2 + 2; y < bounds.height; y += h) tries.push(y);
  for (const y of tries) {
    const r = { x, y, w, h };
    const inside = y >= 0 && y + h <= bounds.height;
    const clear = placed.every((p) => r.x + r.w <= p.x || p.x + p.w <= r.x || r.y + r.h <= p.y || p.y + p.h <= r.y);
    const offBox = y + h <= y1 || y >= y2;
    if (inside && clear && offBox) {
      placed.push(r);
      return r;
    }
  }
  return null; // no free place: the box stays unlabelled rather than covered
}

function draw(view) {
  const { canvas, result } = view;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  // frame pixels -> canvas pixels: fit, then the reader's zoom and pan
  const fit = Math.min(canvas.width / view.frameW, canvas.height / view.frameH);
  const s = fit * view.zoom;
  ctx.setTransform(s, 0, 0, s, view.ox, view.oy);
  ctx.drawImage(windowed(view), 0, 0, view.frameW, view.frameH);
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  canvas.dataset.zoom = view.zoom.toFixed(2);
  canvas.dataset.window = String(Math.round(view.window));
  canvas.dataset.level = String(Math.round(view.level));
  canvas.dataset.overlays = String(state.overlays);
  if (!state.overlays) return;
  const at = (x, y) => [x * s + view.ox, y * s + view.oy];
  const line = Math.max(2, Math.round(canvas.width / 400));
  const [cx1, cy1, cx2, cy2] = result.crop_box;
  const crops = cx1 > 0 || cy1 > 0 || cx2 < view.frameW || cy2 < view.frameH;
  if (crops) { // drawn only when it crops: the whole image needs no frame
    const [a, b] = at(cx1, cy1);
    const [c, d] = at(cx2, cy2);
    ctx.setLineDash([6, 4]);
    ctx.strokeStyle = "#2ecc71";
    ctx.lineWidth = line;
    ctx.strokeRect(a, b, c - a, d - b);
    ctx.setLineDash([]);
  }
  canvas.dataset.crop = String(crops);
  ctx.font = `${Math.max(13, Math.round(canvas.width / 60))}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  const placed = [];
  let labelled = 0;
  const boxes = result.detections.map((det, i) => {
    const judged = view.judged[i];
    const colour = judged === true ? "#2ecc71" : judged === false ? "#e74c3c" : "#f1c40f";
    const mark = judged === true ? " true" : judged === false ? " false" : "";
    return { box: det.box, colour, dash: judged === false, label: `fracture ${det.score.toFixed(2)}${mark}` };
  });
  for (const box of view.missed) boxes.push({ box, colour: "#34d1ff", dash: false, label: "missed" });
  if (view.sketch) boxes.push({ box: view.sketch, colour: "#34d1ff", dash: true, label: "" });
  for (const b of boxes) {
    const [x1, y1] = at(b.box[0], b.box[1]);
    const [x2, y2] = at(b.box[2], b.box[3]);
    ctx.strokeStyle = b.colour;
    ctx.lineWidth = line;
    ctx.setLineDash(b.dash ? [8, 5] : []);
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.setLineDash([]);
    if (!b.label) continue;
    const r = placeLabel(ctx, b.label, [x1, y1, x2, y2], placed, canvas);
    if (!r) continue;
    ctx.fillStyle = "rgba(0,0,0,0.7)";
    ctx.fillRect(r.x, r.y, r.w, r.h);
    ctx.fillStyle = b.colour;
    ctx.fillText(b.label, r.x + 3, r.y + 2);
    labelled += 1;
  }
  canvas.dataset.labels = String(labelled);
  canvas.dataset.labelRects = JSON.stringify(placed.map((p) => [p.x, p.y, p.w, p.h]));
}

// A frame-pixel box from two frame points, kept inside the image.
function boxFrom(view, [ax, ay], [bx, by]) {
  const clamp = (v, hi) => Math.min(hi, Math.max(0, v));
  return [
    clamp(Math.min(ax, bx), view.frameW), clamp(Math.min(ay, by), view.frameH),
    clamp(Math.max(ax, bx), view.frameW), clamp(Math.max(ay, by), view.frameH),
  ].map((v) => Math.round(v * 10) / 10);
}

// A click on a detection steps its judgement: unjudged -> true -> false -> unjudged.
function judgeAt(view, [x, y]) {
  const hit = view.result.detections.findIndex(
    (d) => x >= d.box[0] && x <= d.box[2] && y >= d.box[1] && y <= d.box[3],
  );
  if (hit < 0) return;
  const now = view.judged[hit];
  view.judged[hit] = now === undefined ? true : now === true ? false : undefined;
  changed(view);
}

function attach(view) {
  const { canvas } = view;
  let drag = null;
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [x, y] = canvasPoint(canvas, e);
    zoomAt(view, e.deltaY < 0 ? 1.25 : 0.8, x, y);
  });
  canvas.addEventListener("pointerdown", (e) => {
    const at = canvasPoint(canvas, e);
    drag = {
      x: e.clientX, y: e.clientY, shift: e.shiftKey, w: view.window, l: view.level,
      ox: view.ox, oy: view.oy, start: framePoint(view, ...at), moved: false,
    };
    canvas.setPointerCapture(e.pointerId);
    select(view.index);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x;
    const dy = e.clientY - drag.y;
    drag.moved = drag.moved || Math.abs(dx) + Math.abs(dy) > 3;
    if (view.drawing) { // a missed fracture, in the image's own pixels
      view.sketch = boxFrom(view, drag.start, framePoint(view, ...canvasPoint(canvas, e)));
    } else if (drag.shift) { // window with the horizontal motion, level with the vertical
      view.window = Math.min(255, Math.max(4, drag.w + dx));
      view.level = Math.min(255, Math.max(0, drag.l + dy));
    } else {
      const k = canvas.width / canvas.getBoundingClientRect().width;
      view.ox = drag.ox + dx * k;
      view.oy = drag.oy + dy * k;
    }
    draw(view);
  });
  canvas.addEventListener("pointerup", (e) => {
    if (!drag) return;
    if (view.drawing) {
      const box = view.sketch;
      view.sketch = null;
      if (box && box[2] - box[0] >= 3 && box[3] - box[1] >= 3) {
        view.missed.push(box);
        setDrawing(view, false);
        changed(view);
      }
      draw(view);
    } else if (!drag.moved && !drag.shift) {
      judgeAt(view, framePoint(view, ...canvasPoint(canvas, e)));
    }
    drag = null;
  });
}

function zoomAt(view, factor, x, y) {
  const zoom = Math.min(16, Math.max(1, view.zoom * factor));
  const k = zoom / view.zoom;
  view.ox = x - (x - view.ox) * k;
  view.oy = y - (y - view.oy) * k;
  view.zoom = zoom;
  if (zoom === 1) reset(view, false);
  draw(view);
}

function reset(view, wl = true) {
  const fit = Math.min(view.canvas.width / view.frameW, view.canvas.height / view.frameH);
  view.zoom = 1;
  view.ox = (view.canvas.width - view.frameW * fit) / 2;
  view.oy = (view.canvas.height - view.frameH * fit) / 2;
  if (wl) {
    view.window = 255;
    view.level = 127.5;
  }
}

function select(index) {
  if (!views.length) return;
  state.current = (index + views.length) % views.length;
  views.forEach((v, i) => v.card.classList.toggle("current", i === state.current));
  document.body.dataset.current = String(state.current);
}

document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement || !views.length) return;
  const view = views[state.current];
  const c = view.canvas;
  const actions = {
    o: () => { state.overlays = !state.overlays; views.forEach(draw); },
    "+": () => zoomAt(view, 1.25, c.width / 2, c.height / 2),
    "=": () => zoomAt(view, 1.25, c.width / 2, c.height / 2),
    "-": () => zoomAt(view, 0.8, c.width / 2, c.height / 2),
    0: () => { reset(view); draw(view); },
    w: () => { view.window = Math.max(4, view.window * 0.8); draw(view); },
    W: () => { view.window = Math.min(255, view.window * 1.25); draw(view); },
    l: () => { view.level = Math.max(0, view.level - 8); draw(view); },
    L: () => { view.level = Math.min(255, view.level + 8); draw(view); },
    n: () => { select(state.current + 1); views[state.current].card.scrollIntoView(); },
    p: () => { select(state.current - 1); views[state.current].card.scrollIntoView(); },
    a: () => setCall(view, true),
    d: () => setCall(view, false),
    m: () => setDrawing(view, !view.drawing),
    s: () => saveReading(view),
  };
  const act = actions[e.key];
  if (act) {
    e.preventDefault();
    act();
  }
});

// --- the reader's reading ----------------------------------------------------------------------

// What the two call buttons mean: agree / disagree with a fracture or no-fracture verdict, the
// reader's own call on a doubt.
function callWords(verdict) {
  return verdict === "doubt" ? ["Fracture", "No fracture"] : ["Agree", "Disagree"];
}

function setCall(view, yes) {
  view.call = view.call === yes ? null : yes;
  changed(view);
}

function setDrawing(view, on) {
  view.drawing = on;
  view.canvas.style.cursor = on ? "crosshair" : "grab";
  view.panel.draw.setAttribute("aria-pressed", String(on));
}

// Something in the reading changed: the buttons say so, and it is no longer saved.
function changed(view) {
  const [yes, no] = view.panel.calls;
  yes.setAttribute("aria-pressed", String(view.call === true));
  no.setAttribute("aria-pressed", String(view.call === false));
  view.panel.undo.disabled = !view.missed.length;
  view.panel.save.disabled = false;
  view.panel.saved.textContent = "";
  view.card.dataset.judged = JSON.stringify(view.judged.map((j) => (j === undefined ? null : j)));
  view.card.dataset.missed = String(view.missed.length);
  draw(view);
}

function readingOf(view) {
  const r = view.result;
  const answer = state.answer;
  const body = {
    request_id: answer.request_id,
    image_index: r.index,
    filename: r.filename,
    sop_instance_uid: r.sop_instance_uid,
    width: r.width,
    height: r.height,
    models: answer.models,
    verdict: r.verdict,
    fracture_probability: r.fracture_probability,
    boxes: r.detections
      .map((d, i) => ({ box: d.box, score: d.score, correct: view.judged[i] }))
      .filter((b) => b.correct !== undefined),
    missed: view.missed,
  };
  if (view.call !== null) {
    if (r.verdict === "doubt") body.fractured = view.call;
    else body.agree = view.call;
  }
  return body;
}

async function saveReading(view) {
  const { saved } = view.panel;
  saved.className = "saved";
  try {
    const r = await fetch("/v1/feedback", {
      method: "POST",
      body: JSON.stringify(readingOf(view)),
      headers: { ...headers(), "Content-Type": "application/json" },
    });
    if (!r.ok) throw new Error(await errorText(r));
    const stored = await r.json();
    view.card.dataset.feedbackId = stored.feedback_id;
    view.panel.save.disabled = true;
    saved.textContent = "reading saved";
  } catch (err) {
    saved.className = "saved error";
    saved.textContent = err.message;
  }
}

function button(text, onClick, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function readingPanel(view) {
  const [yesWords, noWords] = callWords(view.result.verdict);
  const panel = document.createElement("div");
  panel.className = "reading";
  const label = document.createElement("span");
  label.textContent = "Your reading:";
  const yes = button(yesWords, () => setCall(view, true), "key a");
  const no = button(noWords, () => setCall(view, false), "key d");
  yes.className = "call";
  no.className = "call";
  const draw = button("Draw a missed fracture", () => setDrawing(view, !view.drawing), "key m, then drag");
  const undo = button("Remove last drawn", () => { view.missed.pop(); changed(view); }, "");
  const save = button("Save reading", () => saveReading(view), "key s");
  const saved = document.createElement("span");
  saved.className = "saved";
  saved.setAttribute("role", "status");
  const hint = document.createElement("span");
  hint.className = "legend";
  hint.textContent = "click a box: true, false, unjudged";
  panel.append(label, yes, no, draw, undo, save, saved, hint);
  view.panel = { calls: [yes, no], draw, undo, save, saved };
  return panel;
}

// --- the answer -------------------------------------------------------------------------------

// The three-level verdict in a reader's words, and the class that colours it.
const VERDICT = {
  fracture: { words: "Fracture likely", css: "fracture" },
  doubt: { words: "Doubtful: please review", css: "doubt" },
  no_fracture: { words: "No fracture seen", css: "clear" },
};

function render() {
  const answer = state.answer;
  const study = $("study");
  study.hidden = false;
  const overall = VERDICT[answer.study.verdict];
  study.className = `study ${overall.css}`;
  const point = answer.operating_point;
  study.textContent =
    `Study: ${overall.words} — highest fracture probability ` +
    `${(100 * answer.study.fracture_probability).toFixed(1)}% over ${answer.study.images} image(s); ` +
    (point.fp_per_image == null
      ? `boxes scoring at least ${point.detector_threshold.toFixed(2)}`
      : `boxes at ${point.fp_per_image} false positives per image`) +
    (point.expected_recall == null
      ? ""
      : ` (about ${Math.round(100 * point.expected_recall)}% of fractures boxed)`);
  if (answer.study.out_of_distribution) {
    study.textContent += " — some images are outside validated conditions: read the answer with care";
  }
  for (const skipped of answer.not_analysed || []) {
    const name = skipped.filename || `file ${skipped.index + 1}`;
    study.textContent += ` — ${name} not analysed: ${skipped.detail}`;
  }
  study.dataset.fracture = String(answer.study.fracture);
  study.dataset.verdict = answer.study.verdict;
  study.dataset.notAnalysed = String((answer.not_analysed || []).length);
  const box = $("images");
  box.replaceChildren();
  views.length = 0;
  const side = Math.max(320, Math.min(window.innerWidth - 64, window.innerHeight - 120, 1400));
  answer.images.forEach((result, i) => {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.index = String(i);
    const title = document.createElement("h2");
    title.textContent = result.filename || `image ${result.index + 1}`;
    const verdict = document.createElement("p");
    const level = VERDICT[result.verdict];
    verdict.className = `verdict ${level.css}`;
    verdict.dataset.verdict = result.verdict;
    verdict.textContent =
      `${level.words}: fracture probability ` +
      `${(100 * result.fracture_probability).toFixed(1)}%, ` +
      `${result.detections.length} box(es)` +
      (result.out_of_distribution ? " — outside validated conditions" : "");
    verdict.dataset.outOfDistribution = String(Boolean(result.out_of_distribution));
    const canvas = document.createElement("canvas");
    const previewOf = state.previews[result.index];
    canvas.width = side;
    canvas.height = Math.round(side * Math.min(1.4, result.height / result.width));
    const legend = document.createElement("p");
    legend.className = "legend";
    legend.textContent =
      "wheel or +/- zoom · drag pan · shift-drag or w/W l/L window and level · o overlays · 0 reset · n/p next/previous · a/d your call · m draw · s save";
    const notes = document.createElement("p");
    notes.className = "notes";
    notes.textContent = result.notes.join("; ");
    card.append(title, verdict, canvas, legend, notes);
    box.append(card);
    card.dataset.boxes = String(result.detections.length);
    card.dataset.probability = String(result.fracture_probability);
    if (!previewOf) return;
    const view = {
      card, canvas, result, image: previewOf.image, index: views.length,
      frameW: result.width, frameH: result.height, zoom: 1, ox: 0, oy: 0, window: 255, level: 127.5,
      call: null, judged: [], missed: [], drawing: false, sketch: null,
    };
    card.insertBefore(readingPanel(view), legend);
    reset(view);
    views.push(view);
    attach(view);
    changed(view);
    view.panel.save.disabled = true; // nothing to save yet
  });
  select(0);
  document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
}

// Files of several patients are refused by the service; say so before sending them.
function mixedPatients() {
  const keys = new Set(state.previews.filter((p) => p && p.patient).map((p) => p.patient));
  return keys.size > 1;
}

async function analyse() {
  if (!state.files.length) return;
  state.busy += 1;
  setStatus("analysing…");
  try {
    if (state.previews.length !== state.files.length) {
      state.previews = await Promise.all(state.files.map(preview));
    }
    if (mixedPatients()) {
      document.body.dataset.mixed = "true";
      setStatus("these files belong to different patients: open one patient's study at a time", true);
      return;
    }
    document.body.dataset.mixed = "false";
    state.answer = await predict();
    render();
    setStatus(`request ${state.answer.request_id}`);
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    state.busy -= 1;
  }
}

function choose(files) {
  state.files = Array.from(files);
  state.previews = [];
  analyse();
}

$("files").addEventListener("change", (e) => choose(e.target.files));
$("fp").addEventListener("input", () => {
  $("fp-value").textContent = Number($("fp").value).toFixed(2);
});
$("fp").addEventListener("change", analyse);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files);
});

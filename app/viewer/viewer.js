// The viewer: picks or drops images, asks /v1/preview for each (the image as the service decoded
// it) and /v1/predict for the study, draws crop boxes and detections, and asks again when the
// operating point moves. The API key stays in this page's memory only.
"use strict";

const state = { files: [], previews: [], answer: null, busy: 0 };
const $ = (id) => document.getElementById(id);
const MAX_SIDE = 560;

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

async function preview(file) {
  const form = new FormData();
  form.append("files", file, file.name);
  const r = await fetch("/v1/preview", { method: "POST", body: form, headers: headers() });
  if (!r.ok) throw new Error(`${file.name}: ${await errorText(r)}`);
  const blob = await r.blob();
  const image = new Image();
  image.src = URL.createObjectURL(blob);
  await image.decode();
  return {
    image,
    width: Number(r.headers.get("X-Image-Width")),
    height: Number(r.headers.get("X-Image-Height")),
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

function drawImage(card, view, result) {
  const canvas = card.querySelector("canvas");
  const scale = Math.min(1, MAX_SIDE / Math.max(view.width, view.height));
  canvas.width = Math.round(view.width * scale);
  canvas.height = Math.round(view.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(view.image, 0, 0, canvas.width, canvas.height);
  const line = Math.max(2, Math.round(canvas.width / 250));
  const [cx1, cy1, cx2, cy2] = result.crop_box.map((v) => v * scale);
  ctx.setLineDash([6, 4]);
  ctx.strokeStyle = "#2ecc71";
  ctx.lineWidth = line;
  ctx.strokeRect(cx1, cy1, cx2 - cx1, cy2 - cy1);
  ctx.setLineDash([]);
  ctx.font = `${Math.max(12, Math.round(canvas.width / 35))}px system-ui, sans-serif`;
  let drawn = 0;
  for (const det of result.detections) {
    const [x1, y1, x2, y2] = det.box.map((v) => v * scale);
    ctx.strokeStyle = "#f1c40f";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const label = `fracture ${det.score.toFixed(2)}`;
    const ty = y1 > 18 ? y1 - 4 : y2 + 14;
    ctx.lineWidth = 3;
    ctx.strokeStyle = "#000";
    ctx.strokeText(label, x1, ty);
    ctx.fillStyle = "#f1c40f";
    ctx.fillText(label, x1, ty);
    ctx.lineWidth = line;
    drawn += 1;
  }
  card.dataset.boxes = String(drawn);
  card.dataset.probability = String(result.fracture_probability);
}

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
  study.dataset.fracture = String(answer.study.fracture);
  study.dataset.verdict = answer.study.verdict;
  const box = $("images");
  box.replaceChildren();
  answer.images.forEach((result, i) => {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.index = String(i);
    const title = document.createElement("h2");
    title.textContent = result.filename || `image ${i + 1}`;
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
    const legend = document.createElement("p");
    legend.className = "legend";
    legend.innerHTML = '<span class="crop">- - bone crop</span> · <span class="box">□ detection</span>';
    const notes = document.createElement("p");
    notes.className = "notes";
    notes.textContent = result.notes.join("; ");
    card.append(title, verdict, canvas, legend, notes);
    box.append(card);
    drawImage(card, state.previews[i], result);
  });
  document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
}

async function analyse() {
  if (!state.files.length) return;
  state.busy += 1;
  setStatus("analysing…");
  try {
    if (state.previews.length !== state.files.length) {
      state.previews = await Promise.all(state.files.map(preview));
    }
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

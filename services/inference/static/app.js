// The clinician's page: plain JavaScript, no build step, no external resources.
"use strict";

const CLASS_NAMES = { Benign: "Benign", Early: "Early Pre-B ALL", Pre: "Pre-B ALL",
                      Pro: "Pro-B ALL" };
const $ = (id) => document.getElementById(id);

function apiHeaders() {
  const key = sessionStorage.getItem("leukofed-api-key");
  return key ? { "X-API-Key": key } : {};
}

function showKeyField() {
  $("key-row").hidden = false;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || response.statusText;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModelLine() {
  const line = $("model-line");
  try {
    const response = await fetch("/v1/model", { headers: apiHeaders() });
    if (response.status === 401) {
      showKeyField();
      line.textContent = "This service needs an API key: enter it below.";
      return;
    }
    if (!response.ok) {
      line.textContent = `No model is ready yet: ${await errorText(response)}`;
      return;
    }
    const m = await response.json();
    line.textContent = `Model ${m.name} version ${m.version}` +
      (m.alias ? ` (${m.alias})` : "") + `, running on ${m.provider}.`;
    const cal = m.calibration || {};
    $("calibration-line").textContent = cal.available
      ? `Probabilities calibrated (temperature ${cal.temperature.toFixed(2)}); ` +
        `${percent(cal.coverage)} prediction sets.`
      : "Probabilities not calibrated: no prediction sets.";
    $("card-link").hidden = !(m.card && m.card.available);
  } catch (err) {
    line.textContent = `The service cannot be reached: ${err}`;
  }
}

function percent(fraction) {
  // 0.95 -> "95%", 0.975 -> "97.5%"
  return `${Number((100 * fraction).toPrecision(4))}%`;
}

function className(cls) {
  return CLASS_NAMES[cls] || cls;
}

async function openCard(event) {
  // With an API key the plain link would be refused: fetch the card with the key instead.
  const headers = apiHeaders();
  if (!Object.keys(headers).length) return;  // no key: the link opens the card itself
  event.preventDefault();
  const response = await fetch("/v1/model/card?format=html", { headers });
  const text = response.ok ? await response.text() : await errorText(response);
  const blob = new Blob([text], { type: response.ok ? "text/html" : "text/plain" });
  window.open(URL.createObjectURL(blob), "_blank", "noopener");
}

function renderBars(list, probabilities, label, predictionSet) {
  list.replaceChildren();
  for (const [cls, p] of Object.entries(probabilities)) {
    const li = document.createElement("li");
    if (cls === label) li.classList.add("top");
    if (predictionSet && predictionSet.includes(cls)) li.classList.add("in-set");
    const pct = (100 * p).toFixed(1);
    const name = document.createElement("span");
    name.textContent = CLASS_NAMES[cls] || cls;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${CLASS_NAMES[cls] || cls}: ${pct} percent`);
    const fill = document.createElement("span");
    fill.style.width = `${pct}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${pct}%`;
    li.append(name, bar, value);
    list.append(li);
  }
}

function newCard(file) {
  const node = $("result-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".filename").textContent = file.name;
  const photo = node.querySelector(".photo");
  photo.src = URL.createObjectURL(file);
  photo.alt = `Uploaded image ${file.name}`;
  // A file the browser cannot show (TIFF, or not an image): keep the card, drop the picture.
  photo.addEventListener("error", () => { photo.hidden = true; });
  node.querySelector(".heat").hidden = true;
  node.querySelector(".label-line").textContent = "Analysing\u2026";
  $("results").prepend(node);
  return node;
}

function showError(card, message) {
  card.classList.add("failed");
  card.querySelector(".picture").hidden = true;
  card.querySelector(".label-line").textContent = "No result";
  const error = card.querySelector(".error");
  error.textContent = message;
  error.hidden = false;
}

async function analyse(file) {
  const card = newCard(file);
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch("/v1/explain", { method: "POST", body: form,
                                            headers: apiHeaders() });
  } catch (err) {
    showError(card, `The service cannot be reached: ${err}`);
    return false;
  }
  if (response.status === 401) showKeyField();
  if (!response.ok) {
    const message = await errorText(response);  // the service names the file itself
    showError(card, message.startsWith(file.name) ? message : `${file.name}: ${message}`);
    return false;
  }
  const result = await response.json();
  const pred = result.prediction;
  const top = pred.probabilities[pred.label];
  const labelLine = card.querySelector(".label-line");
  labelLine.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = className(pred.label);
  const predictionSet = pred.prediction_set;  // null: this model version is not calibrated
  const setRefer = Array.isArray(predictionSet) && predictionSet.length !== 1;
  // Referred because the image is unlike the training images (not only because of its set).
  const oodRefer = pred.refer === true && (pred.in_distribution === false || !setRefer);
  if (pred.refer === true) {
    // The referral is the answer, the label only a guess.
    showReferral(card, pred);
    labelLine.append(oodRefer ? "Model's guess, not reliable for this image: "
                              : "Model's guess, uncertain for this image: ",
                     strong, ` (${(100 * top).toFixed(1)}%)`);
  } else {
    labelLine.append("Most likely: ", strong, ` (${(100 * top).toFixed(1)}%)`);
    if (pred.refer !== false) showUnchecked(card, pred);
  }
  showMalignant(card, pred, oodRefer);
  showSet(card, pred);
  renderBars(card.querySelector(".bars"), pred.probabilities, pred.label, predictionSet);
  card.querySelector(".bars").setAttribute("aria-label", pred.calibrated
    ? "Class probabilities (calibrated)" : "Class probabilities");
  const heat = card.querySelector(".heat");
  heat.src = `data:${result.heatmap.media_type};base64,${result.heatmap.png_base64}`;
  heat.alt = `Heat map of the regions that drove the prediction ${pred.label}`;
  heat.hidden = !$("show-heatmap").checked;
  card.querySelector(".caption").textContent =
    `Heat map: occlusion, for ${CLASS_NAMES[result.heatmap.explained_class]}`;
  const m = result.model;
  card.querySelector(".model-version").textContent =
    `Answered by ${m.name} version ${m.version}` + (m.alias ? ` (${m.alias})` : "");
  return pred.refer === true ? "referred" : "answered";
}

function showReferral(card, pred) {
  card.classList.add("referred");
  const box = card.querySelector(".refer-box");
  // The box's title already says it: the advice without its "Refer to ...: " lead.
  box.querySelector(".refer-advice").textContent =
    (pred.advice || "This image is unlike the images the model was trained on.")
      .replace(/^Refer to a hematologist:\s*(.)/, (_, first) => first.toUpperCase());
  const list = box.querySelector(".refer-reasons");
  list.replaceChildren();
  for (const reason of pred.refer_reasons || []) {
    const li = document.createElement("li");
    li.textContent = reason;
    list.append(li);
  }
  box.hidden = false;
}

function showMalignant(card, pred, unreliable) {
  // The question a clinician asks first, apart from the subtype: yes, no or unsure.
  const line = card.querySelector(".malignant-line");
  line.replaceChildren();
  const value = document.createElement("strong");
  value.className = `malignant-value ${unreliable ? "unreliable" : pred.malignant}`;
  value.textContent = pred.malignant;
  line.append("Malignant: ", value);
  if (unreliable) line.append(" (the model's guess; not reliable for this image)");
  else if (!pred.calibrated) line.append(" (from the most likely class)");
}

function showSet(card, pred) {
  const line = card.querySelector(".set-line");
  line.replaceChildren();
  if (!pred.calibrated) {
    line.classList.add("muted");
    const note = pred.calibration_note || "this model version is not calibrated";
    line.textContent = `${note.charAt(0).toUpperCase()}${note.slice(1)}.`;
    return;
  }
  line.classList.remove("muted");
  const names = pred.prediction_set.map(className);
  const value = document.createElement("strong");
  value.className = "set-value";
  value.textContent = names.length ? names.join(", ") : "empty (no class fits this image)";
  line.append(`${percent(pred.coverage)} prediction set: `, value);
  line.title = "The classes the model cannot rule out for this image; it holds the true " +
    `class for ${percent(pred.coverage)} of images. One class is an answer; ` +
    "more than one, or none, means refer.";
}

function showUnchecked(card, pred) {
  // An older model version without an acquisition profile: say the check did not run.
  const note = card.querySelector(".ood-note");
  note.textContent = (pred.refer_reasons || [])[0] ||
    "Whether this image resembles the training images could not be checked.";
  note.hidden = false;
}

async function analyseAll(files) {
  if (!files.length) return;
  const status = $("status");
  let ok = 0;
  let referred = 0;
  for (const [i, file] of Array.from(files).entries()) {
    status.textContent = `Analysing image ${i + 1} of ${files.length}\u2026`;
    const outcome = await analyse(file);  // one at a time: the server may be small
    if (outcome) ok += 1;
    if (outcome === "referred") referred += 1;
  }
  const failed = files.length - ok;
  status.textContent = `${ok} image(s) analysed` +
    (referred ? `, ${referred} to refer to a hematologist` : "") +
    (failed ? `, ${failed} failed.` : ".");
}

function setup() {
  const input = $("file-input");
  const zone = $("drop-zone");
  input.addEventListener("change", () => { analyseAll(input.files); });
  // A real button: Tab reaches it, Enter and Space press it, screen readers announce it.
  $("choose-button").addEventListener("click", () => input.click());
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    analyseAll(event.dataTransfer.files);
  });
  $("show-heatmap").addEventListener("change", (event) => {
    for (const img of document.querySelectorAll(".result .heat")) {
      if (img.getAttribute("src")) img.hidden = !event.target.checked;
    }
  });
  $("clear-button").addEventListener("click", () => {
    $("results").replaceChildren();
    $("status").textContent = "Results cleared.";
    input.value = "";
  });
  $("card-link").addEventListener("click", openCard);
  $("api-key").addEventListener("change", (event) => {
    sessionStorage.setItem("leukofed-api-key", event.target.value);
    loadModelLine();
  });
  loadModelLine();
}

document.addEventListener("DOMContentLoaded", setup);

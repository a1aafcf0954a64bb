// The search page: upload (choose, drop or paste) an image, or click a result, to search.
// Plain browser JavaScript, no dependencies. Every URL is relative, so the page also works
// behind a reverse proxy that serves it under a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { maxK: 100, busy: false };

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadStats() {
  try {
    const response = await fetch("stats");
    if (!response.ok) throw new Error(await errorMessage(response));
    const stats = await response.json();
    state.maxK = (stats.server && stats.server.max_k) || state.maxK;
    const n = Number(stats.images || 0).toLocaleString("en");
    $("collection").textContent =
      `${n} images · descriptor ${stats.descriptor} (${stats.dim}-d) · index ${stats.index}`;
    $("collection").dataset.images = String(stats.images || 0);
  } catch (err) {
    $("collection").textContent = `cannot read the collection: ${err.message}`;
  }
}

function showQueryImage(src) {
  const img = $("query-image");
  img.src = src;
  img.hidden = false;
  $("drop").classList.add("has-image");
}

function resultCard(hit) {
  const card = document.createElement("button");
  card.type = "button";
  card.className = "result";
  card.dataset.id = String(hit.id);
  card.title = `${hit.path}\nscore ${hit.score.toFixed(4)}\nclick to search by this image`;

  const img = document.createElement("img");
  img.src = `thumbnails/${hit.id}`;
  img.alt = hit.path;
  img.loading = "lazy";
  img.decoding = "async";

  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);

  const path = document.createElement("span");
  path.className = "path";
  path.textContent = hit.path;

  card.append(img, score, path);
  card.addEventListener("click", () => searchById(hit.id, hit.path));
  return card;
}

function render(data, label) {
  const grid = $("results");
  grid.replaceChildren(...data.results.map(resultCard));
  grid.dataset.query = label;
  const ms = Math.round(data.took_ms);
  setStatus(`${data.count} results for ${label} in ${ms} ms`);
}

async function runSearch(form, label) {
  if (state.busy) return;
  state.busy = true;
  document.body.classList.add("busy");
  setStatus(`searching for ${label}…`);
  form.append("k", $("k").value);
  form.append("qe", $("qe").value);
  try {
    const response = await fetch("search", { method: "POST", body: form });
    if (!response.ok) throw new Error(await errorMessage(response));
    render(await response.json(), label);
  } catch (err) {
    setStatus(`search failed: ${err.message}`, true);
  } finally {
    state.busy = false;
    document.body.classList.remove("busy");
  }
}

function searchByFile(file) {
  if (!file) return;
  showQueryImage(URL.createObjectURL(file));
  const form = new FormData();
  form.append("image", file, file.name || "query");
  history.replaceState(null, "", location.pathname);
  runSearch(form, `“${file.name || "pasted image"}”`);
}

function searchById(id, path) {
  showQueryImage(`thumbnails/${id}`);
  const form = new FormData();
  form.append("id", String(id));
  if (location.hash !== `#id=${id}`) history.pushState(null, "", `#id=${id}`);
  runSearch(form, path ? `#${id} (${path})` : `#${id}`);
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function searchFromHash() {
  const match = /^#id=(\d+)$/.exec(location.hash);
  if (match) searchById(Number(match[1]));
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => searchByFile(e.target.files[0]));
  ["dragenter", "dragover"].forEach((type) =>
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((type) =>
    drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) searchByFile(file);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.kind === "file");
    if (item) searchByFile(item.getAsFile());
  });
  window.addEventListener("popstate", searchFromHash);
  loadStats();
  searchFromHash();
}

document.addEventListener("DOMContentLoaded", setUp);

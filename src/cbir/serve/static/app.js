// The search page: browse the collection a page at a time, open any image larger, and
// search by it or by an uploaded image (choose, drop or paste). Plain browser JavaScript,
// no dependencies. Every URL is relative, so the page also works behind a reverse proxy
// that serves it under a path prefix. The URL's hash keeps the view (#page=3, #id=42), so
// the browser's back button and shared links work.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "browse", page: 1, pages: 1, busy: false, viewing: null };

// -- helpers ----------------------------------------------------------------------------
function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function fetchJSON(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

const number = (n) => Number(n).toLocaleString("en");
const perPage = () => Number($("count").value);

function fileSize(bytes) {
  if (bytes >= 1 << 20) return `${(bytes / (1 << 20)).toFixed(1)} MB`;
  if (bytes >= 1 << 10) return `${Math.round(bytes / (1 << 10))} KB`;
  return `${bytes} bytes`;
}

function setHash(hash) {
  const url = hash ? `#${hash}` : location.pathname + location.search;
  if ((location.hash || "#") !== (hash ? `#${hash}` : "#")) history.pushState(null, "", url);
}

// -- the collection ---------------------------------------------------------------------
async function loadStats() {
  try {
    const stats = await fetchJSON("stats");
    const images = Number(stats.images || 0);
    $("collection").textContent = `${number(images)} images · model ${stats.model}`;
    $("collection").dataset.images = String(images);
  } catch (err) {
    $("collection").textContent = `cannot read the collection: ${err.message}`;
  }
}

function card(item, score) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "result";
  button.dataset.id = String(item.id);
  button.title = `${item.path}\nclick to see it larger`;
  const img = document.createElement("img");
  img.src = `thumbnails/${item.id}`;
  img.alt = item.path;
  img.loading = "lazy";
  img.decoding = "async";
  button.append(img);
  if (score !== undefined) {
    button.dataset.score = String(score);
    const label = document.createElement("span");
    label.className = "score";
    label.textContent = score.toFixed(3);
    label.title = "similarity: 1.000 is the same image";
    button.append(label);
  }
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = item.path;
  button.append(path);
  button.addEventListener("click", () => openViewer(item.id));
  return button;
}

function showMode(mode, title) {
  state.mode = mode;
  $("results").dataset.mode = mode;
  $("title").textContent = title;
  $("browse").hidden = mode === "browse";
  document.querySelector(".pager").hidden = mode !== "browse";
}

async function browse(page) {
  const limit = perPage();
  try {
    const data = await fetchJSON(`images?offset=${(page - 1) * limit}&limit=${limit}`);
    state.page = page;
    state.pages = Math.max(1, Math.ceil(data.total / limit));
    showMode("browse", "All images");
    $("results").replaceChildren(...data.items.map((item) => card(item)));
    delete $("results").dataset.query;
    $("page-info").textContent = `Page ${page} of ${state.pages}`;
    $("prev").disabled = page <= 1;
    $("next").disabled = page >= state.pages;
    const first = data.total ? data.offset + 1 : 0;
    setStatus(`Images ${number(first)}–${number(data.offset + data.items.length)} of ${number(data.total)}`);
    setHash(page > 1 ? `page=${page}` : "");
  } catch (err) {
    setStatus(`cannot list the collection: ${err.message}`, true);
  }
}

// -- the large view ---------------------------------------------------------------------
async function openViewer(id) {
  try {
    const info = await fetchJSON(`images/${id}/info`);
    state.viewing = info;
    $("viewer-image").src = `images/${id}`;
    $("viewer-image").alt = info.path;
    $("viewer-path").textContent = info.path;
    const format = info.format ? ` · ${info.format}` : "";
    $("viewer-size").textContent =
      `${number(info.width)} × ${number(info.height)} pixels · ${fileSize(info.bytes)}${format}`;
    $("viewer-open").href = `images/${id}`;
    if (!$("viewer").open) $("viewer").showModal();
  } catch (err) {
    setStatus(`cannot open image ${id}: ${err.message}`, true);
  }
}

function closeViewer() {
  if ($("viewer").open) $("viewer").close();
}

// -- searching --------------------------------------------------------------------------
function applyCutoff() {
  const cutoff = Number($("cutoff").value);
  $("cutoff-value").textContent = cutoff > 0 ? cutoff.toFixed(2) : "any";
  if (state.mode !== "results") return;
  const cards = [...$("results").querySelectorAll(".result")];
  let shown = 0;
  for (const c of cards) {
    c.hidden = Number(c.dataset.score) < cutoff;
    if (!c.hidden) shown += 1;
  }
  const hidden = cards.length - shown;
  const cut = hidden ? ` (${hidden} less similar than ${cutoff.toFixed(2)} hidden)` : "";
  setStatus(`${shown} results for ${$("results").dataset.query} in ${state.took} ms${cut}`);
}

async function runSearch(form, label) {
  if (state.busy) return;
  state.busy = true;
  document.body.classList.add("busy");
  setStatus(`searching for ${label}…`);
  form.append("k", $("count").value);
  form.append("qe", $("qe").value);
  try {
    const data = await fetchJSON("search", { method: "POST", body: form });
    showMode("results", `Similar to ${label}`);
    $("results").replaceChildren(...data.results.map((hit) => card(hit, hit.score)));
    $("results").dataset.query = label;
    state.took = Math.round(data.took_ms);
    applyCutoff();
  } catch (err) {
    setStatus(`search failed: ${err.message}`, true);
  } finally {
    state.busy = false;
    document.body.classList.remove("busy");
  }
}

function showQueryImage(src) {
  $("query-image").src = src;
  $("query-image").hidden = false;
  $("drop").classList.add("has-image");
}

function searchByFile(file) {
  if (!file) return;
  showQueryImage(URL.createObjectURL(file));
  const form = new FormData();
  form.append("image", file, file.name || "query");
  setHash("search");
  runSearch(form, `“${file.name || "pasted image"}”`);
}

function searchById(id, path) {
  showQueryImage(`thumbnails/${id}`);
  const form = new FormData();
  form.append("id", String(id));
  setHash(`id=${id}`);
  runSearch(form, path ? `“${path}”` : `image #${id}`);
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// -- wiring -----------------------------------------------------------------------------
function route() {
  closeViewer();
  const id = /^#id=(\d+)$/.exec(location.hash);
  const page = /^#page=(\d+)$/.exec(location.hash);
  if (id) searchById(Number(id[1]));
  else if (location.hash !== "#search") browse(page ? Math.max(1, Number(page[1])) : 1);
}

function setUpUpload() {
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
}

function setUp() {
  setUpUpload();
  $("cutoff").addEventListener("input", applyCutoff);
  $("count").addEventListener("change", () => { if (state.mode === "browse") browse(1); });
  $("prev").addEventListener("click", () => browse(Math.max(1, state.page - 1)));
  $("next").addEventListener("click", () => browse(Math.min(state.pages, state.page + 1)));
  $("browse").addEventListener("click", () => browse(1));
  $("home").addEventListener("click", (e) => { e.preventDefault(); browse(1); });
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) closeViewer(); });
  $("viewer-search").addEventListener("click", () => {
    const info = state.viewing;
    closeViewer();
    if (info) searchById(info.id, info.path);
  });
  window.addEventListener("popstate", route);
  loadStats();
  route();
}

document.addEventListener("DOMContentLoaded", setUp);

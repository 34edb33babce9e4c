// The page of `vmem serve`: classify a dropped image, change neighbours' weights, see the new decision,
// apply the changes as a new version. Every decision comes from the server (/v1/classify, /v1/revote): this
// script votes nothing itself. Text from the server is only ever set with textContent (never as HTML).
"use strict";

// seq: bumped by every classify, so an answer to an older query is dropped instead of shown.
const state = { info: null, file: null, embedding: null, before: null, changes: new Map(), applied: null, seq: 0 };

function $(id) { return document.getElementById(id); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) {
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function setState(name) { document.body.dataset.state = name; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
  if (message) setState("error");
}

async function call(method, url, { body, headers } = {}) {
  const response = await fetch(url, { method, body, headers, cache: "no-store" });
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch (e) { data = null; }
  if (!response.ok) {
    const reason = data && data.reason ? data.reason : text.slice(0, 300);
    throw new Error(`${response.status} ${data && data.error ? data.error : ""}: ${reason}`);
  }
  return data;
}

function optionQuery(extra) {
  const q = new URLSearchParams();
  q.set("rule", $("rule").value || "rank");
  q.set("k", $("k").value || "10");
  if ($("abstain").value !== "") q.set("abstain_below", $("abstain").value);
  for (const [key, value] of Object.entries(extra || {})) q.set(key, value);
  return q.toString();
}

function decisionText(p) {
  if (p.abstained) return `abstained (the vote said ${p.vote_label_name})`;
  if (p.label < 0) return "(no neighbours)";
  return p.label_name;
}

function renderDecision(box, p) {
  box.querySelector(".label").textContent = decisionText(p);
  box.querySelector(".confidence").textContent = p.confidence === null ? "" :
    `confidence ${p.confidence.toFixed(3)} (${p.calibrated ? "calibrated" : "raw share of the score"}) · rule ${p.rule}, k ${p.k}`;
  box.querySelector(".reason").textContent = p.abstained ? `${p.abstain_reason}: ${p.reason}` : "";
  const table = box.querySelector(".scores");
  table.replaceChildren(...Object.entries(p.scores).slice(0, 5).map(
    ([name, score]) => el("tr", {}, el("td", { textContent: name }), el("td", { textContent: score.toPrecision(4) }))));
  box.dataset.label = decisionText(p);
}

function currentWeight(n) { return state.changes.has(n.id) ? state.changes.get(n.id) : n.entry_weight; }

function renderNeighbours(p) {
  const grid = $("neighbours");
  grid.replaceChildren();
  for (const n of p.neighbors) {
    const w = currentWeight(n);
    const figure = el("figure", { className: n.label === p.label ? "same" : "other" });
    if (state.changes.has(n.id)) figure.classList.add(w === 0 ? "excluded" : "down");
    figure.dataset.id = n.id;
    figure.dataset.rank = String(n.rank);
    const img = el("img", { alt: `neighbour ${n.rank}`, loading: "lazy" });
    img.src = "/v1/thumbnail?id=" + encodeURIComponent(n.id);
    const caption = el("figcaption", {},
      el("div", { textContent: `#${n.rank} ${n.label_name}` }),
      el("div", { textContent: `similarity ${n.similarity.toFixed(4)}` }),
      el("div", { textContent: `vote weight ${n.weight.toPrecision(4)}` }),
      el("div", { textContent: `entry weight ${w === n.entry_weight ? w : `${n.entry_weight} → ${w}`}` }),
      el("div", { className: "id", textContent: `id ${n.id}` }));
    const exclude = el("button", { type: "button", textContent: "exclude", className: "exclude" });
    exclude.addEventListener("click", () => change(n, 0));
    const down = el("button", { type: "button", textContent: "down-weight", className: "down-weight" });
    down.addEventListener("click", () => change(n, currentWeight(n) * 0.5));
    const reset = el("button", { type: "button", textContent: "reset", className: "reset",
                                 disabled: !state.changes.has(n.id) });
    reset.addEventListener("click", () => { state.changes.delete(n.id); revote(); });
    figure.append(img, caption, exclude, down, reset);
    grid.append(figure);
  }
}

function change(n, weight) {
  state.changes.set(n.id, weight);
  revote();
}

function changeList() {
  return Array.from(state.changes, ([id, weight]) => ({ id, weight }));
}

function renderApply() {
  const n = state.changes.size;
  $("apply-section").hidden = !state.before;
  $("changes-line").textContent = n ? `${n} changed neighbour${n > 1 ? "s" : ""}: ` +
    changeList().map((c) => `${c.id} → ${c.weight}`).join(", ") : "no changes yet: exclude or down-weight a neighbour";
  const writable = state.info && state.info.serving.write_enabled;
  $("apply").disabled = !(writable && n);
  $("apply").title = writable ? "" : "this server takes no write actions (start it with a write token)";
}

async function classify() {
  if (!state.file) return;
  showError("");
  setState("classifying");
  const seq = ++state.seq;
  try {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "query");
    const p = await call("POST", "/v1/classify?" + optionQuery({ return_embedding: "true" }), { body: form });
    if (seq !== state.seq) return;
    state.embedding = p.embedding;
    state.before = p;
    state.changes.clear();
    $("version").textContent = String(p.version);
    $("decisions").hidden = false;
    $("neighbours-section").hidden = false;
    $("before").querySelector(".dv").textContent = String(p.version);
    renderDecision($("before"), p);
    $("after").hidden = true;
    renderNeighbours(p);
    renderApply();
    document.body.dataset.version = String(p.version);
    setState("classified");
  } catch (e) {
    showError(String(e.message || e));
  }
}

async function revote() {
  renderApply();
  if (!state.changes.size) {
    $("after").hidden = true;
    renderNeighbours(state.before);
    setState("classified");
    return;
  }
  setState("revoting");
  const seq = state.seq;
  try {
    const r = await call("POST", "/v1/revote?" + optionQuery(), {
      body: JSON.stringify({ embedding: state.embedding, changes: changeList() }),
      headers: { "Content-Type": "application/json" } });
    if (seq !== state.seq) return;
    renderDecision($("after"), r.after);
    $("after").hidden = false;
    $("after").classList.toggle("changed", decisionText(r.after) !== decisionText(r.before));
    renderNeighbours(r.after);
    setState("revoted");
  } catch (e) {
    showError(String(e.message || e));
  }
}

async function write(url, payload) {
  showError("");
  setState("applying");
  try {
    const r = await call("POST", url, { body: JSON.stringify(payload), headers: {
      "Content-Type": "application/json", "Authorization": "Bearer " + $("token").value } });
    state.applied = r.version;
    $("applied").textContent = `published version ${r.version} (parent ${r.parent}): ${r.summary}`;
    document.body.dataset.appliedVersion = String(r.version);
    $("undo").hidden = false;
    await classify();  // The decision of the new version, from the server.
    setState("applied");
  } catch (e) {
    showError(String(e.message || e));
  }
}

async function loadInfo() {
  try {
    const info = await call("GET", "/v1/info");
    state.info = info;
    $("version").textContent = String(info.serving.version);
    $("entries").textContent = String(info.live.live_entries);
    $("write-state").textContent = info.serving.write_enabled ? "apply enabled (needs the write token)" :
      "read-only (no write token configured)";
    const rule = $("rule");
    rule.replaceChildren(...info.serving.rules.map((r) => el("option", { value: r, textContent: r })));
    rule.value = "rank";
    setState("ready");
  } catch (e) {
    showError(String(e.message || e));
  }
}

function pick(file) {
  if (!file) return;
  state.file = file;
  const img = $("query-image");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  classify();
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => pick(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pick(e.dataTransfer.files[0]);
  });
  for (const id of ["rule", "k", "abstain"]) $(id).addEventListener("change", classify);
  $("reset-all").addEventListener("click", () => { state.changes.clear(); revote(); });
  $("apply").addEventListener("click", () => write("/v1/apply", {
    changes: changeList(), note: $("note").value, version: state.before ? state.before.version : null }));
  $("undo").addEventListener("click", () => write("/v1/undo", { version: state.applied, note: $("note").value }));
  loadInfo();
});

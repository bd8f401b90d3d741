// embedsvc search page: plain JavaScript over the HTTP/JSON API (no build step, no network beyond this server).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { collections: [], query: null, thumbs: [] };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const payload = (response.headers.get("content-type") || "").includes("json") ? await response.json() : {};
  if (!response.ok) {
    const error = new Error(payload.message || response.statusText);
    error.code = payload.code || String(response.status);
    error.status = response.status;
    throw error;
  }
  return payload;
}

function explain(error) {
  if (error.status === 401) {
    return "This server requires an API token: paste a token with the read scope into \u201cAPI token\u201d above " +
           "and press Enter. (" + error.message + ")";
  }
  if (error.status === 403) return "Your token may not do this: " + error.message;
  return error.code + ": " + error.message;
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

function setStatus(text) { $("status").textContent = text; }

// -- collections ----------------------------------------------------------------------------

async function loadCollections() {
  try {
    const reply = await api("GET", "/v1/collections");
    state.collections = reply.collections || [];
    showMessage(state.collections.length ? "" : "No collections yet: create one and upsert items (see API docs).");
  } catch (error) {
    state.collections = [];
    showMessage(explain(error));
  }
  const select = $("collection");
  const previous = select.value;
  select.replaceChildren(...state.collections.map((c) => new Option(label(c), c.config.name)));
  if (state.collections.some((c) => c.config.name === previous)) select.value = previous;
  $("compare-list").replaceChildren(...state.collections.map((c, i) => {
    const item = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = c.config.name;
    box.checked = i < 4;
    item.append(box, " " + label(c));
    return item;
  }));
  document.body.dataset.collections = "listed";  // the list (or its error) is shown: scripts may search now
}

function label(info) {
  const pooling = info.config.pooling && info.config.pooling.name ? info.config.pooling.name : "vectors";
  return info.config.name + " (" + pooling + ", " + info.count + " items)";
}

function targets() {
  if (!$("compare").checked) return [$("collection").value].filter(Boolean);
  return [...$("compare-list").querySelectorAll("input:checked")].map((box) => box.value);
}

// -- queries --------------------------------------------------------------------------------

// The filter box's text goes to the server as is: it parses the grammar of `embedsvc search --filter`
// (embedsvc/store/filter_text.py), so the page, the CLI and the HTTP API cannot disagree on what it means.
function searchOptions() {
  const filterText = $("filter").value.trim();
  return Object.assign({ topK: Math.max(1, Number($("top-k").value) || 12), includeMetadata: true },
                       filterText ? { filterText } : {});
}

function describe(query) {
  if (query.kind === "text") return "\u201c" + query.text + "\u201d";
  if (query.kind === "image") return "image " + query.file.name;
  return "more like " + query.id;
}

async function searchOne(collection, query) {
  const path = "/v1/collections/" + encodeURIComponent(collection) + "/search";
  const options = searchOptions();
  if (query.kind === "image") {
    const form = new FormData();
    form.append("image", query.file, query.file.name);
    form.append("request", JSON.stringify(options));
    return api("POST", path, form);
  }
  const q = query.kind === "text" ? { text: query.text } : { id: query.id };
  return api("POST", path, Object.assign({ queries: [q] }, options));
}

async function run(query) {
  state.query = query;
  if (query.kind !== "text") $("text").value = "";  // Search (Enter) then re-runs this query, e.g. with a filter
  const names = targets();
  if (!names.length) { showMessage("Pick a collection first."); return; }
  const options = searchOptions();
  showMessage("");
  setStatus("Searching " + names.join(", ") + " for " + describe(query) + "\u2026");
  state.thumbs.forEach((url) => URL.revokeObjectURL(url));
  state.thumbs = [];
  const columns = names.map((name) => column(name));
  $("results").replaceChildren(...columns.map((c) => c.section));
  $("results").classList.toggle("compare", names.length > 1);
  const started = performance.now();
  await Promise.all(names.map(async (name, i) => {
    try {
      const reply = await searchOne(name, query);
      fill(columns[i], name, reply.results[0].hits, reply.unknownFilterKeys || []);
    } catch (error) {
      columns[i].list.replaceChildren();
      const p = document.createElement("p");
      p.className = "error";
      p.setAttribute("role", "alert");
      p.textContent = explain(error);
      columns[i].section.append(p);
    }
  }));
  setStatus(describe(query) + " in " + names.length + " collection" + (names.length > 1 ? "s" : "") + ", " +
            Math.round(performance.now() - started) + " ms" + (options.filterText ? ", filtered" : "") +
            ". Click (or Enter on) a result for more like it.");
}

function column(name) {
  const section = document.createElement("section");
  section.className = "column";
  section.dataset.collection = name;
  const info = state.collections.find((c) => c.config.name === name);
  const title = document.createElement("h2");
  title.append(name + " ");
  const small = document.createElement("small");
  small.textContent = info ? (info.config.pooling.name || "vectors") : "";
  title.append(small);
  const list = document.createElement("ol");
  list.className = "grid";
  section.append(title, list);
  return { section, list };
}

function fill(col, collection, hits, unknownKeys) {
  if (!hits.length) {
    const p = document.createElement("p");
    p.textContent = unknownKeys.length
      ? "No hits: no item in " + collection + " has the metadata key " +
        unknownKeys.map((k) => "'" + k + "'").join(", ") + ", so the filter matches nothing."
      : "No hits (check the filter).";
    if (unknownKeys.length) p.setAttribute("role", "alert");
    col.section.append(p);
  }
  col.list.replaceChildren(...hits.map((hit, rank) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hit";
    button.dataset.id = hit.id;
    button.title = "More like " + hit.id;
    const media = document.createElement("div");
    media.className = "media placeholder";
    media.textContent = text(hit.metadata && hit.metadata.caption) || hit.id;
    button.append(media);
    const score = document.createElement("div");
    score.innerHTML = "<span class=rank></span> <span class=score></span>";
    score.querySelector(".rank").textContent = "#" + (rank + 1);
    score.querySelector(".score").textContent = hit.score.toFixed(4);
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = hit.id;
    const meta = document.createElement("dl");
    for (const [key, value] of Object.entries(hit.metadata || {})) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = text(value);
      meta.append(dt, dd);
    }
    button.append(score, id, meta);
    button.addEventListener("click", () => run({ kind: "id", id: hit.id }));
    li.append(button);
    thumbnail(collection, hit, media);
    return li;
  }));
}

function text(value) {
  if (!value) return "";
  if ("stringValue" in value) return value.stringValue;
  if ("numberValue" in value) return String(value.numberValue);
  if ("boolValue" in value) return String(value.boolValue);
  return "";
}

async function thumbnail(collection, hit, placeholder) {
  // fetch, not <img src>: the request must carry the token when the server asks for one
  let src = "";
  try {
    const path = "/v1/collections/" + encodeURIComponent(collection) + "/items/" + encodeURIComponent(hit.id) +
                 "/thumbnail";
    const response = await fetch(path, { headers: headers() });
    if (response.ok) {
      src = URL.createObjectURL(await response.blob());
      state.thumbs.push(src);
    }
  } catch (error) { /* no thumbnail: fall back below */ }
  if (!src && hit.metadata && hit.metadata.uri) src = text(hit.metadata.uri);
  if (!src) return;
  const img = document.createElement("img");
  img.className = "media";
  img.alt = text(hit.metadata && hit.metadata.caption) || hit.id;
  img.src = src;
  placeholder.replaceWith(img);
}

// -- wiring ---------------------------------------------------------------------------------

function imageQuery(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showMessage("That is not an image file: " + file.name); return; }
  run({ kind: "image", file });
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (text) run({ kind: "text", text });
  else if (state.query) run(state.query);
  else showMessage("Type a text, or choose an image, to search.");
});
$("image").addEventListener("change", () => imageQuery($("image").files[0]));
$("compare").addEventListener("change", () => {
  $("compare-set").hidden = !$("compare").checked;
  if (state.query) run(state.query);
});
$("collection").addEventListener("change", () => { if (state.query) run(state.query); });
$("token").addEventListener("change", () => {
  sessionStorage.setItem("embedsvc-token", $("token").value);
  loadCollections();
});
$("token").addEventListener("keydown", (event) => {
  if (event.key === "Enter") { event.preventDefault(); $("token").dispatchEvent(new Event("change")); }
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  imageQuery(event.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("image").click(); }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "/" && document.activeElement.tagName !== "INPUT") { event.preventDefault(); $("text").focus(); }
});

$("token").value = sessionStorage.getItem("embedsvc-token") || "";
loadCollections();

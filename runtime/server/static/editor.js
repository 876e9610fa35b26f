// The editrt browser editor: plain JS over the server's JSON API and the drag WebSocket.
// Reposition: click a subject (mask overlay), drag it (previews stream), release (the final replaces it).
// Elements: the partition overlay; click an element, drag / grow / shrink / delete it, render.
"use strict";

const $ = (id) => document.getElementById(id);
const S = (window.editrt = {
  // #token=... (a fragment never reaches the server or its logs); ?token= still read, the server's log redacts it
  token: sessionStorage.getItem("editrt-token") || new URLSearchParams(location.hash.slice(1)).get("token")
    || new URLSearchParams(location.search).get("token") || "",
  mode: "reposition", session: null, width: 0, height: 0,
  current: null,        // data URL of the image the session edits (what Download saves)
  shown: null,          // data URL on the canvas now (a preview while dragging)
  mask: null,           // Uint8Array width*height, 1 inside the selected subject
  maskB64: null, items: [], overlay: null, selected: null,
  ws: null, seq: 0, drag: null, lastMove: null,
  previews: 0, finals: 0, errors: [], busy: false,
});

// ------------------------------------------------------------------ server calls
async function api(path, { method = "POST", json, form } = {}) {
  const headers = {};
  if (S.token) headers.Authorization = `Bearer ${S.token}`;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  const response = await fetch(path, { method, headers, body });
  if (response.status === 401) { $("auth").hidden = false; throw new Error("this server needs a token"); }
  const data = response.status === 204 ? {} : await response.json();
  if (!response.ok) {
    const retry = response.headers.get("Retry-After");
    throw new Error(`${data.field || "request"}: ${data.message || response.statusText}` + (retry ? ` (retry in ${retry} s)` : ""));
  }
  return data;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").style.color = error ? "#ff8a80" : "";
  if (error) S.errors.push(text);
}

function showLatency(label, t) {
  if (!t) return;
  $("latency").textContent = `${label}: server ${t.server_ms.toFixed(1)} ms · pipeline ${t.pipeline_ms.toFixed(1)} ms · queue ${t.queue_ms.toFixed(1)} ms`;
}

const png = (b64) => `data:image/png;base64,${b64}`;

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not decode the image"));
    img.src = src;
  });
}

// ------------------------------------------------------------------ drawing
async function show(src, resize = false) {
  // The canvas keeps the session image's size; a smaller preview render is drawn scaled to it.
  const img = await loadImage(src);
  const view = $("view");
  if (resize) {
    view.width = $("overlay").width = img.width;
    view.height = $("overlay").height = img.height;
  }
  view.getContext("2d").drawImage(img, 0, 0, view.width, view.height);
  S.shown = src;
}

function drawOverlay(dx = 0, dy = 0) {
  const canvas = $("overlay"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (S.mode === "reposition" && S.mask) {
    const data = ctx.createImageData(S.width, S.height);
    for (let y = 0; y < S.height; y++) {
      for (let x = 0; x < S.width; x++) {
        if (!S.mask[y * S.width + x]) continue;
        const tx = x + Math.round(dx), ty = y + Math.round(dy);
        if (tx < 0 || ty < 0 || tx >= S.width || ty >= S.height) continue;
        const k = 4 * (ty * S.width + tx);
        data.data[k] = 79; data.data[k + 1] = 156; data.data[k + 2] = 255; data.data[k + 3] = 110;
      }
    }
    ctx.putImageData(data, 0, 0);
  }
  if (S.mode === "elements") {
    if (S.overlay && $("show-overlay").checked && !S.drag) { ctx.globalAlpha = 0.55; ctx.drawImage(S.overlay, 0, 0); ctx.globalAlpha = 1; }
    const item = S.items.find((e) => e.id === S.selected);
    if (item) {
      ctx.strokeStyle = "#ffd400"; ctx.lineWidth = Math.max(1, S.width / 300);
      ctx.strokeRect(item.x - item.w / 2 + dx, item.y - item.h / 2 + dy, item.w, item.h);
    }
  }
}

function setBusy(busy) {
  S.busy = busy;
  document.body.classList.toggle("busy", busy);
}

function refreshButtons(undo) {
  $("undo").disabled = !S.session || !undo;
  const has = S.selected !== null;
  for (const id of ["grow", "shrink", "delete"]) $(id).disabled = !has;
  $("render").disabled = !S.session;
  $("download").href = S.current || "#";
  $("download").classList.toggle("disabled", !S.current);
}

// ------------------------------------------------------------------ sessions
async function open(file) {
  closeSocket();
  if (S.session) api(`/v1/sessions/${S.session}`, { method: "DELETE" }).catch(() => {});
  S.session = null; S.mask = null; S.items = []; S.overlay = null; S.selected = null;
  const form = new FormData();
  form.append("image", file, file.name || "image.png");
  form.append("kind", S.mode);
  setBusy(true);
  status(S.mode === "elements" ? "partitioning into elements…" : "opening…");
  try {
    const url = URL.createObjectURL(file);
    await show(url, true);
    S.current = await blobToDataURL(file);
    const info = await api("/v1/sessions", { form });
    S.session = info.id; S.width = info.width; S.height = info.height;
    await applyInfo(info);
    showLatency("open", info.timing);
    status(S.mode === "elements" ? `${info.items.length} elements: click one, drag it, or edit it` :
      "click a subject to select it");
    $("hint").textContent = "";
    refreshButtons(info.undo);
  } catch (e) { status(e.message, true); } finally { setBusy(false); }
}

function blobToDataURL(blob) {
  return new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(blob); });
}

async function applyInfo(info) {
  if (info.image) { S.current = png(info.image); await show(S.current); }
  if (info.items) S.items = info.items;
  S.overlay = info.overlay ? await loadImage(png(info.overlay)) : null;
  if (S.selected !== null && !S.items.some((e) => e.id === S.selected)) S.selected = null;
  $("selected").textContent = S.selected === null ? "none" : `#${S.selected}`;
  drawOverlay();
}

function socket() {
  if (S.ws && S.ws.readyState <= 1) return S.ws;
  const base = location.origin.replace(/^http/, "ws");
  // The token travels as a subprotocol, never in the URL (access logs and histories keep URLs).
  const ws = new WebSocket(`${base}/v1/sessions/${S.session}/drag`, S.token ? ["editrt", `bearer.${S.token}`] : ["editrt"]);
  ws.onmessage = (event) => onMessage(JSON.parse(event.data));
  ws.onclose = (event) => { if (S.ws === ws) S.ws = null; if (event.code === 1008) status(event.reason || "closed by the server", true); };
  S.ws = ws;
  return ws;
}

function closeSocket() { if (S.ws) { S.ws.close(); S.ws = null; } }

// The repositioning stages the page offers (the session API's options; the server refuses them without
// depth / matting weights, and that error shows in the status line).
function stageOptions() {
  if (S.mode !== "reposition") return {};
  const options = {};
  if ($("occlusion").checked) options.occlusion = "auto";
  if ($("auto-scale").checked) options.scale = "auto";
  if ($("matting").checked) options.matting = true;
  return options;
}

function send(message) {
  const ws = socket();
  const text = JSON.stringify(message);
  if (ws.readyState === 1) ws.send(text);
  else ws.addEventListener("open", () => ws.send(text), { once: true });
}

async function onMessage(m) {
  if (m.type === "error") { status(m.message, true); setBusy(false); return; }
  if (m.type === "busy") { status(`server busy: preview #${m.seq} skipped`); return; }
  if (m.type === "preview") {
    if (!S.drag) return;  // a late preview after release: the final is on its way
    await show(png(m.image));
    S.previews += 1;
    showLatency(`preview #${m.seq}`, m.timing);
    return;
  }
  if (m.type === "final") {
    S.finals += 1;
    showLatency("final", m.timing);
    if (S.mode === "reposition") {
      S.current = png(m.image);
      await show(S.current);
      S.mask = null; S.maskB64 = null;
      status("done: click a subject to move another one");
    } else {
      await show(png(m.image));
      S.current = png(m.image);
      await applyInfo(await api(`/v1/sessions/${S.session}`, { method: "GET" }));
      status("rendered");
    }
    drawOverlay();
    refreshButtons(m.undo);
    setBusy(false);
  }
}

// ------------------------------------------------------------------ pointer
function imagePoint(event) {
  const rect = $("view").getBoundingClientRect();
  return [(event.clientX - rect.left) * $("view").width / rect.width, (event.clientY - rect.top) * $("view").height / rect.height];
}

function inMask([x, y]) {
  if (!S.mask) return false;
  const xi = Math.floor(x), yi = Math.floor(y);
  return xi >= 0 && yi >= 0 && xi < S.width && yi < S.height && S.mask[yi * S.width + xi] === 1;
}

function inSelected([x, y]) {
  const item = S.items.find((e) => e.id === S.selected);
  return item && Math.abs(x - item.x) <= item.w / 2 && Math.abs(y - item.y) <= item.h / 2;
}

$("stage").addEventListener("pointerdown", (event) => {
  if (!S.session || S.busy) return;
  const p = imagePoint(event);
  const grab = S.mode === "reposition" ? inMask(p) : inSelected(p);
  S.drag = { start: p, moved: false, grab };
  $("stage").setPointerCapture(event.pointerId);
});

$("stage").addEventListener("pointermove", (event) => {
  if (!S.drag || !S.drag.grab) return;
  const [x, y] = imagePoint(event);
  const dx = x - S.drag.start[0], dy = y - S.drag.start[1];
  if (!S.drag.moved && Math.hypot(dx, dy) < 2) return;
  S.drag.moved = true;
  S.lastMove = [dx, dy];
  drawOverlay(dx, dy);
  send({ type: "drag", dx, dy, seq: ++S.seq, ...stageOptions(), ...(S.mode === "elements" ? { ids: [S.selected] } : {}) });
});

$("stage").addEventListener("pointerup", async (event) => {
  const drag = S.drag;
  if (!drag) return;
  if (drag.grab && drag.moved) {
    const [x, y] = imagePoint(event);
    const dx = x - drag.start[0], dy = y - drag.start[1];
    S.lastMove = [dx, dy];
    setBusy(true);
    status("rendering the final…");
    send({ type: "release", dx, dy, seq: ++S.seq, ...stageOptions(), ...(S.mode === "elements" ? { ids: [S.selected] } : {}) });
    S.drag = null;
    return;
  }
  S.drag = null;
  if (S.mode === "reposition") await select(drag.start); else await selectElement(drag.start);
});

async function select([x, y]) {
  setBusy(true);
  status("segmenting…");
  try {
    const r = await api(`/v1/sessions/${S.session}/select`, { json: { points: [[x, y]] } });
    S.maskB64 = r.mask;
    S.mask = await maskBits(r.mask);
    showLatency("select", r.timing);
    status(`subject: ${r.area} px — drag it`);
    drawOverlay();
  } catch (e) { status(e.message, true); } finally { setBusy(false); }
}

async function maskBits(b64) {
  const img = await loadImage(png(b64));
  const c = document.createElement("canvas");
  c.width = img.width; c.height = img.height;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, img.width, img.height).data;
  const bits = new Uint8Array(img.width * img.height);
  for (let i = 0; i < bits.length; i++) bits[i] = px[4 * i] > 127 ? 1 : 0;
  return bits;
}

async function selectElement([x, y]) {
  try {
    const r = await api(`/v1/sessions/${S.session}/elements/select`, { json: { point: [x, y] } });
    S.selected = r.ids.length ? r.ids[0] : null;
    $("selected").textContent = S.selected === null ? "none" : `#${S.selected}`;
    status(S.selected === null ? "no element there" : `element #${S.selected}: drag it, grow, shrink or delete it`);
    drawOverlay();
    refreshButtons(!$("undo").disabled);
  } catch (e) { status(e.message, true); }
}

async function edit(op) {
  try {
    const info = await api(`/v1/sessions/${S.session}/elements/edit`, { json: { ops: [{ ids: [S.selected], ...op }] } });
    await applyInfo(info);
    status(`${op.op} done: ${info.items.length} elements — Render to see it`);
    refreshButtons(info.undo);
  } catch (e) { status(e.message, true); }
}

// ------------------------------------------------------------------ buttons
$("file").addEventListener("change", () => { if ($("file").files[0]) open($("file").files[0]); });
$("photo").addEventListener("click", async () => {
  const response = await fetch("/assets/photo.png");
  open(new File([await response.blob()], "chelsea.png", { type: "image/png" }));
});
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", async () => {
    S.mode = radio.value;
    $("elements-tools").hidden = S.mode !== "elements";
    $("reposition-tools").hidden = S.mode !== "reposition";
    if (S.current) open(await (await fetch(S.current)).blob());
  });
}
$("undo").addEventListener("click", async () => {
  try {
    const info = await api(`/v1/sessions/${S.session}/undo`);
    S.mask = null;
    await applyInfo(info);
    showLatency("undo", info.timing);
    status("undone");
    refreshButtons(info.undo);
  } catch (e) { status(e.message, true); }
});
$("grow").addEventListener("click", () => edit({ op: "resize", scale: 1.25 }));
$("shrink").addEventListener("click", () => edit({ op: "resize", scale: 0.8 }));
$("delete").addEventListener("click", () => edit({ op: "delete" }));
$("show-overlay").addEventListener("change", () => drawOverlay());
$("render").addEventListener("click", async () => {
  setBusy(true);
  status("rendering…");
  try {
    const r = await api(`/v1/sessions/${S.session}/render`, { json: {} });
    S.current = png(r.image);
    await show(S.current);
    showLatency("render", r.timing);
    status("rendered");
    refreshButtons(!$("undo").disabled);
  } catch (e) { status(e.message, true); } finally { setBusy(false); }
});
$("token-set").addEventListener("click", () => {
  S.token = $("token").value;
  sessionStorage.setItem("editrt-token", S.token);
  $("auth").hidden = true;
  status("token set");
});

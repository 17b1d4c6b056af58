// The gateway's zero-footprint viewer: plain JavaScript on the gateway's own DICOMweb (no build step, nothing to
// install). Frames come from WADO-RS `frames` as native pixels (the gateway decodes every transfer syntax it
// stores, server-side); window/level, zoom, pan and measurement happen here on a canvas. The whole stack is
// prefetched (six requests at a time, nearest first) so that scrolling does not wait.
"use strict";

const API = "/dicomweb";
const $ = (s) => document.querySelector(s);
const first = (obj, t) => (obj && obj[t] && obj[t].Value ? obj[t].Value[0] : undefined);
const all = (obj, t) => (obj && obj[t] && obj[t].Value ? obj[t].Value : []);
const pn = (v) => (v && typeof v === "object" ? v.Alphabetic || "" : v || "");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function getJson(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/dicom+json" } });
  if (r.status === 204) return [];
  if (!r.ok) throw new Error(`${r.status} ${url}`);
  return r.json();
}

// ------------------------------------------------------------------------------------------ the study list
async function search(ev) {
  if (ev) ev.preventDefault();
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("#search"))) if (v) params.append(k, v);
  params.append("includefield", "all");
  const rows = await getJson(`${API}/studies?${params}`);
  const body = $("#studies tbody");
  body.innerHTML = "";
  for (const s of rows) {
    const tr = document.createElement("tr");
    tr.dataset.study = first(s, "0020000D");
    tr.innerHTML = [pn(first(s, "00100010")), first(s, "00100020"), first(s, "00080020"), first(s, "00081030"),
      all(s, "00080061").join(" "), first(s, "00201206"), first(s, "00201208")].map((v) => `<td>${esc(v)}</td>`).join("");
    tr.onclick = () => { location.hash = `study=${tr.dataset.study}`; };
    body.appendChild(tr);
  }
  viewer.listed = rows.length;
}

// ------------------------------------------------------------------------------------------ one study
async function openStudy(studyUid) {
  $("#list").hidden = true;
  $("#study").hidden = false;
  const series = await getJson(`${API}/studies/${studyUid}/series?includefield=all`);
  series.sort((a, b) => (first(a, "00200011") ?? 0) - (first(b, "00200011") ?? 0));
  const strip = $("#strip");
  strip.innerHTML = "";
  for (const se of series) {
    const uid = first(se, "0020000E");
    const fig = document.createElement("figure");
    fig.dataset.series = uid;
    fig.innerHTML = `<img alt="" src="${API}/studies/${studyUid}/series/${uid}/thumbnail?viewport=128,128">` +
      `<figcaption>${esc(first(se, "00080060"))} ${esc(first(se, "00200011") ?? "")} ${esc(first(se, "0008103E") ?? "")}` +
      ` (${esc(first(se, "00201209"))})</figcaption>`;
    fig.onclick = () => loadSeries(studyUid, uid);
    strip.appendChild(fig);
  }
  if (series.length) await loadSeries(studyUid, first(series[0], "0020000E"));
}

function frameKey(img) { return `${img.sop}/${img.frame}`; }

async function loadSeries(studyUid, seriesUid) {
  for (const f of document.querySelectorAll("#strip figure")) f.classList.toggle("on", f.dataset.series === seriesUid);
  const meta = await getJson(`${API}/studies/${studyUid}/series/${seriesUid}/metadata`);
  meta.sort((a, b) => (first(a, "00200013") ?? 0) - (first(b, "00200013") ?? 0));
  const images = [];
  for (const m of meta) {
    const frames = Number(first(m, "00280008") ?? 1) || 1;
    for (let f = 1; f <= frames; f++) images.push({ study: studyUid, series: seriesUid, sop: first(m, "00080018"), frame: f, meta: m });
  }
  Object.assign(viewer, { images, index: 0, pixels: new Map(), wl: null, zoom: 1,
    pan: [0, 0], measure: null, generation: viewer.generation + 1, loaded: 0 });
  prefetch(viewer.generation);
  draw();
}

// ------------------------------------------------------------------------------------------ frames
function firstPart(buffer, contentType) {
  const m = /boundary="?([^";]+)"?/i.exec(contentType || "");
  const bytes = new Uint8Array(buffer);
  if (!m) return bytes;
  const find = (needle, from) => {
    outer: for (let i = from; i <= bytes.length - needle.length; i++) {
      for (let j = 0; j < needle.length; j++) if (bytes[i + j] !== needle[j]) continue outer;
      return i;
    }
    return -1;
  };
  const enc = new TextEncoder();
  const start = find(enc.encode("\r\n\r\n"), 0) + 4;
  const end = find(enc.encode(`\r\n--${m[1]}`), start);
  return bytes.slice(start, end < 0 ? bytes.length : end);
}

async function fetchFrame(img) {
  const url = `${API}/studies/${img.study}/series/${img.series}/instances/${img.sop}/frames/${img.frame}`;
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: 'multipart/related; type="application/octet-stream"' } });
  if (!r.ok) throw new Error(`${r.status} frame`);
  const raw = firstPart(await r.arrayBuffer(), r.headers.get("Content-Type")).buffer;
  const m = img.meta;
  const bits = Number(first(m, "00280100") ?? 16);
  const signed = Number(first(m, "00280103") ?? 0) === 1;
  const samples = Number(first(m, "00280002") ?? 1);
  const data = bits > 8 ? (signed ? new Int16Array(raw) : new Uint16Array(raw)) : (signed ? new Int8Array(raw) : new Uint8Array(raw));
  return { data, samples, rows: Number(first(m, "00280010")), cols: Number(first(m, "00280011")) };
}

async function prefetch(generation) {
  const order = viewer.images.map((_, i) => i).sort((a, b) => Math.abs(a - viewer.index) - Math.abs(b - viewer.index));
  let next = 0;
  const worker = async () => {
    while (next < order.length && generation === viewer.generation) {
      const img = viewer.images[order[next++]];
      const key = frameKey(img);
      if (viewer.pixels.has(key)) continue;
      try {
        viewer.pixels.set(key, await fetchFrame(img));
        viewer.loaded++;
      } catch (e) {
        viewer.errors.push(String(e));
      }
      if (generation === viewer.generation && frameKey(viewer.images[viewer.index]) === key) draw();
    }
  };
  await Promise.all(Array.from({ length: 6 }, worker));
}

// ------------------------------------------------------------------------------------------ drawing
function defaultWindow(m, values, slope, intercept) {
  const c = first(m, "00281050"), w = first(m, "00281051");
  if (c !== undefined && w !== undefined && Number(w) > 0) return { c: Number(c), w: Number(w) };
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < values.length; i++) { const v = values[i] * slope + intercept; if (v < lo) lo = v; if (v > hi) hi = v; }
  return { c: (lo + hi) / 2, w: Math.max(hi - lo, 1) };
}

// the frame as 8-bit RGBA at its own size: modality rescale, the window, MONOCHROME1 inverted (as the gateway's
// `rendered` does it, so that both show the same image)
function toImageData(img, px) {
  const m = img.meta;
  const slope = Number(first(m, "00281053") ?? 1), intercept = Number(first(m, "00281052") ?? 0);
  if (!viewer.wl) viewer.wl = defaultWindow(m, px.data, slope, intercept);
  const out = new ImageData(px.cols, px.rows);
  const d = out.data, v = px.data;
  if (px.samples === 3) {
    for (let i = 0, j = 0; i < px.rows * px.cols; i++, j += 3) { d[4 * i] = v[j]; d[4 * i + 1] = v[j + 1]; d[4 * i + 2] = v[j + 2]; d[4 * i + 3] = 255; }
    return out;
  }
  const { c, w } = viewer.wl;
  const lo = c - 0.5 - (w - 1) / 2, span = Math.max(w - 1, 1);
  const invert = first(m, "00280004") === "MONOCHROME1";
  for (let i = 0; i < px.rows * px.cols; i++) {
    let g = Math.trunc(Math.min(255, Math.max(0, ((v[i] * slope + intercept - lo) / span) * 255)));
    if (invert) g = 255 - g;
    d[4 * i] = d[4 * i + 1] = d[4 * i + 2] = g;
    d[4 * i + 3] = 255;
  }
  return out;
}

const scratch = document.createElement("canvas");

function draw() {
  const canvas = $("#view");
  const stage = $("#stage");
  canvas.width = stage.clientWidth;
  canvas.height = stage.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const img = viewer.images[viewer.index];
  if (!img) return;
  const px = viewer.pixels.get(frameKey(img));
  overlay(img);
  if (!px) { $("#ov-br").textContent = "loading…"; return; }
  const data = toImageData(img, px);
  viewer.lastImage = data;
  scratch.width = px.cols;
  scratch.height = px.rows;
  scratch.getContext("2d").putImageData(data, 0, 0);
  const fit = Math.min(canvas.width / px.cols, canvas.height / px.rows);
  const scale = fit * viewer.zoom;
  const x0 = (canvas.width - px.cols * scale) / 2 + viewer.pan[0], y0 = (canvas.height - px.rows * scale) / 2 + viewer.pan[1];
  viewer.transform = { x0, y0, scale };
  ctx.imageSmoothingEnabled = scale < 1;
  ctx.drawImage(scratch, x0, y0, px.cols * scale, px.rows * scale);
  if (viewer.measure) drawMeasure(ctx, img);
  overlay(img);
}

function spacing(m) {
  const s = all(m, "00280030");
  return s.length === 2 ? [Number(s[0]), Number(s[1])] : null;  // row spacing, column spacing (mm)
}

function measureMm(img) {
  const { a, b } = viewer.measure;
  const s = spacing(img.meta);
  if (!s) return null;
  return Math.hypot((b[0] - a[0]) * s[1], (b[1] - a[1]) * s[0]);
}

function drawMeasure(ctx, img) {
  const { a, b } = viewer.measure;
  const t = viewer.transform;
  const p = (q) => [t.x0 + q[0] * t.scale, t.y0 + q[1] * t.scale];
  const [ax, ay] = p(a), [bx, by] = p(b);
  ctx.strokeStyle = "#ff0"; ctx.lineWidth = 2;
  ctx.beginPath(); ctx.moveTo(ax, ay); ctx.lineTo(bx, by); ctx.stroke();
  const mm = measureMm(img);
  ctx.fillStyle = "#ff0"; ctx.font = "14px sans-serif";
  ctx.fillText(mm === null ? "no pixel spacing" : `${mm.toFixed(1)} mm`, bx + 6, by);
}

function overlay(img) {
  const m = img.meta;
  $("#ov-tl").textContent = `${pn(first(m, "00100010"))}\n${first(m, "00100020") ?? ""}\n${first(m, "00100030") ?? ""}`;
  $("#ov-tr").textContent = `${first(m, "00081030") ?? ""}\n${first(m, "00080020") ?? ""}\n${first(m, "0008103E") ?? ""}`;
  $("#ov-bl").textContent = `image ${viewer.index + 1} / ${viewer.images.length}` + (img.frame > 1 ? ` (frame ${img.frame})` : "");
  const wl = viewer.wl ? `W ${Math.round(viewer.wl.w)} L ${Math.round(viewer.wl.c)}` : "";
  $("#ov-br").textContent = `${wl}\nzoom ${viewer.zoom.toFixed(2)}`;
}

// ------------------------------------------------------------------------------------------ interaction
function go(step) {
  if (!viewer.images.length) return;
  viewer.index = Math.max(0, Math.min(viewer.images.length - 1, viewer.index + step));
  draw();
}

function toImage(ev) {
  const r = $("#view").getBoundingClientRect();
  const t = viewer.transform;
  return [(ev.clientX - r.left - t.x0) / t.scale, (ev.clientY - r.top - t.y0) / t.scale];
}

function wire() {
  const canvas = $("#view");
  canvas.addEventListener("wheel", (ev) => { ev.preventDefault(); go(ev.deltaY > 0 ? 1 : -1); }, { passive: false });
  document.addEventListener("keydown", (ev) => {
    const steps = { ArrowDown: 1, ArrowRight: 1, PageDown: 10, ArrowUp: -1, ArrowLeft: -1, PageUp: -10 };
    if (ev.key in steps) { ev.preventDefault(); go(steps[ev.key]); }
    if (ev.key === "Home") go(-1e9);
    if (ev.key === "End") go(1e9);
  });
  let drag = null;
  canvas.addEventListener("pointerdown", (ev) => {
    canvas.setPointerCapture(ev.pointerId);
    drag = { x: ev.clientX, y: ev.clientY, tool: ev.button === 2 ? "zoom" : ev.button === 1 ? "pan" : viewer.tool };
    if (drag.tool === "measure" && viewer.transform) viewer.measure = { a: toImage(ev), b: toImage(ev) };
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    drag.x = ev.clientX; drag.y = ev.clientY;
    if (drag.tool === "wl" && viewer.wl) { viewer.wl = { c: viewer.wl.c + dy * Math.max(1, viewer.wl.w / 256), w: Math.max(1, viewer.wl.w + dx * Math.max(1, viewer.wl.w / 256)) }; }
    else if (drag.tool === "zoom") viewer.zoom = Math.min(20, Math.max(0.1, viewer.zoom * Math.exp(-dy / 200)));
    else if (drag.tool === "pan") viewer.pan = [viewer.pan[0] + dx, viewer.pan[1] + dy];
    else if (drag.tool === "measure" && viewer.measure) viewer.measure.b = toImage(ev);
    draw();
  });
  canvas.addEventListener("pointerup", () => { drag = null; });
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  for (const b of document.querySelectorAll("#tools button[data-tool]")) {
    b.onclick = () => {
      viewer.tool = b.dataset.tool;
      for (const o of document.querySelectorAll("#tools button[data-tool]")) o.classList.toggle("on", o === b);
    };
  }
  $("#reset").onclick = () => { Object.assign(viewer, { wl: null, zoom: 1, pan: [0, 0], measure: null }); draw(); };
  $("#preset").onchange = (ev) => {
    if (!ev.target.value) return;
    const [c, w] = ev.target.value.split(",").map(Number);
    viewer.wl = { c, w };
    draw();
  };
  $("#cine").onclick = () => {
    if (viewer.cine) { clearInterval(viewer.cine); viewer.cine = null; return; }
    viewer.cine = setInterval(() => { viewer.index = (viewer.index + 1) % Math.max(1, viewer.images.length); draw(); }, 100);
  };
  $("#back").onclick = () => { location.hash = ""; };
  $("#search").addEventListener("submit", search);
  window.addEventListener("resize", draw);
  window.addEventListener("hashchange", route);
}

function route() {
  const m = /study=([0-9.]+)/.exec(location.hash);
  if (m) return openStudy(m[1]);
  $("#study").hidden = true;
  $("#list").hidden = false;
  return search();
}

const viewer = { images: [], index: 0, pixels: new Map(), wl: null, zoom: 1, pan: [0, 0], tool: "wl", measure: null,
  generation: 0, loaded: 0, errors: [], listed: 0, transform: null, lastImage: null, cine: null, go, draw, measureMm };
window.viewer = viewer;
wire();
route();

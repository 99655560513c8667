// Klein LoRA Studio: the trainer node's live panel.
// A loss chart (raw points, EMA curve, log-scale toggle), step/total, it/s and ETA, and the latest
// checkpoint samples as thumbnails (click: full image); a run stopped at its peak gets a mark on the chart
// at the step where it stopped and at the checkpoint it kept, with the reason (hover the line below the
// chart). Data comes from the pack's websocket events
// (klein_lora.progress / .checkpoint / .samples / .stopped, sent by nodes/lora_trainer.py); on page load the
// current/last run is replayed from GET /klein_lora/history, so a reload mid-run keeps the chart.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINER = "KleinLoRATrainer";
const EVENTS = ["progress", "checkpoint", "samples", "stopped"];
const EMA = 0.9; // weight of the previous smoothed value
const RATE_WINDOW = 20; // steps used for it/s

// Test hook and debugging aid: counts of what the panel received and drew.
const stats = (window.__kleinLora = { points: 0, samples: 0, thumbnails: 0, replayed: 0, draws: 0, stopMarks: 0 });

const runs = new Map(); // node id (string) -> run state

function newRun() {
  return { points: [], ema: [], step: 0, total: 0, rate: [], samples: null, checkpoint: null, done: null,
    stopped: null };
}

function runFor(id) {
  id = String(id);
  if (!runs.has(id)) runs.set(id, newRun());
  return runs.get(id);
}

// Apply one event to the run state; `t` is seconds (server time when replayed, page time when live).
function apply(event, data, t, source) {
  const name = event.replace(/^klein_lora\./, "");
  let run = runFor(data.node);
  if (name === "progress") {
    if (data.step === run.step) return String(data.node); // seen already (replay and live overlap)
    if (data.step < run.step) { // a new run on this node
      run = newRun();
      runs.set(String(data.node), run);
    }
    const prev = run.ema.length ? run.ema[run.ema.length - 1][1] : data.loss;
    run.points.push([data.step, data.loss]);
    run.ema.push([data.step, run.ema.length ? EMA * prev + (1 - EMA) * data.loss : data.loss]);
    run.step = data.step;
    run.total = data.total;
    run.done = null;
    run.stopped = null; // a resumed run goes on past its old stop
    if (run.rate.length && run.rate[run.rate.length - 1][2] !== source) run.rate = [];
    run.rate.push([data.step, t, source]);
    if (run.rate.length > RATE_WINDOW) run.rate.shift();
    stats.points += 1;
  } else if (name === "samples") {
    run.samples = { step: data.step, images: data.images ?? [] };
    stats.samples += 1;
  } else if (name === "checkpoint") {
    run.checkpoint = { step: data.step, path: data.path };
  } else if (name === "stopped") {
    run.stopped = { step: data.step, keep: data.keep_step, reason: data.reason ?? "" };
  }
  return String(data.node);
}

function speed(run) {
  const r = run.rate;
  if (r.length < 2) return null;
  const [s0, t0] = r[0];
  const [s1, t1] = r[r.length - 1];
  return t1 > t0 ? (s1 - s0) / (t1 - t0) : null;
}

function fmtTime(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

function viewURL(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder ?? "", type: img.type ?? "output" });
  return api.apiURL(`/view?${q}`);
}

function showFull(url) {
  const overlay = document.createElement("div");
  overlay.className = "klein-lora-overlay";
  const img = document.createElement("img");
  img.src = url;
  overlay.append(img);
  overlay.addEventListener("click", () => overlay.remove());
  document.body.append(overlay);
}

const CSS = `
.klein-lora-panel { display:flex; flex-direction:column; gap:4px; font:11px sans-serif; color:#ddd; width:100%; height:100%;
  box-sizing:border-box; padding:2px 4px; overflow:hidden; }
.klein-lora-head { display:flex; justify-content:space-between; align-items:center; gap:6px; white-space:nowrap; }
.klein-lora-head label { cursor:pointer; user-select:none; }
.klein-lora-chart { width:100%; flex:1 1 auto; min-height:110px; background:#1b1b1f; border-radius:4px; }
.klein-lora-sub { color:#9aa; line-height:1.4; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.klein-lora-thumbs { display:flex; gap:4px; overflow-x:auto; min-height:0; }
.klein-lora-thumbs img { height:56px; border-radius:3px; cursor:zoom-in; border:1px solid #444; }
.klein-lora-overlay { position:fixed; inset:0; background:rgba(0,0,0,.85); display:flex; align-items:center;
  justify-content:center; z-index:10000; cursor:zoom-out; }
.klein-lora-overlay img { max-width:95vw; max-height:95vh; image-rendering:pixelated; }
`;

function injectCSS() {
  if (document.getElementById("klein-lora-css")) return;
  const style = document.createElement("style");
  style.id = "klein-lora-css";
  style.textContent = CSS;
  document.head.append(style);
}

class Panel {
  constructor(node) {
    this.node = node;
    this.log = false;
    this.el = document.createElement("div");
    this.el.className = "klein-lora-panel";
    this.head = document.createElement("div");
    this.head.className = "klein-lora-head";
    this.status = document.createElement("span");
    const label = document.createElement("label");
    this.logBox = document.createElement("input");
    this.logBox.type = "checkbox";
    this.logBox.addEventListener("change", () => { this.log = this.logBox.checked; this.render(); });
    label.append(this.logBox, " log");
    this.head.append(this.status, label);
    this.canvas = document.createElement("canvas");
    this.canvas.className = "klein-lora-chart";
    this.sub = document.createElement("div");
    this.sub.className = "klein-lora-sub";
    this.thumbs = document.createElement("div");
    this.thumbs.className = "klein-lora-thumbs";
    this.el.append(this.head, this.canvas, this.sub, this.thumbs);
    this.thumbKey = null;
    new ResizeObserver(() => this.render()).observe(this.canvas);
  }

  run() {
    return runs.get(String(this.node.id)) ?? null;
  }

  render() {
    const run = this.run();
    this.renderText(run);
    this.renderThumbs(run);
    this.renderChart(run);
    stats.draws += 1;
  }

  renderText(run) {
    if (!run || !run.points.length) {
      this.status.textContent = "waiting for training…";
      this.sub.textContent = "";
      return;
    }
    const loss = run.points[run.points.length - 1][1];
    const rate = speed(run);
    const left = run.total - run.step;
    const eta = run.stopped ? "stopped at the peak" : run.done ? "done" : rate ? `ETA ${fmtTime(left / rate)}` : "ETA –";
    this.status.textContent = `step ${run.step}/${run.total}  loss ${loss.toFixed(4)}  ` +
      `${rate ? rate.toFixed(2) : "–"} it/s  ${eta}`;
    const parts = [];
    if (run.checkpoint) parts.push(`ckpt @${run.checkpoint.step}: ${run.checkpoint.path.split(/[\\/]/).pop()}`);
    if (run.stopped) parts.push(`stopped @${run.stopped.step}, kept step ${run.stopped.keep}`);
    if (run.done) parts.push(`saved ${run.done.split(/[\\/]/).pop()}`);
    this.sub.textContent = parts.join("  ·  ");
    this.sub.title = run.stopped?.reason ?? "";
  }

  renderThumbs(run) {
    const samples = run?.samples;
    const key = samples ? `${samples.step}:${samples.images.map((i) => i.filename).join(",")}` : null;
    if (key === this.thumbKey) return;
    this.thumbKey = key;
    this.thumbs.replaceChildren();
    if (!samples) return;
    for (const img of samples.images) {
      const el = document.createElement("img");
      const url = viewURL(img);
      el.src = url;
      el.title = `samples at step ${samples.step}: ${img.filename} (click for full size)`;
      el.addEventListener("click", () => showFull(url));
      this.thumbs.append(el);
    }
    stats.thumbnails = document.querySelectorAll(".klein-lora-thumbs img").length;
  }

  renderChart(run) {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(c.clientWidth * dpr)), h = Math.max(1, Math.round(c.clientHeight * dpr));
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const W = c.clientWidth, H = c.clientHeight;
    ctx.clearRect(0, 0, W, H);
    if (!run || !run.points.length) {
      ctx.fillStyle = "#667";
      ctx.font = "11px sans-serif";
      ctx.fillText("loss chart: queue the workflow", 8, H / 2);
      return;
    }
    const f = this.log ? (v) => Math.log10(Math.max(v, 1e-12)) : (v) => v;
    let lo = Math.min(...run.points.map((p) => f(p[1]))), hi = Math.max(...run.points.map((p) => f(p[1])));
    if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
    const maxStep = Math.max(run.total, run.step, 1);
    const L = 40, R = 6, T = 6, B = 16;
    const x = (s) => L + (s / maxStep) * (W - L - R);
    const y = (v) => T + (1 - (f(v) - lo) / (hi - lo)) * (H - T - B);
    // axes and labels
    ctx.strokeStyle = "#333";
    ctx.fillStyle = "#889";
    ctx.font = "10px sans-serif";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 3; i++) {
      const fy = lo + ((hi - lo) * i) / 3;
      const py = T + (1 - i / 3) * (H - T - B);
      ctx.beginPath(); ctx.moveTo(L, py); ctx.lineTo(W - R, py); ctx.stroke();
      const v = this.log ? 10 ** fy : fy;
      ctx.fillText(v.toPrecision(3), 2, py + 3);
    }
    ctx.fillText("0", L, H - 3);
    const lab = String(maxStep);
    ctx.fillText(lab, W - R - ctx.measureText(lab).width, H - 3);
    // raw points
    ctx.fillStyle = "rgba(125,211,252,0.7)";
    for (const [s, v] of run.points) ctx.fillRect(x(s) - 1.5, y(v) - 1.5, 3, 3);
    // EMA curve
    ctx.strokeStyle = "#38bdf8";
    ctx.lineWidth = 2;
    ctx.beginPath();
    run.ema.forEach(([s, v], i) => (i ? ctx.lineTo(x(s), y(v)) : ctx.moveTo(x(s), y(v))));
    ctx.stroke();
    if (run.stopped) this.renderStop(ctx, run.stopped, x, T, H - B);
  }

  // Where the run stopped (dashed, orange) and the checkpoint it kept (green), labelled on the chart.
  renderStop(ctx, stop, x, top, bottom) {
    ctx.save();
    ctx.lineWidth = 1.5;
    for (const [step, colour, text] of [[stop.keep, "#4ade80", `kept ${stop.keep}`],
      [stop.step, "#fb923c", `stopped ${stop.step}`]]) {
      ctx.strokeStyle = colour;
      ctx.setLineDash(step === stop.step ? [4, 3] : []);
      ctx.beginPath(); ctx.moveTo(x(step), top); ctx.lineTo(x(step), bottom); ctx.stroke();
      ctx.fillStyle = colour;
      ctx.fillText(text, Math.max(2, x(step) - ctx.measureText(text).width - 3), top + (step === stop.step ? 10 : 22));
    }
    ctx.restore();
    stats.stopMarks += 1;
  }
}

function panelsFor(id) {
  const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
  return node?.kleinPanel ? [node.kleinPanel] : [];
}

function renderAll() {
  for (const node of app.graph?.nodes ?? []) node.kleinPanel?.render();
}

// Live events that arrive before the history is replayed wait here, so that a reload mid-run does not
// take the replayed (older) steps for a new run.
let pending = [];

function applyLive(event, detail, t) {
  const id = apply(event, detail, t, "live");
  for (const p of panelsFor(id)) p.render();
  app.graph?.setDirtyCanvas?.(true, false);
}

for (const name of EVENTS) {
  api.addEventListener(`klein_lora.${name}`, ({ detail }) => {
    const event = `klein_lora.${name}`, t = Date.now() / 1000;
    if (pending) pending.push([event, detail, t]);
    else applyLive(event, detail, t);
  });
}

// Already in the replayed history: the server recorded it before answering.
function replayed(event, data) {
  const run = runs.get(String(data.node));
  if (!run) return false;
  return event.endsWith(".progress") && data.step <= run.step;
}

async function replayHistory() {
  try {
    const res = await api.fetchApi("/klein_lora/history");
    if (res.ok) {
      const { events } = await res.json();
      for (const e of events) apply(e.event, e.data, e.t, "replay");
      stats.replayed = events.length;
    }
  } catch (err) {
    console.warn("Klein LoRA: could not replay the training history", err);
  } finally {
    const live = pending;
    pending = null;
    for (const [event, detail, t] of live) if (!replayed(event, detail)) applyLive(event, detail, t);
    renderAll();
  }
}

app.registerExtension({
  name: "klein_lora_studio.trainer_panel",
  async setup() {
    injectCSS();
    await replayHistory();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAINER) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      injectCSS();
      const panel = new Panel(this);
      this.kleinPanel = panel;
      this.addDOMWidget("klein_lora_panel", "klein_lora_panel", panel.el, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => 230,
      });
      this.setSize?.([Math.max(this.size[0], 420), this.computeSize()[1]]);
      queueMicrotask(() => panel.render());
      return r;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = configured?.apply(this, arguments);
      // saved workflows carry a size made without the panel: grow to fit it, then show a replayed run
      this.setSize?.([Math.max(this.size[0], 420), Math.max(this.size[1], this.computeSize()[1])]);
      queueMicrotask(() => this.kleinPanel?.render());
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      executed?.apply(this, arguments);
      const run = runs.get(String(this.id));
      if (run && output?.lora_path?.length) {
        run.done = output.lora_path[0];
        this.kleinPanel?.render();
      }
    };
  },
});

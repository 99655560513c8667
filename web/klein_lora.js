// Klein LoRA Studio: shows the trainer's step, loss and speed on the node while a run is in progress.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const runs = new Map(); // node id -> {start, step, total, loss}

function nodeById(id) {
  return app.graph?.getNodeById?.(Number(id)) ?? null;
}

api.addEventListener("klein_lora.progress", ({ detail }) => {
  const now = performance.now();
  const run = runs.get(detail.node) ?? { start: now, first: detail.step };
  Object.assign(run, detail);
  runs.set(detail.node, run);
  const node = nodeById(detail.node);
  if (!node) return;
  const done = detail.step - run.first;
  const rate = done > 0 ? done / ((now - run.start) / 1000) : 0;
  const eta = rate > 0 ? Math.round((detail.total - detail.step) / rate) : null;
  node.kleinStatus = `step ${detail.step}/${detail.total}  loss ${detail.loss.toFixed(4)}` +
    (rate > 0 ? `  ${rate.toFixed(2)} it/s  ETA ${eta}s` : "");
  node.setDirtyCanvas?.(true, false);
});

app.registerExtension({
  name: "klein_lora_studio.progress",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "KleinLoRATrainer") return;
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      draw?.apply(this, arguments);
      if (!this.kleinStatus) return;
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#38bdf8";
      ctx.fillText(this.kleinStatus, 10, this.size[1] - 8);
      ctx.restore();
    };
  },
});

// Nodes: each ComfyUI node's health and the scene it runs; drain, undrain, remove
// and add (admin operations).
import { call, get } from "./api.js";
import { ago, badge, bytes, fill, h, seconds, text } from "./dom.js";

export class Nodes {
  /**
   * @param {HTMLElement} root the section's element
   * @param {import("./jobs.js").Jobs} jobs the jobs, for the progress of running scenes
   * @param {(message: string) => void} report shows a failed action
   */
  constructor(root, jobs, report) {
    this.jobs = jobs;
    this.report = report;
    this.list = root.querySelector("[data-role=list]");
    this.summary = root.querySelector("[data-role=summary]");
    this.cards = new Map();
    this.nodes = [];
    const form = root.querySelector("form");
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.add(form).catch((err) => this.report(`add node: ${err.message}`));
    });
  }

  async refresh() {
    const { nodes } = await get("v1/nodes");
    this.nodes = nodes || [];
    for (const n of this.nodes) {
      const [job] = (n.health.scene || "").split(".");
      if (job) this.jobs.discover(job, "node");
    }
    this.render();
  }

  async add(form) {
    const f = form.elements;
    const body = {
      url: f.url.value.trim(),
      pools: f.pools.value.split(/[\s,+]+/).filter(Boolean),
      weight: Number(f.weight.value) || 1,
    };
    if (f.region.value.trim()) body.region = f.region.value.trim();
    const node = await call("PUT", `v1/nodes/${encodeURIComponent(f.id.value.trim())}`, body);
    form.reset();
    this.upsert(node);
  }

  upsert(node) {
    const i = this.nodes.findIndex((n) => n.id === node.id);
    if (i >= 0) this.nodes[i] = node;
    else this.nodes.push(node);
    this.render();
  }

  render() {
    const byStatus = {};
    for (const n of this.nodes) byStatus[n.health.status] = (byStatus[n.health.status] || 0) + 1;
    text(this.summary, this.nodes.length ? Object.entries(byStatus).map(([s, k]) => `${k} ${s}`).join(" · ") : "");
    const ids = new Set(this.nodes.map((n) => n.id));
    for (const [id, card] of this.cards) {
      if (!ids.has(id)) {
        card.remove();
        this.cards.delete(id);
      }
    }
    if (!this.nodes.length) {
      if (!this.list.querySelector("[data-role=empty]")) this.list.append(h("p", { class: "muted", dataset: { role: "empty" } }, "No nodes yet."));
      return;
    }
    this.list.querySelector("[data-role=empty]")?.remove();
    // In the API's order (by id); a card moves only when it must, so that a click on
    // it is never lost to a re-render.
    let prev = null;
    for (const n of this.nodes) {
      let card = this.cards.get(n.id);
      if (!card) {
        card = this.newCard(n.id);
        this.cards.set(n.id, card);
      }
      const at = prev ? prev.nextElementSibling : this.list.firstElementChild;
      if (at !== card) {
        if (prev) prev.after(card);
        else this.list.prepend(card);
      }
      prev = card;
      this.update(card, n);
    }
  }

  newCard(id) {
    const slot = () => h("dd");
    const parts = {
      status: h("span"),
      pools: slot(),
      region: slot(),
      scene: slot(),
      bar: h("progress", { max: 1, value: 0, dataset: { node: id } }),
      speed: slot(),
      vram: slot(),
      vramBar: h("meter", { min: 0, max: 1, value: 0, low: 0.7, high: 0.9, optimum: 0 }),
      model: slot(),
      heartbeat: slot(),
      error: h("p", { class: "error", hidden: true }),
      drain: h("button", { type: "button", dataset: { action: "drain", node: id } }),
      remove: h("button", { type: "button", class: "danger", dataset: { action: "remove", node: id } }, "Remove"),
    };
    parts.drain.addEventListener("click", () => this.drain(id, parts.drain));
    parts.remove.addEventListener("click", () => this.remove(id, parts.remove));
    const row = (label, dd, ...more) => [h("dt", {}, label), more.length ? h("dd", {}, dd, ...more) : dd];
    const card = h(
      "article",
      { class: "node card", dataset: { node: id } },
      h("header", {}, h("h3", {}, id), parts.status),
      h(
        "dl",
        {},
        row("pools", parts.pools),
        row("region", parts.region),
        row("running", parts.scene),
        h("dd", { class: "wide" }, parts.bar),
        row("speed", parts.speed),
        row("VRAM", parts.vram),
        h("dd", { class: "wide" }, parts.vramBar),
        row("checkpoint", parts.model),
        row("heartbeat", parts.heartbeat),
      ),
      parts.error,
      h("footer", {}, parts.drain, parts.remove),
    );
    card.parts = parts;
    return card;
  }

  update(card, n) {
    const p = card.parts;
    const hl = n.health;
    card.dataset.status = hl.status;
    if (p.status.dataset.status !== hl.status) fill(p.status, badge(hl.status)).dataset.status = hl.status;
    text(p.pools, `${n.pools.join(", ")}${n.weight ? ` · weight ${n.weight}` : ""}`);
    text(p.region, [n.region, hl.setup_seconds && `${seconds(hl.setup_seconds)} setup`].filter(Boolean).join(" · ") || "–");
    // The job streams the page follows are fresher than the node's last heartbeat.
    let run = this.jobs.runningOn(n.id);
    if (!run && hl.scene) {
      const [job, index] = hl.scene.split(".");
      run = { job, index: Number(index), scene: this.jobs.scene(job, Number(index)) };
    }
    const s = run?.scene;
    const step = s?.status === "running" && s.progress ? ` · step ${s.progress.value}/${s.progress.max}` : "";
    text(p.scene, run ? `scene ${run.index} of ${run.job.slice(0, 8)}…${step}` : hl.holding ? `${hl.holding} held` : "idle");
    p.scene.title = run ? `${run.job}.${run.index}` : "";
    p.bar.hidden = !run;
    p.bar.value = s?.status === "succeeded" ? 1 : s?.progress?.max ? s.progress.value / s.progress.max : 0;
    text(p.speed, [hl.seconds_per_scene && `${seconds(hl.seconds_per_scene)} / scene`, hl.seconds_per_step && `${seconds(hl.seconds_per_step)} / step`, `${hl.scenes_done} done`].filter(Boolean).join(" · "));
    const used = hl.vram_total ? hl.vram_total - hl.vram_free : 0;
    text(p.vram, hl.vram_total ? `${bytes(used)} of ${bytes(hl.vram_total)}${hl.device ? ` · ${hl.device}` : ""}` : "–");
    p.vramBar.hidden = !hl.vram_total;
    p.vramBar.value = hl.vram_total ? used / hl.vram_total : 0;
    text(p.model, hl.model || "–");
    text(p.heartbeat, ago(hl.last_heartbeat));
    text(p.error, hl.error || "");
    p.error.hidden = !hl.error;
    text(p.drain, n.drained ? "Undrain" : "Drain");
    p.drain.dataset.action = n.drained ? "undrain" : "drain";
    p.drain.hidden = p.remove.hidden = !n.registered;
  }

  async drain(id, button) {
    const node = this.nodes.find((n) => n.id === id);
    const verb = node?.drained ? "undrain" : "drain";
    button.disabled = true;
    try {
      this.upsert(await call("POST", `v1/nodes/${encodeURIComponent(id)}/${verb}`));
    } catch (err) {
      this.report(`${verb} ${id}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  /** Removes the node on a second click, so that one slip removes nothing. */
  async remove(id, button) {
    if (button.dataset.armed !== "true") {
      button.dataset.armed = "true";
      button.textContent = "Really remove?";
      setTimeout(() => {
        button.dataset.armed = "";
        button.textContent = "Remove";
      }, 4000);
      return;
    }
    button.disabled = true;
    try {
      await call("DELETE", `v1/nodes/${encodeURIComponent(id)}`);
      this.nodes = this.nodes.filter((n) => n.id !== id);
      this.render();
    } catch (err) {
      this.report(`remove ${id}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }
}

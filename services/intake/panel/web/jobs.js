// Jobs: the list (GET /v1/jobs, with the jobs the panel comes across on nodes and
// among dead letters), each job's scenes with live progress (its SSE stream), its
// outputs, cancel, retry and delete.
import { APIError, apiPath, call, follow, get, objectURL } from "./api.js";
import { ago, badge, fill, h, seconds, text } from "./dom.js";

const terminal = new Set(["succeeded", "failed", "cancelled"]);
/** Most job event streams open at once: a browser keeps about six connections per host. */
const maxStreams = 3;
/** Finished jobs whose scenes are loaded per refresh, for the charts. */
const historyPerTick = 2;

export class Jobs {
  /**
   * @param {HTMLElement} root the section's element
   * @param {(message: string) => void} report shows a failed action
   */
  constructor(root, report) {
    this.report = report;
    /** Asks for a refresh of the jobs soon: set by the page. */
    this.wake = () => {};
    /** Called when what the page knows of a job changed: set by the page. */
    this.changed = () => {};
    /** id → {id, summary, detail, source, expanded, stream, retryAt, refetch} */
    this.jobs = new Map();
    /** Jobs deleted on this page: a list asked for before the delete, or one the
     * server's index has not caught up with yet, may still hold them. */
    this.deleted = new Set();
    this.cards = new Map();
    this.nextCursor = "";
    this.root = root;
    this.list = root.querySelector("[data-role=list]");
    this.more = root.querySelector("[data-role=more]");
    this.form = root.querySelector("form");
    this.form.addEventListener("change", (ev) => {
      if (ev.target.name === "open") return;
      this.nextCursor = "";
      this.refreshList().catch((e) => this.report(e.message));
    });
    this.form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const id = this.form.elements.open.value.trim();
      if (!id) return;
      this.form.elements.open.value = "";
      this.open(id);
    });
    this.more.addEventListener("click", () => this.refreshList(true).catch((e) => this.report(e.message)));
  }

  /** Fetches the job list with the form's filters; append loads the next page. */
  async refreshList(append = false) {
    const f = this.form.elements;
    const limit = 50;
    const q = new URLSearchParams({ limit: String(limit) });
    if (f.status.value) q.set("status", f.status.value);
    if (f.tenant.value.trim()) q.set("tenant", f.tenant.value.trim());
    if (f.since.value) q.set("since", new Date(f.since.value).toISOString());
    if (append && this.nextCursor) q.set("cursor", this.nextCursor);
    const page = await get(`v1/jobs?${q}`);
    const listed = new Set();
    for (const s of page.jobs || []) {
      if (this.deleted.has(s.id)) continue;
      listed.add(s.id);
      const j = this.entry(s.id, "list");
      j.summary = s;
      if (j.detail && s.updated_at !== j.detail.updated_at && !j.stream) j.stale = true;
    }
    if (!append) {
      // A listed job the first page no longer holds, though it would, is gone:
      // deleted, or expired.
      const jobs = page.jobs || [];
      const oldest = jobs.length < limit ? 0 : new Date(jobs[jobs.length - 1].created_at).getTime();
      for (const j of [...this.jobs.values()]) {
        if (j.summary && !listed.has(j.id) && this.shown(j) && this.order(j) >= oldest) this.forget(j);
      }
    }
    this.nextCursor = page.next_cursor || "";
    this.render();
  }

  /** Adds a job the panel came across (on a node, in the dead letters). */
  discover(id, source) {
    if (this.jobs.has(id) || this.deleted.has(id)) return;
    this.entry(id, source);
    this.render();
    this.wake();
  }

  /** Takes a job as an action answered it (a retry, say). */
  update(detail, source) {
    const j = this.entry(detail.id, source);
    j.detail = detail;
    j.stale = false;
    j.retryAt = 0;
    this.render();
  }

  /** Opens a job by id, loaded at once. */
  async open(id) {
    const j = this.entry(id, "opened");
    j.expanded = true;
    try {
      await this.load(j);
    } catch (err) {
      this.report(err instanceof APIError && err.status === 404 ? `no job ${id}` : err.message);
      if (!j.detail && !j.summary) this.jobs.delete(id);
    }
    this.render();
  }

  entry(id, source) {
    let j = this.jobs.get(id);
    if (!j) {
      j = { id, source, summary: null, detail: null, expanded: null, stream: null, retryAt: 0, stale: true };
      this.jobs.set(id, j);
    }
    return j;
  }

  status(j) {
    return j.detail?.status || j.summary?.status || "queued";
  }

  live(j) {
    return !terminal.has(this.status(j));
  }

  /** Loads the job's scenes. */
  async load(j) {
    j.detail = await get(`v1/jobs/${encodeURIComponent(j.id)}`);
    j.stale = false;
    this.renderJob(j);
  }

  /** Follows live jobs and loads what the charts need; called on every refresh. */
  async tick() {
    const now = Date.now();
    const all = [...this.jobs.values()];
    const streams = all.filter((j) => j.stream).length;
    let free = maxStreams - streams;
    // Expanded jobs first, then the newest.
    const live = all.filter((j) => this.live(j) && !j.stream && j.retryAt <= now).sort((a, b) => this.order(b) - this.order(a));
    live.sort((a, b) => Number(this.expanded(b)) - Number(this.expanded(a)));
    const loads = [];
    for (const j of live) {
      if (free > 0) {
        free--;
        this.stream(j);
      } else if (loads.length < 4) {
        loads.push(j);
      }
    }
    const history = all.filter((j) => !this.live(j) && (j.stale || !j.detail) && !j.stream);
    history.sort((a, b) => this.order(b) - this.order(a));
    loads.push(...history.slice(0, historyPerTick));
    await Promise.all(
      loads.map((j) =>
        this.load(j).catch((err) => {
          j.retryAt = Date.now() + 5000;
          if (err instanceof APIError && err.status === 404) this.forget(j);
        }),
      ),
    );
  }

  forget(j) {
    this.jobs.delete(j.id);
    this.cards.get(j.id)?.remove();
    this.cards.delete(j.id);
  }

  /** Follows the job's events until it ends. */
  stream(j) {
    const ctl = new AbortController();
    j.stream = ctl;
    const run = async () => {
      if (!j.detail || j.stale) await this.load(j);
      if (!this.live(j)) return;
      await follow(`v1/jobs/${encodeURIComponent(j.id)}/events`, {
        signal: ctl.signal,
        lastEventId: j.lastEventId,
        onEvent: (msg) => this.apply(j, msg),
      });
      if (!ctl.signal.aborted) await this.load(j);
    };
    run()
      .catch((err) => {
        j.retryAt = Date.now() + 5000;
        if (err instanceof APIError && err.status === 404) this.forget(j);
      })
      .finally(() => {
        if (j.stream === ctl) j.stream = null;
        this.renderJob(j);
      });
  }

  /** Folds one event of the job's stream into what the page shows. */
  apply(j, msg) {
    if (msg.id) j.lastEventId = msg.id;
    let ev;
    try {
      ev = JSON.parse(msg.data);
    } catch {
      return;
    }
    const [, kind, type] = /^dev\.comfyfleet\.(scene|job)\.(\w+)$/.exec(ev.type || "") || [];
    const data = ev.data || {};
    if (kind === "scene" && j.detail && j.detail.scenes[data.index]) {
      const s = j.detail.scenes[data.index];
      if (data.node) s.node = data.node;
      switch (type) {
        case "progress":
          s.status = "running";
          s.progress = data.progress;
          break;
        case "started":
          s.status = "running";
          s.started_at = s.started_at || data.time;
          s.attempts = Math.max(s.attempts || 0, data.attempt || 0);
          break;
        case "queued":
        case "retrying":
          s.status = "queued";
          s.progress = null;
          break;
        default:
          if (terminal.has(sceneStatus[type])) {
            s.status = sceneStatus[type];
            s.finished_at = data.time;
            this.refetch(j);
          }
      }
      if (j.detail.status === "queued" && s.status === "running") j.detail.status = "running";
      this.renderJob(j);
    } else if (kind === "job") {
      this.refetch(j);
    }
  }

  /** Loads the job again soon, once the burst of events that asked for it is over. */
  refetch(j) {
    clearTimeout(j.refetchTimer);
    j.refetchTimer = setTimeout(() => this.load(j).catch(() => (j.stale = true)), 300);
  }

  order(j) {
    return new Date(j.summary?.created_at || j.detail?.created_at || 0).getTime();
  }

  expanded(j) {
    return j.expanded ?? this.live(j);
  }

  /** A scene as the page knows it, null if it does not. */
  scene(jobID, index) {
    return this.jobs.get(jobID)?.detail?.scenes?.[index] || null;
  }

  /**
   * The scene the page last saw running on node, from the job streams it follows:
   * {job, index, scene}, or null.
   */
  runningOn(node) {
    for (const j of this.jobs.values()) {
      if (!j.stream) continue;
      const scenes = j.detail?.scenes || [];
      const i = scenes.findIndex((s) => s.status === "running" && s.node === node && s.progress);
      if (i >= 0) return { job: j.id, index: i, scene: scenes[i] };
    }
    return null;
  }

  /** Every finished scene the page has loaded: {t, duration, ok}, t in seconds. */
  finishedScenes() {
    const out = [];
    for (const j of this.jobs.values()) {
      for (const s of j.detail?.scenes || []) {
        if (!s.finished_at || !terminal.has(s.status) || s.status === "cancelled") continue;
        const t = new Date(s.finished_at).getTime() / 1000;
        const start = s.started_at ? new Date(s.started_at).getTime() / 1000 : null;
        out.push({ t, duration: start ? t - start : null, ok: s.status === "succeeded" });
      }
      if (!j.detail && j.summary?.finished_at) {
        const t = new Date(j.summary.finished_at).getTime() / 1000;
        for (let i = 0; i < (j.summary.succeeded || 0); i++) out.push({ t, duration: null, ok: true });
        for (let i = 0; i < (j.summary.failed || 0); i++) out.push({ t, duration: null, ok: false });
      }
    }
    return out.sort((a, b) => a.t - b.t);
  }

  /** Whether a job passes the form's filters, as far as the page knows it. */
  shown(j) {
    const f = this.form.elements;
    if (f.status.value && this.status(j) !== f.status.value) return false;
    const tenant = j.summary?.tenant;
    if (f.tenant.value.trim() && tenant && tenant !== f.tenant.value.trim()) return false;
    if (f.since.value && this.order(j) && this.order(j) < new Date(f.since.value).getTime()) return false;
    return true;
  }

  render() {
    this.more.hidden = !this.nextCursor;
    const shown = [...this.jobs.values()].filter((j) => this.shown(j)).sort((a, b) => this.order(b) - this.order(a)).slice(0, 100);
    const ids = new Set(shown.map((j) => j.id));
    for (const [id, card] of this.cards) {
      if (!ids.has(id)) {
        card.remove();
        this.cards.delete(id);
      }
    }
    let prev = null;
    for (const j of shown) {
      const card = this.renderJob(j);
      if (prev ? prev.nextSibling !== card : this.list.firstChild !== card) {
        if (prev) prev.after(card);
        else this.list.prepend(card);
      }
      prev = card;
    }
    const empty = this.list.querySelector("[data-role=empty]");
    if (!shown.length && !empty) this.list.append(h("p", { class: "muted", dataset: { role: "empty" } }, "No jobs to show."));
    if (shown.length && empty) empty.remove();
  }

  /** Builds or updates the card of job j. */
  renderJob(j) {
    this.changed();
    let card = this.cards.get(j.id);
    if (!card) {
      card = this.newCard(j);
      this.cards.set(j.id, card);
    }
    const c = card.parts;
    const status = this.status(j);
    // A job seen running stays open once it ends, with its outputs.
    if (j.expanded === null && j.detail && this.live(j)) j.expanded = true;
    const d = j.detail;
    const n = d ? d.scenes.length : j.summary?.scenes || 0;
    const done = d ? d.scenes.filter((s) => terminal.has(s.status)).length : (j.summary?.succeeded || 0) + (j.summary?.failed || 0) + (j.summary?.cancelled || 0);
    const failed = d ? d.scenes.filter((s) => s.status === "failed").length : j.summary?.failed || 0;
    card.dataset.status = status;
    fill(c.status, badge(status));
    text(c.counts, `${done}/${n} scenes${failed ? `, ${failed} failed` : ""}`);
    text(c.meta, [j.summary?.tenant, `priority ${d?.priority ?? j.summary?.priority ?? "?"}`, `created ${ago(d?.created_at || j.summary?.created_at)}`].filter(Boolean).join(" · "));
    c.bar.max = Math.max(n, 1);
    c.bar.value = done;
    c.live.hidden = !j.stream;
    c.cancel.hidden = !this.live(j);
    c.del.hidden = this.live(j);
    const open = this.expanded(j);
    c.toggle.setAttribute("aria-expanded", String(open));
    c.scenes.hidden = !open;
    if (open && d) this.renderScenes(j, c.scenes);
    return card;
  }

  newCard(j) {
    const parts = {
      toggle: h("button", { class: "toggle", type: "button", "aria-label": "show scenes" }),
      status: h("span"),
      counts: h("span", { class: "counts" }),
      meta: h("span", { class: "muted" }),
      live: h("span", { class: "live", title: "following the job's events" }, "live"),
      bar: h("progress", { class: "job-bar", max: 1, value: 0 }),
      cancel: h("button", { type: "button", class: "danger", dataset: { action: "cancel", job: j.id } }, "Cancel"),
      del: h("button", { type: "button", class: "danger", dataset: { action: "delete", job: j.id } }, "Delete"),
      scenes: h("div", { class: "scenes" }),
    };
    parts.del.addEventListener("click", () => this.remove(j, parts.del));
    parts.toggle.addEventListener("click", () => {
      j.expanded = !this.expanded(j);
      if (j.expanded && !j.detail) this.load(j).catch((e) => this.report(e.message));
      this.renderJob(j);
    });
    parts.cancel.addEventListener("click", async () => {
      parts.cancel.disabled = true;
      try {
        j.detail = await call("POST", `v1/jobs/${encodeURIComponent(j.id)}/cancel`);
        this.renderJob(j);
      } catch (err) {
        this.report(`cancel ${j.id}: ${err.message}`);
      } finally {
        parts.cancel.disabled = false;
      }
    });
    const card = h(
      "article",
      { class: "job", dataset: { job: j.id } },
      h("div", { class: "job-head" }, parts.toggle, h("code", { class: "job-id", title: j.id }, j.id), parts.status, parts.live, parts.counts, parts.meta, h("span", { class: "spacer" }), parts.cancel, parts.del),
      parts.bar,
      parts.scenes,
    );
    card.parts = parts;
    return card;
  }

  /** Deletes an ended job, its inputs and outputs, on a second click. */
  async remove(j, button) {
    if (button.dataset.armed !== "true") {
      button.dataset.armed = "true";
      button.textContent = "Really delete?";
      setTimeout(() => {
        button.dataset.armed = "";
        button.textContent = "Delete";
      }, 4000);
      return;
    }
    button.disabled = true;
    try {
      await call("DELETE", `v1/jobs/${encodeURIComponent(j.id)}`);
      this.deleted.add(j.id);
      this.forget(j);
      this.render();
    } catch (err) {
      this.report(`delete ${j.id}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  renderScenes(j, box) {
    const scenes = j.detail.scenes;
    while (box.children.length > scenes.length) box.lastChild.remove();
    scenes.forEach((s, i) => {
      let row = box.children[i];
      if (!row) {
        row = this.newScene(j, i);
        box.append(row);
      }
      const p = row.parts;
      row.dataset.status = s.status;
      fill(p.status, badge(s.status));
      text(p.what, [s.workflow || "graph", s.pool, s.node && `on ${s.node}`, s.attempts > 1 && `attempt ${s.attempts}`].filter(Boolean).join(" · "));
      let frac = 0;
      if (s.status === "succeeded") frac = 1;
      else if (s.status === "running" && s.progress?.max) frac = s.progress.value / s.progress.max;
      p.bar.value = frac;
      p.bar.dataset.step = s.progress ? `${s.progress.value}/${s.progress.max}` : "";
      const took = s.started_at && s.finished_at ? (new Date(s.finished_at) - new Date(s.started_at)) / 1000 : null;
      text(p.time, s.status === "running" && s.progress ? `step ${s.progress.value}/${s.progress.max}` : took !== null ? seconds(took) : "");
      text(p.error, s.error || "");
      p.error.hidden = !s.error;
      p.retry.hidden = s.status !== "failed";
      const outKey = (s.outputs || []).map((o) => o.url).join(" ");
      if (p.outKey !== outKey) {
        p.outKey = outKey;
        fill(p.outputs, (s.outputs || []).map((o) => output(o)));
      }
    });
  }

  newScene(j, i) {
    const parts = {
      status: h("span"),
      what: h("span", { class: "muted" }),
      bar: h("progress", { class: "scene-bar", max: 1, value: 0, dataset: { scene: `${j.id}/${i}` } }),
      time: h("span", { class: "muted time" }),
      error: h("p", { class: "error", hidden: true }),
      retry: h("button", { type: "button", dataset: { action: "retry", job: j.id, scene: String(i) } }, "Retry"),
      outputs: h("div", { class: "outputs" }),
    };
    parts.retry.addEventListener("click", async () => {
      parts.retry.disabled = true;
      try {
        j.detail = await call("POST", `v1/jobs/${encodeURIComponent(j.id)}/scenes/${i}/retry`);
        j.retryAt = 0;
        this.renderJob(j);
      } catch (err) {
        this.report(`retry scene ${i} of ${j.id}: ${err.message}`);
      } finally {
        parts.retry.disabled = false;
      }
    });
    const row = h("div", { class: "scene" }, h("div", { class: "scene-head" }, h("strong", {}, `#${i}`), parts.status, parts.what, h("span", { class: "spacer" }), parts.time, parts.retry), parts.bar, parts.error, parts.outputs);
    row.parts = parts;
    return row;
  }
}

const sceneStatus = { completed: "succeeded", failed: "failed", cancelled: "cancelled" };

/** A thumbnail, a video player or a link for an output, loaded with the API key. */
function output(o) {
  const path = apiPath(o.url);
  const type = o.content_type || "";
  let el;
  if (type.startsWith("image/")) el = h("img", { alt: o.name, loading: "lazy" });
  else if (type.startsWith("video/")) el = h("video", { controls: true, muted: true, playsinline: true, preload: "metadata" });
  const link = h("a", { download: o.name, title: `${o.name} (${type})` }, el || o.name);
  objectURL(path)
    .then((u) => {
      link.href = u;
      if (el) el.src = u;
    })
    .catch(() => link.classList.add("broken"));
  return h("figure", { class: "output" }, link, h("figcaption", {}, o.name));
}

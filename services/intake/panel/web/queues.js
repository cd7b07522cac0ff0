// Queues: scenes waiting per pool and priority, the oldest one's wait, and the
// fleet's throughput (GET /v1/queues, as a dispatcher sees them).
import { APIError, get } from "./api.js";
import { fill, h, seconds } from "./dom.js";

export class Queues {
  /** @param {HTMLElement} root the section's element */
  constructor(root) {
    this.view = root.querySelector("[data-role=view]");
    /** Samples of the rates, {t, completed, failed}, t in seconds, for the charts. */
    this.samples = [];
  }

  async refresh() {
    let q;
    try {
      q = await get("v1/queues");
    } catch (err) {
      // No dispatcher answered: a state of the fleet, shown where the queues are.
      if (err instanceof APIError && err.status === 503) {
        fill(this.view, h("p", { class: "note", dataset: { role: "unknown" } }, "No dispatcher answers: the queues are not known now."));
        return;
      }
      throw err;
    }
    const r = q.rates || {};
    this.samples.push({ t: Date.now() / 1000, completed: r.completed_per_s || 0, failed: r.failed_per_s || 0 });
    if (this.samples.length > 900) this.samples.shift();
    const pools = q.pools || [];
    const chips = (m) => Object.entries(m || {}).sort(([a], [b]) => Number(b) - Number(a) || a.localeCompare(b)).map(([k, v]) => h("span", { class: "chip" }, `${k}: ${v}`));
    fill(
      this.view,
      h(
        "p",
        { class: "rates" },
        h("span", {}, h("strong", {}, fmt(r.accepted_per_s)), " accepted/s"),
        h("span", {}, h("strong", {}, fmt(r.completed_per_s)), " completed/s"),
        h("span", {}, h("strong", {}, fmt(r.failed_per_s)), " failed/s"),
      ),
      pools.length
        ? h(
            "div",
            { class: "scroll" },
            h(
              "table",
              {},
              h("thead", {}, h("tr", {}, h("th", {}, "pool"), h("th", { class: "num" }, "waiting"), h("th", {}, "oldest waits"), h("th", {}, "by priority"), h("th", {}, "by tenant"))),
              h(
                "tbody",
                {},
                pools.map((p) =>
                  h(
                    "tr",
                    { dataset: { pool: p.pool, depth: String(p.depth) } },
                    h("td", {}, p.pool),
                    h("td", { class: "num", dataset: { role: "depth" } }, p.depth),
                    h("td", {}, p.depth ? seconds(p.oldest_age_s) : "–"),
                    h("td", {}, chips(p.by_priority)),
                    h("td", {}, chips(p.by_tenant)),
                  ),
                ),
              ),
            ),
          )
        : h("p", { class: "muted" }, "No pool known yet."),
    );
  }
}

function fmt(v) {
  return (v || 0).toFixed(v >= 10 ? 0 : 2);
}

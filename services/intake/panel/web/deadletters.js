// Dead letters: the scenes that failed for good, each with its attempts' errors, and a
// retry (GET /v1/deadletters, POST /v1/jobs/{id}/scenes/{i}/retry).
import { call, get } from "./api.js";
import { ago, fill, h } from "./dom.js";

export class DeadLetters {
  /**
   * @param {HTMLElement} root the section's element
   * @param {import("./jobs.js").Jobs} jobs told of the dead letters' jobs
   * @param {(message: string) => void} report shows a failed action
   */
  constructor(root, jobs, report) {
    this.jobs = jobs;
    this.report = report;
    this.view = root.querySelector("[data-role=view]");
    this.count = root.querySelector("[data-role=count]");
  }

  async refresh() {
    const { dead_letters: dead = [] } = await get("v1/deadletters");
    this.count.textContent = dead.length ? `(${dead.length})` : "";
    for (const d of dead) this.jobs.discover(d.job_id, "deadletter");
    if (!dead.length) {
      fill(this.view, h("p", { class: "muted" }, "No scene has failed for good."));
      return;
    }
    fill(
      this.view,
      h(
        "div",
        { class: "scroll" },
        h(
          "table",
          {},
          h("thead", {}, h("tr", {}, h("th", {}, "scene"), h("th", {}, "workflow"), h("th", {}, "failed"), h("th", {}, "error"), h("th", {}, ""))),
          h(
            "tbody",
            {},
            dead.map((d) =>
              h(
                "tr",
                {},
                h("td", {}, h("code", { title: d.job_id }, `${d.job_id}.${d.index}`)),
                h("td", {}, [d.workflow || "graph", d.pool].join(" · ")),
                h("td", {}, ago(d.failed_at), h("br"), h("span", { class: "muted" }, `${d.attempts} attempts`)),
                h(
                  "td",
                  {},
                  h("details", {}, h("summary", {}, d.error), h("ol", {}, (d.failures || []).map((f) => h("li", {}, `attempt ${f.attempt}${f.node ? ` on ${f.node}` : ""}: ${f.error}`)))),
                ),
                h("td", {}, h("button", { type: "button", dataset: { action: "retry", job: d.job_id, scene: String(d.index) }, onclick: (ev) => this.retry(d, ev.target) }, "Retry")),
              ),
            ),
          ),
        ),
      ),
    );
  }

  async retry(d, button) {
    button.disabled = true;
    try {
      this.jobs.update(await call("POST", `v1/jobs/${encodeURIComponent(d.job_id)}/scenes/${d.index}/retry`), "deadletter");
      await this.refresh();
    } catch (err) {
      this.report(`retry ${d.job_id}.${d.index}: ${err.message}`);
      button.disabled = false;
    }
  }
}

// Charts of the scenes the panel has seen finish: the success rate per minute, and
// each scene's duration. Drawn with uPlot (vendored, loaded before this module).
import { fill } from "./dom.js";

const minute = 60;

export class Charts {
  /**
   * @param {HTMLElement} root the section's element
   * @param {import("./jobs.js").Jobs} jobs the source of finished scenes
   */
  constructor(root, jobs) {
    this.jobs = jobs;
    this.rateBox = root.querySelector("[data-role=success]");
    this.durationBox = root.querySelector("[data-role=durations]");
    this.headline = root.querySelector("[data-role=headline]");
    this.rate = null;
    this.duration = null;
    this.seen = "";
    new ResizeObserver(() => this.resize()).observe(root);
  }

  render() {
    const scenes = this.jobs.finishedScenes();
    // Drawn again when a scene finishes, and each minute as time moves on.
    const key = `${scenes.length}@${Math.floor(Date.now() / 1000 / minute)}`;
    if (key === this.seen) return;
    this.seen = key;
    if (!scenes.length) {
      this.headline.textContent = "No finished scene seen yet.";
      return;
    }
    const ok = scenes.filter((s) => s.ok).length;
    this.headline.textContent = `${Math.round((100 * ok) / scenes.length)}% of ${scenes.length} finished scenes succeeded.`;

    const buckets = new Map();
    for (const s of scenes) {
      const t = Math.floor(s.t / minute) * minute;
      const b = buckets.get(t) || { ok: 0, failed: 0 };
      s.ok ? b.ok++ : b.failed++;
      buckets.set(t, b);
    }
    // Every minute of the last hour that has data, and at least the last ten.
    const end = Math.floor(Date.now() / 1000 / minute) * minute;
    const first = Math.max(end - 60 * minute, Math.min(end - 10 * minute, ...buckets.keys()));
    const xs = [];
    for (let t = first; t <= end; t += minute) xs.push(t);
    const at = (t) => buckets.get(t) || { ok: 0, failed: 0 };
    const rateData = [
      xs,
      xs.map((t) => (at(t).ok + at(t).failed ? (100 * at(t).ok) / (at(t).ok + at(t).failed) : null)),
      xs.map((t) => at(t).ok),
      xs.map((t) => at(t).failed),
    ];
    const timed = scenes.filter((s) => s.duration !== null);
    const durationData = [timed.map((s) => s.t), timed.map((s) => (s.ok ? s.duration : null)), timed.map((s) => (s.ok ? null : s.duration))];

    if (!this.rate) {
      this.rate = new uPlot(
        {
          ...this.size(this.rateBox),
          title: "Success rate per minute",
          series: [
            {},
            { label: "success %", stroke: "#059669", width: 2, scale: "%", spanGaps: true, points: { show: true } },
            { label: "succeeded", stroke: "#60a5fa", fill: "rgba(96,165,250,0.25)", scale: "n", points: { show: false }, paths: uPlot.paths.bars({ size: [0.6, 40] }) },
            { label: "failed", stroke: "#ef4444", fill: "rgba(239,68,68,0.3)", scale: "n", points: { show: false }, paths: uPlot.paths.bars({ size: [0.6, 40] }) },
          ],
          scales: { x: { time: true }, "%": { range: [0, 100] }, n: { range: (_u, _min, max) => [0, Math.max(1, max)] } },
          axes: [{}, { scale: "%", label: "%" }, { scale: "n", side: 1, label: "scenes", grid: { show: false } }],
        },
        rateData,
        fill(this.rateBox),
      );
      this.duration = new uPlot(
        {
          ...this.size(this.durationBox),
          title: "Scene durations",
          series: [
            {},
            { label: "succeeded (s)", stroke: "#2563eb", paths: () => null, points: { show: true, size: 6, fill: "#2563eb" } },
            { label: "failed (s)", stroke: "#ef4444", paths: () => null, points: { show: true, size: 6, fill: "#ef4444" } },
          ],
          scales: { x: { time: true }, y: { range: (_u, _min, max) => [0, Math.max(1, max * 1.1)] } },
          axes: [{}, { label: "seconds" }],
        },
        durationData,
        fill(this.durationBox),
      );
    } else {
      this.rate.setData(rateData);
      this.duration.setData(durationData);
    }
    // uPlot draws a single time over years: the spans are set here.
    this.rate.setScale("x", { min: xs[0] - minute / 2, max: xs[xs.length - 1] + minute / 2 });
    const now = Date.now() / 1000;
    const last = timed.length ? timed[timed.length - 1].t : now;
    const firstTimed = timed.length ? timed[0].t : now;
    this.duration.setScale("x", { min: Math.min(firstTimed, last - minute) - 5, max: last + 5 });
  }

  size(box) {
    return { width: Math.max(260, box.clientWidth || box.parentElement.clientWidth), height: 220 };
  }

  resize() {
    if (this.rate) this.rate.setSize(this.size(this.rateBox));
    if (this.duration) this.duration.setSize(this.size(this.durationBox));
  }
}


// The comfyfleet panel: wires the sections to the API and refreshes them.
import { APIError, apiKey, onUnauthorized, setAPIKey } from "./api.js";
import { Charts } from "./charts.js";
import { DeadLetters } from "./deadletters.js";
import { ago, h } from "./dom.js";
import { Jobs } from "./jobs.js";
import { Nodes } from "./nodes.js";
import { Queues } from "./queues.js";

const $ = (sel) => document.querySelector(sel);

const toasts = $("#toasts");
/** Shows a message for a while: a failed action, say. */
function report(message) {
  const t = h("p", { class: "toast", role: "status" }, message);
  toasts.append(t);
  setTimeout(() => t.remove(), 8000);
}

const jobs = new Jobs($("#jobs"), report);
const nodes = new Nodes($("#nodes"), jobs, report);
const queues = new Queues($("#queues"));
const dead = new DeadLetters($("#deadletters"), jobs, report);
const charts = new Charts($("#charts"), jobs);

// The key dialog: opened by the button, or by the API answering 401.
const dialog = $("#key-dialog");
let needKey = false;
function askKey(why) {
  $("#key-why").textContent = why || "";
  dialog.querySelector("input").value = "";
  if (!dialog.open) dialog.showModal();
}
onUnauthorized(() => {
  needKey = true;
  askKey(apiKey() ? "The API refused this key: give another." : "This fleet needs an API key.");
});
$("#key-button").addEventListener("click", () => askKey(apiKey() ? "A key is stored in this browser." : "The API is open, or give a key."));
dialog.addEventListener("close", () => {
  const key = dialog.querySelector("input").value.trim();
  if (dialog.returnValue === "save" && key) setAPIKey(key);
  if (dialog.returnValue === "forget") setAPIKey("");
  if (dialog.returnValue === "save" || dialog.returnValue === "forget") {
    needKey = false;
    refreshAll();
  }
  showKeyState();
});
function showKeyState() {
  $("#key-button").textContent = apiKey() ? "API key ✓" : "API key";
}
showKeyState();

// Refreshing: each part on its own period; nothing while the page is hidden or a
// key is missing. The intake limits the requests a key may make a second.
const status = $("#conn");
let lastOK = 0;
let lastError = "";
function showStatus() {
  status.dataset.state = needKey ? "key" : lastError ? "error" : lastOK ? "ok" : "wait";
  status.textContent = needKey ? "needs an API key" : lastError ? lastError : lastOK ? `live · ${ago(lastOK)}` : "connecting…";
}
setInterval(showStatus, 1000);

const jobsPart = { every: 2000, run: () => jobs.tick() };
const parts = [
  { every: 2000, run: () => nodes.refresh() },
  jobsPart,
  { every: 3000, run: () => queues.refresh() },
  { every: 4000, run: () => jobs.refreshList() },
  { every: 10000, run: () => dead.refresh() },
  { every: 2000, run: () => charts.render() },
];
for (const p of parts) {
  p.due = 0;
  p.busy = false;
}
let redraw = 0;
jobs.changed = () => {
  if (!redraw) redraw = requestAnimationFrame(() => {
    redraw = 0;
    nodes.render();
    charts.render();
  });
};
jobs.wake = () => {
  jobsPart.due = 0;
  queueMicrotask(tick);
};

async function runPart(p) {
  if (p.busy) return;
  p.busy = true;
  try {
    await p.run();
    lastOK = Date.now();
    lastError = "";
  } catch (err) {
    if (!(err instanceof APIError && err.status === 401)) lastError = err instanceof APIError && err.status === 429 ? "rate limited: slowing down" : `error: ${err.message}`;
    if (err instanceof APIError && err.status === 429) p.due = Date.now() + 5000;
  } finally {
    p.busy = false;
    showStatus();
  }
}

function refreshAll() {
  for (const p of parts) p.due = 0;
  tick();
}

function tick() {
  if (document.hidden || needKey) return;
  const now = Date.now();
  for (const p of parts) {
    if (p.due > now) continue;
    p.due = now + p.every;
    runPart(p);
  }
}
setInterval(tick, 250);
document.addEventListener("visibilitychange", tick);
tick();

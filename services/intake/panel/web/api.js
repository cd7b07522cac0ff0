// The API client of the panel: every call carries the API key the user gave, if any;
// job events are read by streaming the SSE body with fetch(), since EventSource
// cannot send an Authorization header.

const keyName = "comfyfleet.apiKey";

/** The stored API key, "" when none. */
export function apiKey() {
  return localStorage.getItem(keyName) || "";
}

/** Stores the API key; an empty key forgets it. */
export function setAPIKey(key) {
  if (key) localStorage.setItem(keyName, key.trim());
  else localStorage.removeItem(keyName);
}

/** An answer of the API that is not a success. */
export class APIError extends Error {
  constructor(status, problem) {
    super(describe(status, problem));
    this.status = status;
    this.problem = problem;
  }
}

function describe(status, problem) {
  if (problem && typeof problem === "object") {
    const details = (problem.errors || []).map((e) => `${e.location || ""} ${e.message || ""}`.trim());
    return [problem.detail || problem.title || `HTTP ${status}`, ...details].join("; ");
  }
  return `HTTP ${status}`;
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** Listeners told of every authentication failure (401), to ask for a key. */
const unauthorized = new Set();
export function onUnauthorized(fn) {
  unauthorized.add(fn);
}

/** Tells of a 401, unless the key changed while the request was on its way. */
function refused(sentKey) {
  if (sentKey === apiKey()) unauthorized.forEach((fn) => fn());
}

// Paths are relative, so the panel works behind a path prefix too.
function url(path) {
  return path.replace(/^\//, "");
}

/**
 * Calls the API and returns the decoded JSON answer (null for an empty one).
 * Throws APIError for an answer that is not 2xx.
 */
export async function call(method, path, body) {
  const sentKey = apiKey();
  const init = { method, headers: headers(), cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(url(path), init);
  const text = await resp.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!resp.ok) {
    if (resp.status === 401) refused(sentKey);
    throw new APIError(resp.status, data);
  }
  return data;
}

/** GET path, decoded. */
export const get = (path) => call("GET", path);

/**
 * Follows a Server-Sent Events stream, calling onEvent({id, event, data}) for each
 * message, until the server ends it (resolves) or signal aborts it (resolves).
 * lastEventId resumes after that event. Throws APIError or a network error.
 */
export async function follow(path, { onEvent, signal, lastEventId }) {
  const sentKey = apiKey();
  const h = headers({ Accept: "text/event-stream" });
  if (lastEventId) h["Last-Event-ID"] = lastEventId;
  let resp;
  try {
    resp = await fetch(url(path), { headers: h, signal, cache: "no-store" });
  } catch (err) {
    if (signal.aborted) return;
    throw err;
  }
  if (!resp.ok) {
    if (resp.status === 401) refused(sentKey);
    throw new APIError(resp.status, await resp.json().catch(() => null));
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let msg = { id: "", event: "", data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (line === "") {
          if (msg.data.length) onEvent({ id: msg.id, event: msg.event, data: msg.data.join("\n") });
          msg = { id: "", event: "", data: [] };
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") msg.data.push(val);
        else if (field === "id") msg.id = val;
        else if (field === "event") msg.event = val;
      }
    }
  } catch (err) {
    if (signal.aborted) return;
    throw err;
  }
}

/**
 * Fetches a file of the API (an output) with the key, as an object URL. Two at a
 * time, waiting out 429s: a job's hundred outputs must not spend the key's budget.
 */
const blobs = new Map();
const downloads = { running: 0, waiting: [] };
export async function objectURL(path) {
  if (!blobs.has(path)) blobs.set(path, download(path));
  try {
    return await blobs.get(path);
  } catch (err) {
    blobs.delete(path);
    throw err;
  }
}

async function download(path) {
  if (downloads.running >= 2) await new Promise((go) => downloads.waiting.push(go));
  downloads.running++;
  try {
    for (let attempt = 1; ; attempt++) {
      const resp = await fetch(url(path), { headers: headers({ Accept: "*/*" }) });
      if (resp.status === 429 && attempt < 6) {
        await new Promise((go) => setTimeout(go, 1000 * (Number(resp.headers.get("Retry-After")) || 1)));
        continue;
      }
      if (!resp.ok) throw new APIError(resp.status, null);
      return URL.createObjectURL(await resp.blob());
    }
  } finally {
    downloads.running--;
    downloads.waiting.shift()?.();
  }
}

/** The API path of an absolute API URL, so that it is fetched from this page's origin. */
export function apiPath(absolute) {
  const u = new URL(absolute, location.href);
  return u.pathname + u.search;
}

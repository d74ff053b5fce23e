// The one way the console talks to the API: /v1 with the Bearer header. The key lives in the
// tab's sessionStorage only; it is never put in a URL, a cookie or the console's own logs.

const KEY = "ftune.apiKey";

export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && problem.detail) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

export const session = {
  key: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
  caller: null,
};

let onUnauthorized = () => {};
export function whenUnauthorized(fn) {
  onUnauthorized = fn;
}

function headers(extra) {
  return { Authorization: `Bearer ${session.key()}`, ...extra };
}

/** A URL for `path` (under /v1) with its query; empty values are left out. */
export function url(path, query = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    for (const v of [].concat(value)) {
      if (v !== undefined && v !== null && v !== "") params.append(name, String(v));
    }
  }
  const qs = params.toString();
  return `/v1${path}${qs ? `?${qs}` : ""}`;
}

async function problemOf(resp) {
  try {
    return await resp.json();
  } catch {
    return { detail: `${resp.status} ${resp.statusText}` };
  }
}

/** The service gave no answer at all (down, restarting, the network gone): status 0. */
export const UNREACHABLE = "The service did not answer: it may be restarting, or the network is down. Try again in a moment.";

/** fetch() against /v1 with the key; JSON in and out; throws ApiError on a non-2xx answer,
 * and on no answer at all (status 0) with a message a person can act on. */
export async function api(path, { method = "GET", query, json, body, type, signal, headers: more } = {}) {
  const extra = { ...more };
  if (json !== undefined) extra["Content-Type"] = "application/json";
  if (type) extra["Content-Type"] = type;
  let resp;
  try {
    resp = await fetch(url(path, query), {
      method,
      headers: headers(extra),
      body: json !== undefined ? JSON.stringify(json) : body,
      signal,
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { detail: UNREACHABLE });
  }
  if (resp.status === 401) {
    onUnauthorized("The API refused the key (401): sign in again.");
    throw new ApiError(401, await problemOf(resp));
  }
  if (!resp.ok) throw new ApiError(resp.status, await problemOf(resp));
  if (resp.status === 204) return null;
  return resp.json();
}

/** Save the answer to a GET with the key as a file named `filename` (a link cannot send an
 * Authorization header): read whole into memory first, so for files of a few GB at most. */
export async function download(path, filename) {
  let resp;
  try {
    resp = await fetch(url(path), { headers: headers({}), cache: "no-store", referrerPolicy: "no-referrer" });
  } catch {
    throw new ApiError(0, { detail: UNREACHABLE });
  }
  if (resp.status === 401) onUnauthorized("The API refused the key (401): sign in again.");
  if (!resp.ok) throw new ApiError(resp.status, await problemOf(resp));
  const href = URL.createObjectURL(await resp.blob());
  const link = Object.assign(document.createElement("a"), { href, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
}

/** A streaming GET with the key (EventSource cannot send an Authorization header). */
export async function stream(path, { lastEventId, signal }) {
  const extra = { Accept: "text/event-stream" };
  if (lastEventId) extra["Last-Event-ID"] = lastEventId;
  const resp = await fetch(url(path), {
    headers: headers(extra),
    signal,
    cache: "no-store",
    referrerPolicy: "no-referrer",
  });
  if (resp.status === 401) onUnauthorized("The API refused the key (401): sign in again.");
  return resp;
}

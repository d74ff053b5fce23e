// A job's Server-Sent Events over fetch() (EventSource cannot send the Authorization header),
// parsed by the vendored eventsource-parser. A dropped connection is resumed with
// Last-Event-ID, so no event is lost or repeated; the server closes after the final status.

import { createParser } from "../vendor/eventsource-parser/index.js";
import { stream } from "./api.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Follow `jobId`'s events: onEvent(kind, data, id) each; onState("live"|"reconnecting"|"ended"|msg). */
export function follow(jobId, onEvent, onState = () => {}) {
  const ctrl = new AbortController();
  let lastId = null;
  let retryMs = 1000;
  let ended = false;
  let refused = false;

  async function once() {
    const resp = await stream(`/jobs/${encodeURIComponent(jobId)}/events`, { lastEventId: lastId, signal: ctrl.signal });
    if (resp.status === 429) {
      // The tenant's open streams or request rate: it frees up, so wait as told and retry.
      const wait = Math.max(1, Number(resp.headers.get("Retry-After")) || 5);
      onState(`too many streams or requests for now (429); retrying in ${wait} s`);
      await sleep(wait * 1000);
      return;
    }
    if (resp.status >= 400 && resp.status < 500) {
      ended = refused = true;
      onState(`the stream was refused (${resp.status})`);
      return;
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    onState("live");
    let received = 0;
    const parser = createParser({
      onEvent(event) {
        received += 1;
        if (event.id) lastId = event.id;
        const data = JSON.parse(event.data);
        onEvent(event.event || "message", data, event.id);
        if (event.event === "status" && TERMINAL.has(data.status)) ended = true;
      },
      onComment() {
        received += 1; // a keep-alive: the job is still going
      },
      onRetry(ms) {
        retryMs = ms;
      },
    });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(value);
    }
    // The server closes a finished job's stream; a close that brought nothing at all means that.
    if (received === 0) ended = true;
  }

  (async () => {
    while (!ended && !ctrl.signal.aborted) {
      try {
        await once();
      } catch {
        if (ctrl.signal.aborted) return;
      }
      if (ended || ctrl.signal.aborted) break;
      onState("reconnecting");
      await sleep(retryMs);
    }
    if (!ctrl.signal.aborted && !refused) onState("ended");
  })();

  return { stop: () => ctrl.abort(), lastEventId: () => lastId };
}

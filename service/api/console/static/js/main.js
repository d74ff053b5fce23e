// Sign-in and the router: the URL's fragment names the page (#/jobs, #/jobs/<id>, ...), so
// the server serves one file and the key never travels in a path or a query.

import { api, session, whenUnauthorized } from "./api.js";
import { clear, h } from "./dom.js";
import { datasetPage, datasetsPage } from "./datasets.js";
import { jobPage } from "./job.js";
import { jobsPage } from "./jobs.js";
import { newJobPage } from "./newjob.js";
import { retrainingPage } from "./retraining.js";

const $ = (id) => document.getElementById(id);
const page = $("page");
let leave = () => {}; // the current page's clean-up (a live stream to close)

const ROUTES = [
  [/^#\/jobs\/([\w.-]+)$/, (m) => jobPage(page, m[1])],
  [/^#\/jobs\/?(\?.*)?$/, (m) => jobsPage(page, new URLSearchParams((m[1] || "").slice(1)))],
  [/^#\/datasets\/([\w.-]+)$/, (m) => datasetPage(page, m[1])],
  [/^#\/datasets\/?$/, () => datasetsPage(page)],
  [/^#\/new\/?(\?.*)?$/, (m) => newJobPage(page, new URLSearchParams((m[1] || "").slice(1)))],
  [/^#\/retraining\/?$/, () => retrainingPage(page)],
];

function showSignIn(message) {
  session.clear();
  session.caller = null;
  leave();
  leave = () => {};
  clear(page);
  $("nav").hidden = true;
  $("who").hidden = true;
  $("sign-in").hidden = false;
  const error = $("sign-in-error");
  error.hidden = !message;
  error.textContent = message || "";
  document.title = "Sign in · ftune";
  $("api-key").focus();
}

// Navigations in turn: a page whose data came after the user had moved on drew over the newer
// page, so it is left (its streams stopped) and the current one drawn again.
let navigation = 0;
let drawn = 0;

async function route() {
  if (!session.key()) return showSignIn();
  leave();
  leave = () => {};
  const hash = location.hash || "#/jobs";
  const mine = ++navigation;
  for (const [pattern, render] of ROUTES) {
    const m = hash.match(pattern);
    if (m) {
      markNav(hash);
      clear(page, h("p", { class: "muted" }, "Loading…"));
      let left = () => {};
      try {
        left = (await render(m)) || (() => {});
      } catch (err) {
        if (mine === navigation && err.status !== 401) failed(err, mine);
      }
      if (mine !== navigation) {
        left();
        if (drawn === navigation) route(); // the newer page was drawn before this one: again
        return;
      }
      leave = left;
      drawn = mine;
      $("main").focus({ preventScroll: true });
      return;
    }
  }
  drawn = mine;
  document.title = "Not found · ftune";
  clear(page, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/jobs" }, "Back to jobs")));
}

const RETRY_MS = 5000;

/** A page that could not load says why, with a way to try again; while the service does not
 * answer at all, it tries again by itself, for as long as the user stays on that page. */
function failed(err, mine) {
  clear(
    page,
    h("div", { class: "error", role: "alert" }, h("p", {}, err.message)),
    h("button", { type: "button", onclick: () => route() }, "Try again"),
  );
  if (err.status === 0) {
    setTimeout(() => {
      if (mine === navigation && session.caller) route();
    }, RETRY_MS);
  }
}

function markNav(hash) {
  for (const a of document.querySelectorAll("#nav a")) {
    const here = hash.startsWith(a.getAttribute("href"));
    if (here) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

async function signIn(key) {
  session.set(key);
  try {
    session.caller = await api("/me");
  } catch (err) {
    return showSignIn(err.status === 401 ? "That key was refused: check it and try again." : err.message);
  }
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("who-tenant").textContent = `${session.caller.tenant}${session.caller.admin ? " (admin)" : ""}`;
  await route();
}

whenUnauthorized((message) => showSignIn(message));

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("api-key");
  const key = input.value.trim();
  input.value = "";
  if (key) signIn(key);
});
$("sign-out").addEventListener("click", () => showSignIn());
// The skip link moves the focus, not the route (a "#main" hash read as a page: "Not found").
document.querySelector("a.skip").addEventListener("click", (event) => {
  event.preventDefault();
  $("main").focus();
});
window.addEventListener("hashchange", () => {
  if (session.caller) route();
});

if (session.key()) signIn(session.key());
else showSignIn();

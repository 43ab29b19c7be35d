// Drives the coordinator's web view in headless Chromium, as an operator
// would: connects with the API token, watches roll-outs that this script
// starts through the API, presses pause, resume and rollback in the page,
// and saves a screenshot at each step. tests/tests/web.rs starts the fleet
// and runs this with:
//   CONVOY_URL     the coordinator's API address (http://host:port)
//   CONVOY_TOKEN   its API token
//   CONVOY_SHOTS   where the screenshots go
//   CHROMIUM       the browser (default /usr/bin/chromium)
// It prints one JSON line of what it saw and exits 1 on the first failure.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const url = process.env.CONVOY_URL;
const token = process.env.CONVOY_TOKEN;
const shots = process.env.CONVOY_SHOTS;
const WAIT = { timeout: 60_000 };
mkdirSync(shots, { recursive: true });

async function api(method, path, body) {
  const r = await fetch(url + path, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  const v = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(v)}`);
  return v;
}

const deploy = (version, extra) =>
  api("POST", "/v1/deployments", { release: `web@${version}`, env: "production", ...extra });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const seen = { shots: [] };
let page;
try {
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("dialog", (d) => d.accept());
  const shot = async (name) => {
    const path = join(shots, `${name}.png`);
    await page.screenshot({ path, fullPage: true });
    seen.shots.push(path);
  };
  const rollout = (id) => page.locator(`.rollout[data-id="${id}"]`);
  const phase = (id, p) => page.waitForSelector(`.rollout[data-id="${id}"][data-phase="${p}"]`, WAIT);

  await page.goto(url + "/");
  // A wrong token is refused, and says so.
  await page.fill("#token", "not-the-token");
  await page.click("#login button");
  await page.waitForSelector("#message:has-text('Wrong token')", WAIT);
  await page.fill("#token", token);
  await page.click("#login button");
  await page.waitForSelector("#view:not([hidden])", WAIT);
  await page.waitForFunction(() => document.querySelectorAll(".target").length === 4, null, WAIT);
  seen.dcs = await page.$$eval(".dc", (e) => e.map((d) => [d.dataset.dc, d.querySelectorAll(".target").length]));
  await shot("1-fleet");

  // A roll-out, watched to its end.
  const first = await deploy("1", { strategy: "live", waves: "100%" });
  await phase(first.id, "succeeded");
  await page.waitForFunction(
    () => [...document.querySelectorAll(".target")].every((t) => t.dataset.state === "live" && t.textContent.includes("web@1")),
    null, WAIT);
  await shot("2-succeeded");

  // A rolling roll-out in four waves: paused from the page between two.
  const second = await deploy("2", { strategy: "rolling", waves: "1,2,3,4", drain_seconds: 1.0 });
  await page.waitForSelector(`.rollout[data-id="${second.id}"] button[data-action="pause"]`, WAIT);
  await rollout(second.id).locator('button[data-action="pause"]').click();
  await phase(second.id, "paused");
  const paused = await api("GET", `/v1/deployments/${second.id}`);
  if (!paused.phase.Paused && paused.phase.Paused !== 0) throw new Error(`the API says ${JSON.stringify(paused.phase)}, not paused`);
  seen.paused_before_wave = paused.phase.Paused + 1;
  await shot("3-paused");
  await rollout(second.id).locator('button[data-action="resume"]').click();
  await phase(second.id, "succeeded");

  // A release whose validate hook fails everywhere: rolled back.
  const third = await deploy("3", { strategy: "rolling", waves: "1,100%", drain_seconds: 0.1 });
  await phase(third.id, "rolled_back");
  await page.waitForSelector(`#history td:has-text("rolled_back")`, WAIT);
  await shot("4-rolled-back");

  // The environment back to its previous release, from the page.
  await page.click('#rollback button[data-rollback="production"]');
  await page.waitForFunction(
    () => [...document.querySelectorAll(".target")].every((t) => t.textContent.includes("web@1")),
    null, WAIT);
  await page.waitForSelector(`#history td:has-text("rollback")`, WAIT);
  await shot("5-rollback");

  // The token is nowhere the page keeps things.
  const kept = await page.evaluate(() => ({
    local: localStorage.length, session: sessionStorage.length, cookie: document.cookie,
    href: location.href, html: document.documentElement.outerHTML,
  }));
  if (kept.local || kept.session || kept.cookie) throw new Error(`the page stored something: ${JSON.stringify(kept)}`);
  if (kept.href.includes(token) || kept.html.includes(token)) throw new Error("the token is in the page");
  if (errors.length) throw new Error(`script errors: ${errors.join("; ")}`);
  seen.deployments = [first.id, second.id, third.id];
  console.log(JSON.stringify(seen));
} catch (e) {
  if (page) await page.screenshot({ path: join(shots, "failure.png"), fullPage: true }).catch(() => {});
  console.error(e.stack || String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}

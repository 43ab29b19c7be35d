// Convoy's web view: polls the coordinator's API once a second and draws
// the fleet by data centre, the roll-outs and an app's history; its
// buttons call the same API as `convoy pause|resume|abort|rollback`.
// The token lives in this closure only: never in storage, a cookie or the
// address, so a reload asks for it again.
"use strict";
(() => {
  const POLL_MS = 1000;
  let token = null;
  let app = null; // the app whose history is shown
  let polling = false;
  const $ = (id) => document.getElementById(id);

  // An element with attributes and children (strings become text: no
  // markup from the fleet is ever parsed).
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function say(text, ok) {
    $("message").textContent = text;
    $("message").className = ok ? "ok" : "";
  }

  async function api(method, path, body) {
    const r = await fetch(path, {
      method,
      headers: Object.assign(
        { Authorization: "Bearer " + token },
        body ? { "Content-Type": "application/json" } : {},
      ),
      body: body ? JSON.stringify(body) : undefined,
      cache: "no-store",
    });
    const text = await r.text();
    let v = null;
    try { v = text ? JSON.parse(text) : null; } catch (_) { v = { error: text }; }
    if (!r.ok) {
      const e = new Error((v && v.error) || r.status + " " + r.statusText);
      e.status = r.status;
      throw e;
    }
    return v;
  }

  const short = (peer) => peer.slice(-6);
  const when = (ms) => (ms ? new Date(ms).toLocaleTimeString() : "");
  const variant = (v) => (v && typeof v === "object" ? Object.keys(v)[0] : v);

  // What a roll-out's record says of a target, as the grid names it.
  const ROLLOUT_STATE = {
    Staging: "staging", Staged: "staged", Delivering: "delivering",
    Delivered: "live", RollingBack: "rolling back", RolledBack: "rolled back",
    Failed: "failed",
  };

  function targetState(m, inRollout) {
    if (!m.alive) return { state: "offline" };
    const running = m.report.stagings.find((s) => s.state === "Running");
    const progress = running ? running.chunks_held / Math.max(1, running.chunks_total) : null;
    if (inRollout) {
      const s = ROLLOUT_STATE[variant(inRollout.state)] || "idle";
      const why = typeof inRollout.state === "object" ? inRollout.state.Failed : null;
      return { state: s, progress: s === "staging" ? progress : null, straggler: inRollout.straggler, why };
    }
    if (running) return { state: "staging", progress };
    const failed = m.report.stagings.find((s) => typeof s.state === "object" && s.state.Failed);
    if (failed) return { state: "failed", why: failed.state.Failed };
    if (Object.keys(m.report.active).length) return { state: "live" };
    if (m.report.releases.length) return { state: "staged" };
    return { state: "idle" };
  }

  function drawFleet(fleet, running) {
    // A target's record in the newest running roll-out that holds it.
    const records = {};
    for (const d of running) {
      for (const [peer, rec] of Object.entries(d.target_states || {})) records[peer] = rec;
    }
    const dcs = {};
    for (const m of fleet.targets) {
      const dc = m.report.labels.dc || "(no dc label)";
      (dcs[dc] = dcs[dc] || []).push(m);
    }
    const alive = fleet.targets.filter((m) => m.alive).length;
    $("summary").textContent = `${fleet.targets.length} targets, ${alive} alive, ${Object.keys(dcs).length} data centres`;
    $("fleet").replaceChildren(
      ...Object.keys(dcs).sort().map((dc) =>
        el("div", { class: "dc", "data-dc": dc },
          el("h3", {}, `${dc} · ${dcs[dc].length} targets`),
          el("div", { class: "grid" }, dcs[dc].map((m) => {
            const t = targetState(m, records[m.peer_id]);
            const active = Object.entries(m.report.active).map(([a, v]) => `${a}@${v}`).join(" ");
            const cls = "target s-" + t.state.replace(" ", "-") + (t.straggler ? " s-straggler" : "");
            return el("div", {
              class: cls, "data-peer": m.peer_id, "data-state": t.state,
              title: m.peer_id + (t.why ? "\n" + t.why : ""),
            },
              el("div", {}, el("span", { class: "id" }, short(m.peer_id)), " ",
                el("span", { class: "state" }, t.state + (t.straggler ? " · straggler" : ""))),
              el("div", {}, active || "no release active"),
              t.progress !== null && t.progress !== undefined
                ? el("div", { class: "bar" }, el("div", { style: `width:${Math.round(t.progress * 100)}%` }))
                : null);
          }))))
    );
  }

  function notice(n) {
    const kind = variant(n);
    const v = n[kind];
    switch (kind) {
      case "Distributed": return `distributed to ${v.staged} targets in ${(v.ms / 1000).toFixed(1)} s`;
      case "WaveStarted": return `wave ${v.wave + 1} started: ${v.targets.length} targets`;
      case "WaveDone": return `wave ${v.wave + 1} done in ${(v.ms / 1000).toFixed(1)} s`;
      case "Slow": return `${short(v)} is slow`;
      case "Straggler": return `${short(v.target)} is a straggler: ${(v.ms / 1000).toFixed(1)} s`;
      case "Failed": return `${short(v.target)} failed: ${v.reason}`;
      case "Finished": return `finished: ${variant(v)}`;
      default:
        if (v === undefined) return kind;
        return `${kind}: ${typeof v === "string" ? v : JSON.stringify(v)}`;
    }
  }

  function phaseOf(d) {
    if (d.outcome) return d.outcome;
    if (variant(d.phase) === "Paused") return "paused";
    return "running";
  }

  function drawRollouts(list, details) {
    const newest = list.slice().reverse().slice(0, 10);
    $("rollouts").replaceChildren(
      ...(newest.length ? [] : [el("p", {}, "No roll-out yet.")]),
      ...newest.map((d) => {
        const full = details[d.id];
        const phase = phaseOf(full || d);
        const steer = (action) => el("button", {
          "data-action": action,
          onclick: () => act(`${action} roll-out ${d.id}`, "POST", `/v1/deployments/${d.id}/${action}`,
            undefined, action === "abort"),
        }, action);
        const buttons = d.outcome ? [] : [
          full && full.paused ? steer("resume") : steer("pause"),
          steer("abort"),
        ];
        let body = [];
        if (full) {
          const states = Object.values(full.target_states || {}).map((r) => variant(r.state));
          const staged = states.filter((s) => s !== "Staging" && s !== "Failed").length;
          const delivered = states.filter((s) => s === "Delivered").length;
          body = [
            el("div", { class: "waves" },
              `distribution: ${staged}/${states.length} staged · delivered ${delivered}/${states.length}`,
              full.waves.length ? ` · waves: ${full.waves.map((w) => w.length).join(", ")}` : "",
              variant(full.phase) === "Delivering" ? ` · delivering wave ${full.phase.Delivering + 1}` : ""),
            el("ul", { class: "notices" },
              full.notices.slice(-12).map((n) => el("li", {}, `${when(n.at_ms)} ${notice(n.notice)}`))),
          ];
        }
        return el("div", { class: "rollout", "data-id": d.id, "data-phase": phase },
          el("div", { class: "head" },
            el("strong", {}, `#${d.id} ${d.app}@${d.version} → ${d.env}`),
            el("span", {}, `${d.strategy}, ${d.mode}`),
            el("span", { class: "badge " + phase }, phase.replace("_", " ")),
            d.failures ? el("span", {}, `${d.failures} failed`) : null,
            el("span", {}, when(d.started_ms)),
            ...buttons),
          ...body);
      })
    );
  }

  function drawHistory(list, history) {
    const apps = [...new Set(list.map((d) => d.app))].sort();
    if (!app && apps.length) app = list[list.length - 1].app;
    const select = $("app");
    if (select.dataset.apps !== apps.join(",")) {
      select.replaceChildren(...apps.map((a) => el("option", { value: a }, a)));
      select.dataset.apps = apps.join(",");
    }
    if (app) select.value = app;
    const envs = [...new Set(list.filter((d) => d.app === app).map((d) => d.env))].sort();
    $("rollback").replaceChildren(...envs.map((env) => el("button", {
      "data-rollback": env,
      onclick: () => act(`roll ${app} back in ${env}`, "POST", "/v1/rollbacks", { app, env }, true),
    }, `Roll ${app} back in ${env}`)));
    const rows = history ? history.history.slice().reverse().slice(0, 50) : [];
    $("history").tBodies[0].replaceChildren(...rows.map((h) => el("tr", {},
      el("td", {}, when(h.at_ms)), el("td", {}, h.action), el("td", {}, h.version || ""),
      el("td", {}, h.env || ""), el("td", {}, h.deployment ?? ""), el("td", {}, h.by),
      el("td", {}, h.detail))));
  }

  async function act(what, method, path, body, confirmFirst) {
    if (confirmFirst && !window.confirm(`Really ${what}?`)) return;
    try {
      await api(method, path, body);
      say(`${what}: done`, true);
    } catch (e) {
      say(`${what}: ${e.message}`);
    }
    refresh();
  }

  async function refresh() {
    if (!token || polling) return;
    polling = true;
    try {
      const [fleet, list] = await Promise.all([api("GET", "/v1/fleet"), api("GET", "/v1/deployments")]);
      const all = list.deployments;
      // In full: the running ones and the three newest.
      const wanted = new Set(all.filter((d) => !d.outcome).map((d) => d.id));
      all.slice(-3).forEach((d) => wanted.add(d.id));
      const details = {};
      await Promise.all([...wanted].map(async (id) => {
        details[id] = await api("GET", `/v1/deployments/${id}`);
      }));
      const running = all.filter((d) => !d.outcome).map((d) => details[d.id]);
      const history = app || all.length
        ? await api("GET", `/v1/apps/${encodeURIComponent(app || all[all.length - 1].app)}/history`)
        : null;
      drawFleet(fleet, running);
      drawRollouts(all, details);
      drawHistory(all, history);
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      if ($("message").className !== "ok" && $("message").textContent.startsWith("cannot reach")) say("");
    } catch (e) {
      if (e.status === 401) {
        token = null;
        $("view").hidden = true;
        $("login").hidden = false;
        say("The API refused the token (401): enter it again.");
      } else {
        say(`cannot reach the coordinator: ${e.message}`);
      }
    } finally {
      polling = false;
    }
  }

  function start() {
    $("login").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      token = $("token").value.trim();
      $("token").value = "";
      if (!token) return;
      try {
        await api("GET", "/v1/fleet");
      } catch (e) {
        token = null;
        say(e.status === 401 ? "Wrong token (401)." : `cannot reach the coordinator: ${e.message}`);
        return;
      }
      say("");
      $("login").hidden = true;
      $("view").hidden = false;
      refresh();
    });
    $("app").addEventListener("change", (ev) => { app = ev.target.value; refresh(); });
    const legend = ["idle", "staging", "staged", "delivering", "live", "rolled back", "failed", "offline"];
    $("legend").replaceChildren(...legend.map((s) => el("span", { class: "s-" + s.replace(" ", "-") }, s)));
    setInterval(refresh, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", start);
})();

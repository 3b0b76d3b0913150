// Sipp gateway admin page: plain JavaScript, no build step, no third-party code.
// Every value from the server is inserted as text (never as HTML), and the CSRF
// token lives only in this page's memory; the session itself is an HttpOnly cookie.
"use strict";

(() => {
  const base = location.pathname.replace(/\/+$/, "");
  const METRICS_EVERY_MS = 2000;
  const OVERVIEW_EVERY = 3; // overview and audit every third metrics poll

  let csrf = null;
  let expiresAt = 0;
  let timer = null;
  let ticks = 0;
  const edited = new Set(); // ids of control forms the operator has touched: polls leave them be
  let lastMetrics = null;
  let lastOverview = null;
  // Counts logins and logouts: an answer to a call made under an earlier session
  // (a poll still in flight at logout) must not touch the page.
  let generation = 0;

  const $ = (selector) => document.querySelector(selector);

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function call(method, path, body) {
    const headers = {};
    if (body !== undefined) headers["content-type"] = "application/json";
    if (method !== "GET" && csrf) headers["x-sipp-admin-csrf"] = csrf;
    const response = await fetch(`${base}/api/${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const message = (data && data.error && data.error.message) || `HTTP ${response.status}`;
      throw new ApiError(response.status, message);
    }
    return data;
  }

  // ---- small DOM helpers -------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(tableId, rows, empty) {
    const body = $(`#${tableId} tbody`);
    if (!rows.length) {
      const columns = $(`#${tableId} thead tr`).children.length;
      rows = [el("tr", {}, el("td", { colspan: columns, class: "muted" }, empty))];
    }
    body.replaceChildren(...rows);
  }

  const num = (value) => el("td", { class: "num" }, fmtInt(value));
  const fmtInt = (value) => (value == null ? "–" : Number(value).toLocaleString("en-US"));
  const fmtMs = (value) =>
    value == null ? "–" : value < 1000 ? `${value.toFixed(1)} ms` : `${(value / 1000).toFixed(2)} s`;
  const fmtPct = (value) => `${(value * 100).toFixed(1)} %`;
  const fmtTime = (epochSeconds) => new Date(epochSeconds * 1000).toLocaleTimeString();
  const badge = (text) => el("span", { class: `state state-${text}` }, text);

  function notice(message) {
    $("#notice").textContent = message || "";
  }

  // ---- views -------------------------------------------------------------

  function showLogin(message) {
    generation += 1;
    csrf = null;
    stopPolling();
    $("#dashboard").hidden = true;
    $("#session-bar").hidden = true;
    $("#login-view").hidden = false;
    $("#login-error").textContent = message || "";
    $("#password").value = "";
    $("#password").focus();
  }

  function showDashboard(session) {
    generation += 1;
    csrf = session.csrf_token;
    expiresAt = Date.now() + session.expires_in * 1000;
    edited.clear();
    $("#login-view").hidden = true;
    $("#dashboard").hidden = false;
    $("#session-bar").hidden = false;
    notice("");
    startPolling();
  }

  function renderLive(metrics) {
    const live = metrics.live;
    const totals = metrics.totals;
    const values = {
      requests_per_second: live.requests_per_second.toFixed(2),
      error_ratio: fmtPct(live.error_ratio),
      latency_p50_ms: fmtMs(live.latency_p50_ms),
      latency_p95_ms: fmtMs(live.latency_p95_ms),
      ttft_p50_ms: fmtMs(live.ttft_p50_ms),
      ttft_p95_ms: fmtMs(live.ttft_p95_ms),
      in_flight: fmtInt(metrics.in_flight),
      requests: fmtInt(totals.requests),
      errors: fmtInt(totals.errors),
      rate_limited: fmtInt(totals.rate_limited),
      admission_rejected: fmtInt(totals.admission_rejected),
      tokens: `${fmtInt(totals.input_tokens)} / ${fmtInt(totals.output_tokens)}`,
    };
    for (const node of document.querySelectorAll("[data-live]")) {
      node.textContent = values[node.dataset.live];
    }
    const codes = new Set([...Object.keys(live.errors_by_code), ...Object.keys(totals.errors_by_code)]);
    fill(
      "errors",
      [...codes].sort().map((code) =>
        el("tr", { "data-code": code }, el("td", {}, code), num(live.errors_by_code[code] || 0), num(totals.errors_by_code[code] || 0)),
      ),
      "No errors.",
    );
    fill(
      "recent",
      (metrics.recent || []).map((r) =>
        el(
          "tr",
          {},
          el("td", {}, fmtTime(r.at)),
          el("td", {}, r.operation),
          el("td", {}, r.caller || "–"),
          el("td", {}, r.target || "–"),
          el("td", {}, r.route || "–"),
          el("td", {}, r.code || "ok"),
          el("td", { class: "num" }, fmtMs(r.duration_ms)),
        ),
      ),
      "No requests yet.",
    );
    const h = metrics.history;
    drawChart($("#chart-requests"), h, [["requests", "requests"], ["errors", "errors"]]);
    drawChart($("#chart-latency"), h, [["latency_p50_ms", "p50"], ["latency_p95_ms", "p95"], ["ttft_p50_ms", "TTFT p50"]]);
    drawChart($("#chart-tokens"), h, [["input_tokens", "in"], ["output_tokens", "out"]]);
    drawChart($("#chart-load"), h, [["in_flight", "in flight"], ["rate_limited", "rate-limited"], ["admission_rejected", "rejected"]]);
  }

  function renderOverview(overview, metrics) {
    const perTarget = (metrics && metrics.targets) || {};
    fill(
      "targets",
      overview.targets.map((t) => {
        const stats = perTarget[t.name] || {};
        const action = t.disabled ? "enable_target" : "disable_target";
        const button = el(
          "button",
          { type: "button", class: t.disabled ? "secondary" : "danger", onclick: () => control(action, { target: t.name }) },
          t.disabled ? "Enable" : "Disable",
        );
        const health = el("td", {}, badge(t.health));
        if (t.last_error) health.title = `last failure: ${t.last_error.code} at ${fmtTime(t.last_error.at)}`;
        return el(
          "tr",
          { "data-target": t.name },
          el("td", {}, t.name),
          el("td", {}, t.type),
          el("td", {}, t.backend ? (t.backend === t.backend_requested ? t.backend : `${t.backend} (${t.backend_requested})`) : "–"),
          el("td", {}, badge(t.state)),
          health,
          num(stats.requests || 0),
          num(stats.errors || 0),
          num(stats.input_tokens || 0),
          num(stats.output_tokens || 0),
          el("td", {}, button),
        );
      }),
      "No targets configured.",
    );

    const perCaller = (metrics && metrics.callers) || {};
    fill(
      "callers",
      overview.tokens.map((c) => {
        const stats = perCaller[c.caller] || {};
        return el(
          "tr",
          { "data-caller": c.caller },
          el("td", {}, c.caller),
          el("td", {}, c.targets.join(", ")),
          num(stats.requests || 0),
          num(stats.errors || 0),
          num(stats.input_tokens || 0),
          num(stats.output_tokens || 0),
        );
      }),
      "No tokens configured.",
    );

    const routeRows = [
      ["public listener", overview.listeners.public],
      ["management listener", overview.listeners.management],
      ...Object.entries(overview.routes).map(([name, path]) => [`route: ${name}`, path]),
      ...overview.openai_routes.map((path) => ["OpenAI-compatible", path]),
      ...overview.anthropic_routes.map((path) => ["Anthropic-compatible", path]),
    ];
    fill("routes", routeRows.map(([name, value]) => el("tr", {}, el("td", {}, name), el("td", {}, el("code", {}, value)))), "");

    const controls = overview.controls;
    $("#blocked").replaceChildren(
      ...controls.blocked_ips.map((ip) =>
        el(
          "li",
          { "data-ip": ip },
          el("code", {}, ip),
          el("button", { type: "button", class: "secondary", onclick: () => control("unblock", { ip }) }, "Unblock"),
        ),
      ),
    );
    // The forms show what the server runs with, unless the operator is editing them.
    if (!edited.has("rate-form")) {
      $("#rate-enabled").checked = controls.rate_limit !== null;
      if (controls.rate_limit) {
        $("#rate-rpm").value = controls.rate_limit.requests_per_minute;
        $("#rate-burst").value = controls.rate_limit.burst;
      }
    }
    if (!edited.has("concurrency-form")) {
      $("#max-concurrent").value = controls.max_concurrent_requests ?? "";
    }
  }

  function renderAudit(audit) {
    // `partial` is only there when the list is shared through Redis.
    $("#audit-scope").textContent = audit.partial
      ? "this replica's entries only: Redis is unreachable"
      : "partial" in audit
        ? "every replica's, through Redis"
        : "this process's memory";
    $("#audit-scope").classList.toggle("error", audit.partial === true);
    fill(
      "audit",
      audit.entries
        .slice()
        .sort((a, b) => b.at - a.at) // newest first, in whichever order the API listed them
        .map((entry) => {
          const { at, session, action, ...detail } = entry;
          const text = Object.entries(detail).map(([k, v]) => `${k}=${v === null ? "null" : v}`).join(" ");
          return el("tr", { "data-action": action }, el("td", {}, fmtTime(at)), el("td", {}, el("code", {}, session)), el("td", {}, action), el("td", {}, text));
        }),
      "Nothing yet.",
    );
  }

  const fmtRate = (value) => (value == null ? "–" : fmtPct(value));
  const names = (text) => text.split(/[\s,]+/).filter((name) => name !== "");

  function renderPools(pools) {
    fill(
      "pools",
      pools.flatMap((p) =>
        p.deployments.map((d) =>
          el(
            "tr",
            { "data-pool": p.target, "data-deployment": d.name },
            el("td", {}, p.target),
            el("td", {}, d.target ? `${d.name} (target ${d.target})` : d.name),
            el("td", {}, badge(d.healthy ? "healthy" : "unhealthy")),
            el("td", { "data-field": "breaker" }, badge(d.breaker)),
            num(d.in_flight),
            el("td", { class: "num" }, fmtMs(d.latency_ms)),
            el("td", { class: "num", "data-field": "error_rate" }, fmtRate(d.error_rate)),
            num(d.breaker_opened),
          ),
        ),
      ),
      "No targets configured.",
    );
    renderFallbacks(pools);
  }

  // Rows are kept across polls so a rule being typed is never overwritten; a row the
  // operator touched shows the server's lists again once saved or reset.
  function renderFallbacks(pools) {
    const body = $("#fallbacks tbody");
    const rows = new Map([...body.querySelectorAll("tr[data-fallbacks]")].map((row) => [row.dataset.fallbacks, row]));
    const ordered = pools.map((p) => {
      let row = rows.get(p.target);
      if (!row) row = fallbackRow(p.target);
      const id = `rule:${p.target}`;
      if (!edited.has(id)) {
        row.querySelector('input[name="fallbacks"]').value = p.fallbacks.join(", ");
        row.querySelector('input[name="context_fallbacks"]').value = p.context_fallbacks.join(", ");
      }
      const configured = p.configured;
      const toml = `${configured.fallbacks.join(", ") || "–"} / ${configured.context_fallbacks.join(", ") || "–"}`;
      row.querySelector('[data-field="configured"]').replaceChildren(toml, " ", ...(p.edited ? [badge("edited")] : []));
      return row;
    });
    body.replaceChildren(...ordered);
  }

  function fallbackRow(target) {
    const id = `rule:${target}`;
    const input = (name, label) => {
      const node = el("input", { name, "aria-label": `${label} of ${target}`, placeholder: "none" });
      for (const kind of ["input", "change"]) node.addEventListener(kind, () => edited.add(id));
      return node;
    };
    const fallbacks = input("fallbacks", "fallbacks");
    const context = input("context_fallbacks", "context fallbacks");
    const save = () =>
      control("fallbacks", { target, fallbacks: names(fallbacks.value), context_fallbacks: names(context.value) }, id);
    for (const node of [fallbacks, context]) {
      node.addEventListener("keydown", (event) => {
        if (event.key === "Enter") save();
      });
    }
    return el(
      "tr",
      { "data-fallbacks": target },
      el("td", {}, target),
      el("td", {}, fallbacks),
      el("td", {}, context),
      el("td", { "data-field": "configured" }),
      el(
        "td",
        {},
        el("button", { type: "button", onclick: save }, "Save"),
        " ",
        el("button", { type: "button", class: "secondary", onclick: () => control("fallbacks", { target, reset: true }, id) }, "Reset"),
      ),
    );
  }

  function renderUsage(usage) {
    const shared = usage.backend === "redis";
    $("#usage-backend").textContent = shared ? "shared by every replica through Redis" : "this process's memory";
    $("#fallback-scope").textContent = shared
      ? "Edits are kept in Redis: every replica follows them, across restarts."
      : "Edits live in this process and reset on restart.";
    $("#controls-scope").textContent = shared
      ? "(blocked IPs and disabled targets: every replica, through Redis; the rest: this process only, reset on restart)"
      : "(this process only; reset on restart)";
    $("#usage-notice").textContent = usage.available ? "" : "The state store (Redis) cannot be reached right now.";
    fill(
      "usage",
      usage.limits.map((u) =>
        el(
          "tr",
          { "data-usage": `${u.scope}:${u.name}:${u.limit}`, class: u.remaining === 0 ? "spent" : "" },
          el("td", {}, u.scope),
          el("td", {}, u.name),
          el("td", {}, u.limit.replaceAll("_", " ")),
          el("td", { class: "num", "data-field": "used" }, fmtInt(u.used)),
          num(u.capacity),
          el("td", { class: "num", "data-field": "remaining" }, fmtInt(u.remaining)),
          el("td", {}, el("progress", { max: u.capacity, value: Math.min(u.used, u.capacity) })),
          el("td", { class: "num" }, fmtSeconds(u.reset_seconds)),
        ),
      ),
      usage.available ? "No limits configured." : "Usage unavailable.",
    );
  }

  const fmtBytes = (value) => {
    if (value == null) return "–";
    if (value < 1024) return `${value} B`;
    if (value < 1024 ** 2) return `${(value / 1024).toFixed(1)} KiB`;
    return `${(value / 1024 ** 2).toFixed(1)} MiB`;
  };
  const MATCHES = ["exact", "semantic"];

  function renderCache(caches) {
    $("#cache-shared").textContent = caches.some((c) => c.backend === "redis") ? ", shared by every replica with Redis" : "";
    fill(
      "cache",
      caches.map((c) => {
        const field = (name, text, title) => {
          const cell = el("td", { class: "num", "data-field": name }, text);
          if (title) cell.title = title;
          return cell;
        };
        const s = c.semantic;
        const semantic = s
          ? `${fmtInt(s.entries)} questions · ${fmtInt(s.hits)} hits · ${fmtInt(s.guard_rejections)} guard rejections · ${fmtInt(s.embedding_failures)} embedding failures`
          : "off";
        const v = c.verification;
        // one line per match kind
        const lines = (text) => (v ? MATCHES.map((m) => el("div", {}, `${m} ${text(v[m])}`)) : ["off"]);
        const verified = lines((n) => `${n.agree} / ${n.disagree} / ${n.error} / ${n.skipped}`);
        const falseHits = lines((n) => fmtRate(n.false_hit_rate));
        const purge = el(
          "button",
          {
            type: "button",
            class: "danger",
            onclick: () => {
              if (window.confirm(`Empty the cache of ${c.target}? Every stored answer${s ? " and its semantic index" : ""} goes.`)) {
                control("purge", { target: c.target }, undefined, "cache/purge");
              }
            },
          },
          "Purge",
        );
        return el(
          "tr",
          { "data-cache": c.target, class: c.available ? "" : "unavailable" },
          el("td", {}, c.target),
          el("td", {}, c.available ? c.backend : `${c.backend} (unreachable)`),
          field("entries", `${fmtInt(c.entries)} / ${fmtInt(c.max_entries)}`),
          field("bytes", `${fmtBytes(c.bytes)} / ${fmtBytes(c.max_bytes)}`),
          field("ttl", fmtSeconds(c.ttl_seconds)),
          field("hits", fmtInt(c.hits), `${fmtInt(c.tokens_saved)} tokens saved`),
          field("misses", fmtInt(c.misses)),
          field("bypasses", fmtInt(c.bypasses)),
          field("stores", fmtInt(c.stores), c.errors ? `${fmtInt(c.errors)} store errors` : ""),
          field("hit_ratio", fmtRate(c.hit_ratio)),
          el("td", { "data-field": "semantic" }, semantic),
          el("td", { "data-field": "verified" }, ...verified),
          el("td", { "data-field": "false_hit_rate" }, ...falseHits),
          el("td", {}, purge),
        );
      }),
      "No target has a [targets.cache].",
    );
  }

  function fmtSeconds(seconds) {
    if (seconds <= 0) return "now";
    if (seconds < 120) return `${Math.ceil(seconds)} s`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  // ---- charts (inline SVG) ----------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  };

  function niceMax(value) {
    if (value <= 0) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  function drawChart(node, history, series) {
    const width = 600, height = 160, left = 44, right = 8, top = 16, bottom = 18;
    const n = history.length;
    let max = 0;
    for (const [key] of series) for (const row of history) if (row[key] != null) max = Math.max(max, row[key]);
    max = niceMax(max);
    const x = (i) => left + (i * (width - left - right)) / Math.max(1, n - 1);
    const y = (v) => top + (height - top - bottom) * (1 - v / max);
    const parts = [
      svg("line", { class: "axis", x1: left, y1: y(0), x2: width - right, y2: y(0) }),
      svg("line", { class: "axis", x1: left, y1: y(max), x2: width - right, y2: y(max) }),
      svg("text", { x: left - 4, y: y(max) + 3, "text-anchor": "end" }, fmtInt(max)),
      svg("text", { x: left - 4, y: y(0) + 3, "text-anchor": "end" }, "0"),
      svg("text", { x: left, y: height - 4 }, `-${Math.round((n * 5) / 60)} min`),
      svg("text", { x: width - right, y: height - 4, "text-anchor": "end" }, "now"),
    ];
    series.forEach(([key, label], i) => {
      // A gap (no data in a bucket, e.g. no latency sample) breaks the line.
      let points = [];
      const flush = () => {
        if (points.length === 1) points.push(points[0]);
        if (points.length) parts.push(svg("polyline", { class: `series-${i}`, points: points.join(" "), "data-series": key }));
        points = [];
      };
      history.forEach((row, j) => {
        if (row[key] == null) flush();
        else points.push(`${x(j).toFixed(1)},${y(row[key]).toFixed(1)}`);
      });
      flush();
      parts.push(svg("text", { class: `legend-${i}`, x: left + 8 + i * 110, y: 11 }, `■ ${label}`));
    });
    node.replaceChildren(...parts);
  }

  // ---- polling -----------------------------------------------------------

  async function refresh(all) {
    const mine = generation;
    try {
      const [metrics, pools, usage, cache] = await Promise.all([call("GET", "metrics"), call("GET", "pools"), call("GET", "usage"), call("GET", "cache")]);
      if (mine !== generation) return;
      lastMetrics = metrics;
      renderLive(metrics);
      renderPools(pools.pools);
      renderUsage(usage);
      renderCache(cache.caches);
      if (all || !lastOverview) {
        const [overview, audit] = await Promise.all([call("GET", "overview"), call("GET", "audit")]);
        if (mine !== generation) return;
        lastOverview = overview;
        renderAudit(audit);
      }
      renderOverview(lastOverview, lastMetrics);
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof ApiError && error.status === 401) showLogin("Your session ended; log in again.");
      else notice(`Could not refresh: ${error.message}`);
    }
  }

  function updateExpiry() {
    const left = Math.max(0, Math.round((expiresAt - Date.now()) / 1000));
    $("#session-expiry").textContent = `session ends in ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
    if (left === 0) showLogin("Your session ended; log in again.");
  }

  function startPolling() {
    stopPolling();
    ticks = 0;
    lastOverview = null;
    refresh(true);
    updateExpiry();
    timer = setInterval(() => {
      ticks += 1;
      updateExpiry();
      // A background tab skips polls; it catches up in full when shown again.
      if (csrf && !document.hidden) refresh(ticks % OVERVIEW_EVERY === 0);
    }, METRICS_EVERY_MS);
  }

  function stopPolling() {
    if (timer !== null) clearInterval(timer);
    timer = null;
  }

  async function control(action, body, formId, path) {
    const mine = generation;
    try {
      await call("POST", path || `controls/${action}`, body);
      if (mine !== generation) return;
      notice("");
      edited.delete(formId);
      await refresh(true);
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof ApiError && error.status === 401) showLogin("Your session ended; log in again.");
      else notice(`${action}: ${error.message}`);
    }
  }

  // ---- wiring ------------------------------------------------------------

  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const session = await call("POST", "session", { password: $("#password").value });
      $("#password").value = "";
      showDashboard(session);
    } catch (error) {
      $("#password").value = "";
      $("#login-error").textContent = error.status === 429 ? "Too many failed logins; wait a few minutes." : error.message;
    }
  });

  $("#logout").addEventListener("click", async () => {
    // End this session's polls first; the DELETE below still needs the CSRF token.
    generation += 1;
    stopPolling();
    try {
      await call("DELETE", "session");
    } catch (_) {
      // The session may already be gone; either way the page returns to the login form.
    }
    showLogin("Logged out.");
  });

  $("#block-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const ip = $("#block-ip").value.trim();
    $("#block-ip").value = "";
    control("block", { ip });
  });

  for (const id of ["rate-form", "concurrency-form"]) {
    for (const kind of ["input", "change"]) $(`#${id}`).addEventListener(kind, () => edited.add(id));
  }

  $("#rate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const body = {
      enabled: $("#rate-enabled").checked,
      requests_per_minute: Number($("#rate-rpm").value),
      burst: Number($("#rate-burst").value),
    };
    control("rate_limit", body, "rate-form");
  });

  $("#concurrency-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const raw = $("#max-concurrent").value.trim();
    control("max_concurrent_requests", { value: raw === "" ? null : Number(raw) }, "concurrency-form");
  });

  call("GET", "session").then(showDashboard, () => showLogin(""));
})();

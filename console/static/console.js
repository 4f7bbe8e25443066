/* The console's pages: each is a client of the JSON API (/openapi.json). No data goes through innerHTML. */
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page, tenant = body.dataset.tenant, gw = body.dataset.gw;
  const content = document.getElementById("content");
  const message = document.getElementById("message");
  let csrf = "";
  let account = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) { if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c)); }
    return node;
  }
  function say(text, error) { message.textContent = text || ""; message.className = error ? "error" : ""; }
  async function api(path, options) {
    const opts = Object.assign({ headers: {} }, options || {});
    if (opts.json !== undefined) {
      opts.method = opts.method || "POST"; opts.body = JSON.stringify(opts.json);
      opts.headers["Content-Type"] = "application/json";
    }
    if (opts.method && opts.method !== "GET") opts.headers["X-CSRF-Token"] = csrf;
    const response = await fetch(path, opts);
    if (response.status === 401 && page !== "login") { location.href = "/login"; throw new Error("not logged in"); }
    const doc = response.headers.get("content-type", "").includes("json") ? await response.json() : null;
    if (!response.ok) throw new Error((doc && doc.detail) || `${response.status}`);
    return doc;
  }
  const T = (p) => `/api/tenants/${encodeURIComponent(tenant)}${p}`;
  function time(ms) { return ms ? new Date(ms).toLocaleString() : "—"; }
  function ago(ms) {
    if (!ms) return "—";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    return s < 90 ? `${s} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : s < 172800 ? `${Math.round(s / 3600)} h ago` : `${Math.round(s / 86400)} d ago`;
  }
  function badge(state) { return el("span", { class: `state ${String(state).replace(/\s/g, "-")}` }, state); }
  function value(v) { return v === null || v === undefined ? "—" : typeof v === "number" ? String(Number(v.toPrecision(8))) : String(v); }
  function live(onEvent, extra) {
    const source = new EventSource(T(`/stream${extra || ""}`));
    for (const name of ["fleet", "alerts", "gateway", "problem", "logout"]) {
      source.addEventListener(name, (e) => {
        if (name === "logout") { source.close(); location.href = "/login"; return; }
        onEvent(name, JSON.parse(e.data));
      });
    }
    source.onerror = () => say("Live updates interrupted; reconnecting…");
    source.onopen = () => { if (message.textContent.startsWith("Live updates")) say(""); };
    return source;
  }

  /* Sortable, filterable table: columns [{key, label, num, render}] */
  function table(columns, state) {
    const wrap = el("div", { class: "table-wrap" });
    state.sort = state.sort || columns[0].key; state.dir = state.dir || 1;
    state.render = (rows) => {
      // A live update must not take the keyboard focus away: find the focused control again after drawing.
      const focused = wrap.contains(document.activeElement) ? document.activeElement : null;
      const again = focused && (focused.dataset.sort ? `button[data-sort="${focused.dataset.sort}"]` : focused.getAttribute("href") ? `a[href="${focused.getAttribute("href")}"]` : null);
      const shown = rows.filter(state.filter || (() => true)).slice().sort((a, b) => {
        const x = a[state.sort], y = b[state.sort];
        return (x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1) * state.dir;
      });
      const head = el("tr", {}, columns.map((c) => el("th", { scope: "col", "aria-sort": state.sort === c.key ? (state.dir > 0 ? "ascending" : "descending") : "none" },
        el("button", { type: "button", "data-sort": c.key, onclick: () => { state.dir = state.sort === c.key ? -state.dir : 1; state.sort = c.key; state.render(state.rows); } }, c.label))));
      const rowsEl = shown.map((r) => el("tr", { "data-key": r[columns[0].key] }, columns.map((c) => el("td", { class: c.num ? "num" : null, "data-col": c.key }, c.render ? c.render(r) : value(r[c.key])))));
      wrap.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, rowsEl.length ? rowsEl : el("tr", {}, el("td", { colspan: columns.length }, "Nothing to show.")))));
      if (again) { const back = wrap.querySelector(again); if (back) back.focus(); }
    };
    state.update = (rows) => { state.rows = rows; state.render(rows); };
    return wrap;
  }

  async function nav() {
    const doc = await api("/api/session");
    csrf = doc.csrf; account = doc.account;
    const links = [];
    if (account.role === "operator") links.push(["/", "Tenants"]);
    if (tenant) {
      links.push([`/tenants/${tenant}`, "Fleet"], [`/tenants/${tenant}/alerts`, "Alerts"], [`/tenants/${tenant}/provisioning`, "Provisioning"], [`/tenants/${tenant}/audit`, "Audit"]);
    }
    if (account.role === "operator") links.push(["/audit", "All audit"]);
    const here = location.pathname;
    const navEl = document.getElementById("nav");
    navEl.append(...links.map(([href, text]) => el("a", { href, "aria-current": href === here ? "page" : null }, text)));
    navEl.append(el("span", { class: "who" }, `${account.name} (${account.role}${account.tenant ? " · " + account.tenant : ""})`),
      el("button", { type: "button", id: "logout", onclick: async () => { await api("/api/logout", { method: "POST" }); location.href = "/login"; } }, "Log out"));
    return doc;
  }

  const pages = {};

  pages.login = async () => {
    const name = el("input", { id: "name", name: "name", autocomplete: "username", required: true });
    const pass = el("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
    const form = el("form", { class: "login", onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("/api/login", { json: { name: name.value, password: pass.value } });
        location.href = "/";
      } catch (err) { say(err.message, true); pass.value = ""; pass.focus(); }
    } }, el("label", { for: "name" }, "Account"), name, el("label", { for: "password" }, "Password"), pass,
    el("p", {}, el("button", { type: "submit", class: "primary" }, "Log in")));
    content.append(form); name.focus();
  };

  pages.home = async (session) => {
    content.append(el("ul", {}, session.tenants.map((t) => el("li", {}, el("a", { href: `/tenants/${t}` }, t)))));
  };

  pages.fleet = async () => {
    const state = {};
    const text = el("input", { id: "filter", type: "search", placeholder: "gateway, version…" });
    const only = el("select", { id: "state-filter" }, ["all", "online", "offline", "never seen", "revoked", "with errors", "certificate expiring"].map((s) => el("option", { value: s }, s)));
    state.filter = (r) => {
      const q = text.value.trim().toLowerCase(), s = only.value;
      if (q && !`${r.gateway} ${r.version || ""} ${r.config_hash || ""}`.toLowerCase().includes(q)) return false;
      if (s === "with errors") return r.devices_with_errors.length > 0;
      if (s === "certificate expiring") return !!r.cert_warning;
      return s === "all" || r.state === s;
    };
    for (const input of [text, only]) input.addEventListener("input", () => state.render(state.rows || []));
    const summary = el("p", { id: "summary" });
    const columns = [
      { key: "gateway", label: "Gateway", render: (r) => el("a", { href: `/tenants/${tenant}/gateways/${encodeURIComponent(r.gateway)}` }, r.gateway) },
      { key: "state", label: "State", render: (r) => badge(r.state) },
      { key: "last_seen", label: "Last seen", render: (r) => el("span", { title: time(r.last_seen) }, ago(r.last_seen)) },
      { key: "version", label: "Version" },
      { key: "config_hash", label: "Config", render: (r) => (r.config_hash || "—").slice(0, 12) },
      { key: "lag_ms", label: "Data lag", num: true, render: (r) => (r.lag_ms === null ? "—" : `${Math.round(r.lag_ms / 1000)} s`) },
      { key: "backlog_batches", label: "Backlog", num: true, render: (r) => (r.backlog_batches === null ? "—" : el("span", { class: r.backlog_batches ? "warn" : null, title: r.oldest_backlog_ts ? `oldest buffered ${time(r.oldest_backlog_ts)}; as of ${time(r.buffer_ts)}` : `as of ${time(r.buffer_ts)}` }, `${r.backlog_batches} batches`)) },
      { key: "unconfirmed_batches", label: "Unconfirmed", num: true, render: (r) => (r.unconfirmed_batches === null ? "—" : el("span", { title: r.oldest_unconfirmed_ts ? `oldest since ${time(r.oldest_unconfirmed_ts)}` : null }, r.unconfirmed_batches)) },
      { key: "dropped_points", label: "Dropped", num: true, render: (r) => el("span", { class: r.dropped_points ? "bad" : null }, r.dropped_points) },
      { key: "cert_days_left", label: "Cert. expiry", render: (r) => (r.cert_not_after ? el("span", { class: r.cert_warning ? "warn" : null }, `${r.cert_warning ? "⚠ " : ""}${Math.floor(r.cert_days_left)} days`) : "—") },
      { key: "devices", label: "Devices", num: true },
      { key: "bad_tags", label: "Device errors", render: (r) => (r.devices_with_errors.length ? el("span", { class: "bad" }, r.devices_with_errors.join(", ")) : "none") },
      { key: "active_alerts", label: "Alerts", num: true, render: (r) => el("span", { class: r.active_alerts ? "bad" : null }, r.active_alerts) },
    ];
    const wrap = table(columns, state);
    content.append(el("div", { class: "filters" }, el("label", { for: "filter" }, "Search", text), el("label", { for: "state-filter" }, "Show", only)), summary, wrap);
    const show = (rows) => {
      state.update(rows);
      const online = rows.filter((r) => r.state === "online").length;
      summary.textContent = `${rows.length} gateway${rows.length === 1 ? "" : "s"}: ${online} online, ${rows.length - online} not online.`;
      if (!body.dataset.ready) body.dataset.renderedMs = performance.now().toFixed(1); // first render, since navigation
      body.dataset.ready = "1";
    };
    show(await api(T("/fleet")));
    live((name, doc) => { if (name === "fleet") show(doc); });
  };

  const withUnit = (t) => (t.unit && t.value !== null && t.value !== undefined ? `${value(t.value)} ${t.unit}` : value(t.value));

  pages.gateway = async () => {
    const status = el("p", { id: "gw-status" });
    const devicesEl = el("div", { id: "devices" });
    const alertsEl = el("div", { id: "gw-alerts" });
    const chosen = new Set();
    const range = el("select", { id: "range" }, [["900000", "last 15 minutes"], ["3600000", "last hour"], ["28800000", "last 8 hours"], ["86400000", "last 24 hours"], ["604800000", "last 7 days"], ["2592000000", "last 30 days"]].map(([v, t]) => el("option", { value: v, selected: v === "3600000" }, t)));
    const canvas = el("canvas", { class: "trend", id: "trend", role: "img", "aria-label": "Trend chart" });
    const legend = el("div", { class: "legend", id: "legend" });
    const csv = el("a", { id: "csv", href: "#" }, "Download CSV of the shown range");
    const source = el("p", { class: "muted", id: "trend-source" });
    let drawnAt = 0;
    async function drawChart() {
      if (!chosen.size) { legend.textContent = "Choose tags in the table to draw their trend."; return; }
      const end = Date.now(), start = end - Number(range.value);
      const q = [...chosen].map((s) => `series=${encodeURIComponent(s)}`).join("&");
      const buckets = Math.max(100, Math.min(2000, Math.round(canvas.clientWidth || 800)));
      const doc = await api(T(`/trend?${q}&start=${start}&end=${end}&buckets=${buckets}`));
      window.drawTrend(canvas, doc);
      legend.replaceChildren(...doc.series.map((s, i) => el("span", { style: null, "data-color": i }, `${s.series}${s.unit ? ` [${s.unit}]` : ""} (${s.points.reduce((n, p) => n + p[4], 0)} readings)`)));
      [...legend.children].forEach((span, i) => span.style.setProperty("--swatch", window.trendColors[i % window.trendColors.length]));
      source.textContent = `${doc.series.reduce((n, s) => n + s.points.length, 0)} buckets drawn, from ${doc.source === "rollup" ? "per-minute rollups" : "raw points"}.`;
      csv.href = T(`/trend.csv?${q}&start=${start}&end=${end}`);
      drawnAt = Date.now();
    }
    range.addEventListener("change", drawChart);
    let layout = "";
    function showGateway(doc) {
      if (!doc) return;
      const s = doc.status || {};
      const buffered = s.backlog_batches === null || s.backlog_batches === undefined ? "" : ` · backlog ${s.backlog_batches} batches, ${s.unconfirmed_batches} unconfirmed`;
      status.replaceChildren(badge(s.state || "unknown"), ` last seen ${ago(s.last_seen)} · version ${s.version || "—"}${buffered} · dropped points ${s.dropped_points || 0}`,
        s.cert_not_after ? ` · certificate until ${s.cert_not_after}` : "");
      const shape = doc.devices.map((d) => `${d.device}:${d.tags.map((t) => t.tag).join(",")}`).join(";");
      if (shape === layout) { // the same tags: update the cells in place (focus and ticked boxes stay as they are)
        for (const d of doc.devices) {
          for (const t of d.tags) {
            const row = devicesEl.querySelector(`tr[data-tag="${CSS.escape(`${d.device}/${t.tag}`)}"]`);
            if (!row) continue;
            row.children[2].textContent = withUnit(t);
            row.children[3].replaceChildren(badge(t.quality));
            row.children[4].textContent = time(t.ts);
            row.children[5].textContent = t.error || "";
          }
        }
        return;
      }
      layout = shape;
      devicesEl.replaceChildren(...doc.devices.map((d) => el("section", {}, el("h2", {}, d.device), el("div", { class: "table-wrap" }, el("table", {},
        el("thead", {}, el("tr", {}, ["Trend", "Tag", "Value", "Quality", "Read at", "Last error"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, d.tags.map((t) => {
          const key = `${gw}/${d.device}/${t.tag}`;
          const box = el("input", { type: "checkbox", "aria-label": `trend of ${t.tag}`, checked: chosen.has(key), onchange: (e) => { e.target.checked ? chosen.add(key) : chosen.delete(key); drawChart(); } });
          return el("tr", { "data-tag": `${d.device}/${t.tag}` }, el("td", {}, box), el("td", {}, t.tag, t.description ? el("div", { class: "muted" }, t.description) : null), el("td", { class: "num value" }, withUnit(t)),
            el("td", {}, badge(t.quality)), el("td", {}, time(t.ts)), el("td", {}, t.error || ""));
        })))))));
      body.dataset.ready = "1";
    }
    function showAlerts(doc) {
      alertsEl.replaceChildren(doc.active.length ? el("ul", {}, doc.active.map((a) => el("li", {}, badge(a.state), ` ${a.rule} on ${a.device} (${value(a.value)}) since ${time(a.since)}`))) : el("p", {}, "No active alerts."));
    }
    content.append(status, el("h2", {}, "Active alerts"), alertsEl, el("h2", {}, "Trend"),
      el("div", { class: "filters" }, el("label", { for: "range" }, "Range", range), csv), el("div", { class: "chart-wrap" }, canvas), legend, source,
      el("h2", {}, "Devices and tags"), devicesEl);
    showGateway(await api(T(`/gateways/${encodeURIComponent(gw)}`)));
    showAlerts(await api(T(`/alerts?gw=${encodeURIComponent(gw)}`)));
    live((name, doc) => {
      if (name === "gateway") { showGateway(doc); if (chosen.size && Date.now() - drawnAt > 5000) drawChart(); }
      if (name === "alerts") showAlerts(doc);
    }, `?gw=${encodeURIComponent(gw)}`);
  };

  pages.alerts = async () => {
    const active = el("div", { id: "active" }), history = el("div", { id: "history" });
    const mayChange = account.role === "operator" || account.role === "tenant-admin";
    // A live update redraws the table: what is being typed into a comment, and where, is carried over.
    const drafts = new Map();
    let drawn = "";
    function show(doc) {
      const text = JSON.stringify(doc);
      if (text === drawn) return;
      const focused = active.contains(document.activeElement) && document.activeElement.dataset.draft ? document.activeElement : null;
      const caret = focused ? [focused.dataset.draft, focused.tagName, focused.selectionStart, focused.selectionEnd] : null;
      const keys = new Set(doc.active.map((a) => `${a.gw}/${a.device}/${a.rule}`));
      for (const key of [...drafts.keys()]) if (!keys.has(key)) drafts.delete(key);
      active.replaceChildren(doc.active.length ? el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, el("tr", {}, ["State", "Rule", "Gateway", "Device", "Value", "Since", "Acknowledged"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, doc.active.map((a) => {
          const key = `${a.gw}/${a.device}/${a.rule}`;
          const comment = el("input", { "aria-label": `comment for ${a.rule}`, placeholder: "comment", required: true, "data-draft": key, oninput: () => drafts.set(key, comment.value) });
          comment.value = drafts.get(key) || "";
          const ack = a.ack ? `${a.ack.by}: ${a.ack.comment} (${time(a.ack.ts)})` : mayChange ? el("form", { class: "inline", onsubmit: async (e) => {
            e.preventDefault();
            try { await api(T("/alerts/ack"), { json: { gw: a.gw, device: a.device, rule: a.rule, comment: comment.value } }); drafts.delete(key); say("Acknowledged."); show(await api(T("/alerts"))); } catch (err) { say(err.message, true); }
          } }, comment, el("button", { type: "submit", "data-draft": key }, "Acknowledge")) : "no";
          return el("tr", { "data-alert": key }, el("td", {}, badge(a.state)), el("td", {}, a.rule), el("td", {}, a.gw), el("td", {}, a.device), el("td", { class: "num" }, value(a.value)), el("td", {}, time(a.since)), el("td", {}, ack));
        })))) : el("p", { id: "no-active" }, "No active alerts."));
      history.replaceChildren(el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, el("tr", {}, ["Time", "State", "Rule", "Gateway", "Device", "Value", "Message"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, doc.history.map((h) => el("tr", { "data-alert": `${h.gw}/${h.device}/${h.rule}` }, el("td", {}, time(h.ts)), el("td", {}, badge(h.state)), el("td", {}, h.rule), el("td", {}, h.gw), el("td", {}, h.device), el("td", { class: "num" }, value(h.value)), el("td", {}, h.message)))))));
      if (caret) {
        const back = [...active.querySelectorAll("[data-draft]")].find((e) => e.dataset.draft === caret[0] && e.tagName === caret[1]);
        if (back) { back.focus({ preventScroll: true }); if (back.tagName === "INPUT") back.setSelectionRange(caret[2], caret[3]); }
      }
      drawn = text;
      body.dataset.ready = "1";
    }
    content.append(el("h2", {}, "Active"), active, el("h2", {}, "History"), history);
    show(await api(T("/alerts")));
    live((name, doc) => { if (name === "alerts") show(doc); });
  };

  pages.provisioning = async () => {
    const mayChange = account.role === "operator" || account.role === "tenant-admin";
    const keysEl = el("div", { id: "keys" }), devicesEl = el("div", { id: "devices" }), techEl = el("div", { id: "technicians" }), once = el("div", { id: "once" });
    async function act(call, done) { try { const r = await call(); say(done); await refresh(); return r; } catch (err) { say(err.message, true); return null; } }
    async function refresh() {
      const [keys, devices, techs] = await Promise.all([api(T("/keys")), api(T("/devices")), api(T("/technicians"))]);
      keysEl.replaceChildren(el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, el("tr", {}, ["Key", "State", "Uses", "Expires", "Created", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, keys.map((k) => el("tr", { "data-key": k.id }, el("td", {}, k.id), el("td", {}, badge(k.state)), el("td", {}, `${k.uses}${k.max_uses ? " of " + k.max_uses : ""}`), el("td", {}, k.expires_at || "never"), el("td", {}, k.created_at),
          el("td", {}, mayChange && k.state === "active" ? el("button", { type: "button", class: "danger", onclick: () => act(() => api(T(`/keys/${k.id}/revoke`), { method: "POST" }), `Key ${k.id} revoked.`) }, "Revoke") : "")))))));
      devicesEl.replaceChildren(el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, el("tr", {}, ["Gateway", "State", "Certificate until", "Key", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, devices.map((d) => el("tr", { "data-gateway": d.gateway }, el("td", {}, d.gateway), el("td", {}, badge(d.state)), el("td", {}, d.not_after || "—"), el("td", {}, d.key || "—"),
          el("td", {}, mayChange && d.state === "active" ? el("button", { type: "button", class: "danger", onclick: () => { if (confirm(`Revoke ${d.gateway}? It is disconnected now and can never connect again with its certificate.`)) act(() => api(T(`/gateways/${encodeURIComponent(d.gateway)}/revoke`), { method: "POST" }), `${d.gateway} revoked.`); } }, "Revoke") : "")))))));
      techEl.replaceChildren(el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, el("tr", {}, ["Technician", "State", "Until", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, techs.map((t) => el("tr", {}, el("td", {}, t.technician), el("td", {}, badge(t.state)), el("td", {}, t.not_after),
          el("td", {}, mayChange && t.state === "active" ? el("button", { type: "button", class: "danger", onclick: () => act(() => api(T(`/technicians/${encodeURIComponent(t.technician.replace(/^tech-/, ""))}/revoke`), { method: "POST" }), `${t.technician} revoked.`) }, "Revoke") : "")))))));
      body.dataset.ready = "1";
    }
    const uses = el("input", { id: "uses", type: "number", min: "1", value: "1" });
    const expires = el("input", { id: "expires", value: "7d", size: "6" });
    const keyForm = el("form", { class: "inline", onsubmit: async (e) => {
      e.preventDefault();
      const made = await act(() => api(T("/keys"), { json: { uses: uses.value ? Number(uses.value) : null, expires: expires.value || null } }), "Key created.");
      if (made) once.replaceChildren(el("div", { class: "once" }, el("strong", {}, "Copy this key now: it is shown only once."), el("code", { class: "secret", id: "new-key" }, made.key)));
    } }, el("label", { for: "uses" }, "Uses", uses), el("label", { for: "expires" }, "Expires after", expires), el("button", { type: "submit", class: "primary" }, "Create key"));
    const techName = el("input", { id: "tech-name", required: true, placeholder: "name" });
    const hours = el("input", { id: "tech-hours", type: "number", min: "1", max: "168", value: "8" });
    const techForm = el("form", { class: "inline", onsubmit: async (e) => {
      e.preventDefault();
      const made = await act(() => api(T("/technicians"), { json: { name: techName.value, hours: Number(hours.value) } }), "Certificate issued.");
      if (!made) return;
      const files = Object.entries(made.files).map(([name, text]) => el("li", {}, el("a", { href: URL.createObjectURL(new Blob([text], { type: "application/x-pem-file" })), download: name }, name)));
      once.replaceChildren(el("div", { class: "once" }, el("strong", {}, `Download these files now (the key is not kept). Valid until ${made.not_after}.`), el("ul", {}, files),
        el("p", {}, "Then, in the folder where they are:"), el("code", { class: "secret", id: "mosquitto-sub" }, made.command)));
    } }, el("label", { for: "tech-name" }, "Technician", techName), el("label", { for: "tech-hours" }, "Hours", hours), el("button", { type: "submit", class: "primary" }, "Issue certificate"));
    content.append(once, el("h2", {}, "Provisioning keys"), mayChange ? keyForm : "", keysEl, el("h2", {}, "Gateways"), devicesEl, el("h2", {}, "Technician certificates"), mayChange ? techForm : "", techEl);
    await refresh();
  };

  pages.audit = async () => {
    const rows = await api(tenant ? T("/audit") : "/api/audit");
    content.append(el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, el("tr", {}, ["Time", "Who", "Tenant", "Action", "Target", "Detail", "From"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {}, el("td", {}, time(r.ts)), el("td", {}, r.actor), el("td", {}, r.tenant || "—"), el("td", {}, r.action), el("td", {}, r.target || ""), el("td", {}, r.detail ? JSON.stringify(r.detail) : ""), el("td", {}, r.client || "")))))));
    body.dataset.ready = "1";
  };

  (async () => {
    try {
      if (page === "login") { await pages.login(); return; }
      if (page === "missing") return;
      const session = await nav();
      await pages[page](session);
    } catch (err) { say(err.message, true); }
  })();
})();

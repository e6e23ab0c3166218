/* anomalyd web dashboard: shared browser code (plain script, no build step). */
"use strict";
(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const TOKEN_KEY = "anomalyd-token";
  const WRITES_OFF = "writes are off: no token configured";
  const state = { writes: false, now: Date.now() / 1000 };
  const errors = new Map();

  // ---------- small helpers ----------
  function el(tag, attrs = {}, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids) if (kid != null) e.append(kid);
    return e;
  }
  const num = (v, d = 3) => (typeof v === "number" && isFinite(v) ? v.toFixed(d) : "–");
  const pad = (n) => String(n).padStart(2, "0");
  const parseTime = (iso) => { const d = iso ? new Date(iso) : null; return d && !isNaN(d) ? d : null; };
  function localTime(iso, short = false) {
    const d = parseTime(iso);
    if (!d) return iso || "–";
    const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return short ? hm : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${hm}:${pad(d.getSeconds())}`;
  }
  function setTime(node, iso, short = false) {
    const d = parseTime(iso);
    node.textContent = localTime(iso, short);
    node.title = d ? d.toISOString().replace("T", " ").replace("Z", " UTC") : "";
  }
  const timeSpan = (iso) => { const s = el("span"); setTime(s, iso); return s; };
  function duration(s) {
    if (typeof s !== "number" || !isFinite(s)) return "–";
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${pad(Math.floor(s % 60))} s`;
    return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
  }
  function fmtVal(v) {
    if (v == null || v === "") return "–";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Math.round(v * 1e4) / 1e4);
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function fillDl(dl, pairs) {
    dl.replaceChildren(...pairs.flatMap(([k, v]) => [
      el("dt", { text: k }), v instanceof Node ? el("dd", {}, v) : el("dd", { text: fmtVal(v) })]));
  }
  const badge = (text, kind) => el("span", { class: "badge", "data-kind": kind, text });
  const pathPart = () => decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || "");

  // ---------- errors, status line, fetch ----------
  function setError(key, msg) {
    if (msg) errors.set(key, msg); else errors.delete(key);
    const b = $("#banner");
    if (!b) return;
    b.textContent = [...errors.values()].join(" · ");
    b.hidden = errors.size === 0;
  }
  function status(msg, kind = "ok") {
    const s = $("#action-status");
    if (s) { s.textContent = msg; s.dataset.kind = kind; }
  }
  async function getJSON(url, key = url) {
    try {
      const r = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
      let body = null;
      try { body = await r.json(); } catch (_) { /* not JSON */ }
      if (!r.ok || !body) throw new Error((body && body.error) || `HTTP ${r.status}`);
      setError(key, null);
      return body;
    } catch (err) {
      setError(key, `could not load ${url}: ${err.message}`);
      return null;
    }
  }

  // ---------- token + writes ----------
  function getToken() { try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; } }
  function setToken(v) {
    try { if (v) sessionStorage.setItem(TOKEN_KEY, v); else sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* storage off */ }
    const ind = $("#token-state");
    if (ind) { ind.textContent = v ? "set" : "none"; ind.dataset.kind = v ? "ok" : "muted"; }
  }
  function initToken() {
    const form = $("#token-form"), input = $("#token-input");
    if (!form || !input) return;
    input.value = getToken();
    setToken(input.value);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const v = input.value.trim();
      setToken(v);
      status(v ? "token saved for this browser tab" : "token cleared");
    });
    $("#token-forget").addEventListener("click", () => { input.value = ""; setToken(""); status("token forgotten"); });
  }
  async function post(url, body) {
    const token = getToken();
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    let r, data = null;
    try {
      r = await fetch(url, { method: "POST", headers, body: JSON.stringify(body) });
      try { data = await r.json(); } catch (_) { /* not JSON */ }
    } catch (err) {
      status(`failed: ${err.message}`, "error");
      return null;
    }
    if (r.ok && data && data.ok !== false) return data;
    status(`refused: ${(data && data.error) || `HTTP ${r.status}`}`, "error");
    if (r.status === 401) { const i = $("#token-input"); if (i) i.focus(); }
    return null;
  }
  function gate(btn, reason = "") {
    const why = state.writes ? reason : WRITES_OFF;
    btn.disabled = !!why;
    btn.title = why;
    return why;
  }
  const isMuted = (s) => { const d = s && parseTime(s.muted_until); return !!d && d.getTime() / 1000 > state.now; };
  async function mute(name, seconds, after) {
    const r = await post(`/api/streams/${encodeURIComponent(name)}/mute`, { seconds });
    if (!r) return;
    status(r.muted_until ? `${name} muted until ${localTime(r.muted_until)}` : `${name} unmuted`);
    if (after) after(r);
  }
  function streamState(s) {
    if (s.event_open) return ["anomaly", "ANOMALY", "bad"];
    if (s.source !== "ok") return ["fault", String(s.source || "unknown").toUpperCase(), "warn"];
    if (isMuted(s)) return ["muted", "MUTED", "muted"];
    return ["ok", "OK", "ok"];
  }

  // ---------- header + live feed ----------
  function setKind(sel, text, kind, title = "") {
    const n = $(sel);
    if (n) { n.textContent = text; n.dataset.kind = kind; n.title = title; }
  }
  function renderHeader(o) {
    state.writes = !!o.writes;
    const t = parseTime(o.now);
    state.now = t ? t.getTime() / 1000 : Date.now() / 1000;
    setKind("#node-name", o.node || "–", "");
    setKind("#node-version", o.version ? `v${o.version}` : "", "");
    const h = o.health || {};
    const ok = h.status === "ok";
    setKind("#node-health", ok ? "ok" : ["stalled", (h.stalled || []).join(", ")].filter(Boolean).join(": "), ok ? "ok" : "bad");
    const mq = o.mqtt;
    setKind("#node-mqtt", mq == null ? "off" : mq, mq == null ? "muted" : mq === "connected" ? "ok" : mq === "connecting" ? "warn" : "bad");
    const st = o.storage || {};
    setKind("#node-storage", st.state || "–", st.state === "ok" ? "ok" : "warn", st.detail || "");
  }
  function startLive(onMsg) {
    let es, fresh = true, retry = null;
    const ind = (t, k) => setKind("#live-status", t, k);
    const connect = () => {
      es = new EventSource("/api/live");
      es.onopen = () => { fresh = true; ind("live", "ok"); };
      es.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch (_) { return; }
        ind("live", "ok");
        try { renderHeader(msg); onMsg(msg, fresh); setError("render", null); } catch (err) { setError("render", `display error: ${err.message}`); }
        fresh = false;
      };
      es.onerror = () => {
        ind("reconnecting…", "warn");
        if (es.readyState === EventSource.CLOSED && !retry) retry = setTimeout(() => { retry = null; connect(); }, 3000);
      };
    };
    connect();
  }

  // ---------- events table ----------
  function eventRow(e) {
    const started = el("td");
    setTime(started, e.started_at);
    const marked = el("td", { class: "center", text: e.marked_normal_at ? "✓" : "" });
    if (e.marked_normal_at) marked.title = `marked ${localTime(e.marked_normal_at)}${e.mark_note ? ` — ${e.mark_note}` : ""}`;
    return el("tr", { class: "event-row", "data-event-id": e.event_id, "data-state": e.state }, started,
      el("td", {}, el("a", { href: `/streams/${encodeURIComponent(e.stream)}`, text: e.stream })),
      el("td", {}, badge(e.state, e.state === "open" ? "bad" : "muted")),
      el("td", { class: "num", text: e.state === "open" ? "open" : duration(e.duration_seconds) }),
      el("td", { class: "num", text: num(e.peak_score) }),
      el("td", { class: "num", text: num(e.threshold) }),
      el("td", { text: e.end_reason || "–" }),
      marked,
      el("td", {}, el("a", { href: `/events/${encodeURIComponent(e.event_id)}`, text: "view" })));
  }
  function fillEvents(tbody, events) {
    tbody.replaceChildren(...(events.length ? events.map(eventRow)
      : [el("tr", { class: "empty" }, el("td", { colspan: 9, text: "no events match" }))]));
  }

  // ---------- charts ----------
  let colors = null;
  const STEPS = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
  function drawChart(canvas, o) {
    if (!colors) {
      const cs = getComputedStyle(document.documentElement);
      colors = Object.fromEntries(["line", "bad", "warn", "muted", "grid", "span", "text"].map((n) => [n, cs.getPropertyValue(`--${n}`).trim() || "#888"]));
    }
    const pts = (o.points || []).filter((p) => typeof p[1] === "number" && isFinite(p[1]) && p[0] >= o.x0 && p[0] <= o.x1);
    canvas.dataset.points = String(pts.length);
    const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const thr = typeof o.thr === "number" && isFinite(o.thr) ? o.thr : null;
    let yMax = thr != null && thr > 0 ? thr * 1.5 : 1, yMin = 0;
    for (const p of pts) { if (p[1] > yMax) yMax = p[1] * 1.08; if (p[1] < yMin) yMin = p[1]; }
    const L = 38, R = 6, T = 6, B = 16, span = o.x1 - o.x0 || 1;
    const X = (x) => L + ((x - o.x0) / span) * (w - L - R);
    const Y = (y) => T + (1 - (y - yMin) / (yMax - yMin || 1)) * (h - T - B);
    if (o.span) { ctx.fillStyle = colors.span; ctx.fillRect(X(o.span[0]), T, Math.max(1, X(o.span[1]) - X(o.span[0])), h - T - B); }
    ctx.font = "10px sans-serif"; ctx.lineWidth = 1;
    ctx.strokeStyle = colors.grid; ctx.fillStyle = colors.muted;
    const step = STEPS.find((s) => s >= span / Math.max(2, (w - L) / 70)) || 86400;
    const origin = o.origin || 0;
    ctx.textAlign = "center";
    for (let x = origin + Math.ceil((o.x0 - origin) / step) * step; x <= o.x1 + 1e-9; x += step) {
      ctx.beginPath(); ctx.moveTo(X(x), T); ctx.lineTo(X(x), h - B); ctx.stroke();
      ctx.fillText(o.fmtX(x), Math.min(Math.max(X(x), L + 12), w - 14), h - 4);
    }
    ctx.textAlign = "right";
    ctx.fillText(num(yMax, yMax >= 100 ? 0 : 1), L - 4, T + 8);
    ctx.fillText(num(yMin, yMin === 0 ? 0 : 1), L - 4, h - B);
    if (thr != null) {
      ctx.setLineDash([5, 4]); ctx.strokeStyle = colors.warn;
      ctx.beginPath(); ctx.moveTo(L, Y(thr)); ctx.lineTo(w - R, Y(thr)); ctx.stroke(); ctx.setLineDash([]);
      ctx.fillStyle = colors.warn; ctx.fillText(num(thr, 2), L - 4, Y(thr) + 3);
    }
    const gap = pts.length > 1 ? Math.max(2, (4 * (pts[pts.length - 1][0] - pts[0][0])) / (pts.length - 1)) : Infinity;
    const path = () => {
      ctx.beginPath();
      pts.forEach((p, i) => {
        if (i === 0 || p[0] - pts[i - 1][0] > gap) ctx.moveTo(X(p[0]), Y(p[1])); else ctx.lineTo(X(p[0]), Y(p[1]));
      });
    };
    ctx.lineWidth = 1.5; ctx.lineJoin = "round"; ctx.strokeStyle = colors.line; path(); ctx.stroke();
    if (thr != null) {
      ctx.save(); ctx.beginPath(); ctx.rect(0, 0, w, Y(thr)); ctx.clip();
      ctx.strokeStyle = colors.bad; path(); ctx.stroke(); ctx.restore();
      ctx.fillStyle = colors.bad;
      for (const p of pts) if (p[1] > thr) ctx.fillRect(X(p[0]) - 1.5, Y(p[1]) - 1.5, 3, 3);
    }
    if (o.playhead != null) {
      ctx.strokeStyle = colors.text; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(X(o.playhead), T); ctx.lineTo(X(o.playhead), h - B); ctx.stroke();
    }
  }
  const fmtAgo = (d) => (d < 60 ? `${Math.round(d)}s` : d % 60 === 0 ? `${d / 60}m` : `${(d / 60).toFixed(1)}m`);

  // ---------- dashboard ----------
  const MUTE_CHOICES = [[900, "15 min"], [3600, "1 h"], [28800, "8 h"], [86400, "24 h"]];
  function muteSelect(label, id) {
    return el("select", { class: "mute-duration", id, "aria-label": label },
      ...MUTE_CHOICES.map(([v, t]) => el("option", { value: v, selected: v === 3600, text: t })));
  }
  function dashboard() {
    const grid = $("#tiles"), tiles = new Map(), hist = new Map();
    let histSec = 600, version, evSeq = 0;
    const refresh = async () => { const o = await getJSON("/api/overview", "overview"); if (o) { renderHeader(o); render(o, true); } };

    async function loadEvents() {
      const q = new URLSearchParams();
      for (const k of ["stream", "since", "state", "marked"]) { const v = $(`#filter-${k}`).value; if (v) q.set(k, v); }
      $("#export-csv").href = `/api/events.csv${q.toString() ? `?${q}` : ""}`;
      q.set("limit", "200");
      const my = ++evSeq;
      const d = await getJSON(`/api/events?${q}`, "events");
      if (!d || my !== evSeq) return;
      const list = d.events || [];
      fillEvents($("#events tbody"), list);
      $("#events-count").textContent = `${list.length} of ${d.total ?? list.length}`;
    }
    for (const k of ["stream", "since", "state", "marked"]) $(`#filter-${k}`).addEventListener("change", loadEvents);

    function makeTile(name) {
      const sel = muteSelect(`mute ${name} for`);
      const btn = el("button", { class: "mute-button", type: "button", text: "Mute" });
      const t = el("article", { class: "tile", "data-stream": name, "data-state": "ok", "data-over": "false" },
        el("header", { class: "tile-head" },
          el("a", { class: "tile-name", href: `/streams/${encodeURIComponent(name)}`, text: name }),
          el("span", { class: "tile-area" }), el("a", { class: "tile-event", hidden: true, text: "event" }),
          el("span", { class: "badge tile-badge" })),
        el("div", { class: "tile-nums" },
          el("span", { class: "tile-score", title: "latest window score", text: "–" }),
          el("span", { class: "tile-thr" }, "threshold ", el("span", { class: "tile-threshold" }))),
        el("canvas", { class: "tile-chart", "data-points": "0", role: "img", "aria-label": `score history of ${name}` }),
        el("div", { class: "tile-meta" }, el("span", { class: "tile-health" }), el("span", { class: "tile-lag" })),
        el("div", { class: "tile-meta" }, el("span", { class: "tile-model" }), el("span", { class: "tile-muted" })),
        el("div", { class: "tile-actions" }, sel, btn));
      btn.addEventListener("click", () => {
        const s = t.stream;
        mute(name, isMuted(s) ? 0 : Number(sel.value), refresh);
      });
      return t;
    }
    function updateTile(t, s) {
      const q = (c) => t.querySelector(`.${c}`);
      const [st, label, kind] = streamState(s), muted = isMuted(s);
      t.dataset.state = st;
      t.dataset.over = String(typeof s.score === "number" && typeof s.threshold === "number" && s.score > s.threshold);
      q("tile-score").textContent = num(s.score);
      q("tile-threshold").textContent = num(s.threshold);
      q("tile-area").textContent = s.area || "";
      Object.assign(q("tile-badge"), { textContent: label }).dataset.kind = kind;
      const ev = q("tile-event");
      ev.hidden = !(s.event_open && s.event_id);
      if (ev.hidden) ev.removeAttribute("href"); else ev.href = `/events/${encodeURIComponent(s.event_id)}`;
      q("tile-health").textContent = `source ${s.source}${s.source_detail ? ` · ${s.source_detail}` : ""}`;
      q("tile-health").dataset.kind = s.source === "ok" ? "" : "warn";
      const lag = q("tile-lag");
      lag.textContent = `lag ${s.lag_seconds == null ? "–" : `${num(s.lag_seconds, 1)} s`}`;
      lag.dataset.kind = s.lagging ? "warn" : "";
      q("tile-model").textContent = s.model_id || "–";
      q("tile-model").title = `model ${s.model_id || "–"} · k ${num(s.k, 1)} · ${s.windows_scored ?? "–"} windows scored · ${s.events_total ?? "–"} events`;
      const m = q("tile-muted");
      m.textContent = muted ? `muted until ${localTime(s.muted_until, true)}` : "";
      m.title = muted ? localTime(s.muted_until) : "";
      const btn = q("mute-button");
      btn.textContent = muted ? "Unmute" : "Mute";
      q("mute-duration").disabled = !!gate(btn) || muted;
    }
    function drawTile(t) {
      const now = state.now, h = hist.get(t.dataset.stream) || [];
      const x1 = Math.max(now, h.length ? h[h.length - 1][0] : now);
      // At least a minute, growing with what is known up to the history kept: a fresh start is readable.
      const shown = Math.min(histSec, Math.max(60, h.length ? x1 - h[0][0] : 60));
      drawChart(t.querySelector(".tile-chart"), {
        points: h, x0: x1 - shown, x1, thr: t.stream && t.stream.threshold, origin: x1,
        fmtX: (x) => (x1 - x < 0.5 ? "now" : `-${fmtAgo(Math.round(x1 - x))}`),
      });
    }
    function merge(name, pts, fresh) {
      let h = fresh || !hist.has(name) ? [] : hist.get(name);
      let last = h.length ? h[h.length - 1][0] : -Infinity;
      for (const p of pts || []) if (Array.isArray(p) && p[0] > last) { h.push(p); last = p[0]; }
      const cut = Math.max(state.now, last) - histSec;
      let i = 0;
      while (i < h.length && h[i][0] < cut) i++;
      if (i) h = h.slice(i);
      hist.set(name, h);
    }
    function syncFilter(names) {
      const sel = $("#filter-stream");
      const have = [...sel.options].slice(1).map((o) => o.value);
      if (have.join("\n") === names.join("\n")) return;
      const cur = sel.value;
      sel.replaceChildren(el("option", { value: "", text: "All streams" }), ...names.map((n) => el("option", { value: n, text: n })));
      sel.value = names.includes(cur) ? cur : "";
    }
    function render(o, fresh) {
      histSec = o.history_seconds || 600;
      const streams = o.streams || [], names = streams.map((s) => s.name);
      for (const [n, t] of tiles) if (!names.includes(n)) { t.remove(); tiles.delete(n); hist.delete(n); }
      streams.forEach((s, i) => {
        let t = tiles.get(s.name);
        if (!t) { t = makeTile(s.name); tiles.set(s.name, t); }
        if (grid.children[i] !== t) grid.insertBefore(t, grid.children[i] || null);
        t.stream = s;
        merge(s.name, s.scores, fresh);
        updateTile(t, s);
        drawTile(t);
      });
      $("#tiles-empty").hidden = streams.length > 0;
      syncFilter(names);
      if (o.events_version !== version) { version = o.events_version; loadEvents(); }
    }
    let pending = false;
    window.addEventListener("resize", () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => { pending = false; tiles.forEach(drawTile); });
    });
    refresh().then(() => startLive(render));
  }

  // ---------- stream page ----------
  async function streamPage() {
    const name = pathPart();
    $("#st-title").textContent = name;
    document.title = `${name} · anomalyd`;
    let cur = null, version;
    const btn = $("#st-mute-button"), sel = $("#st-mute-duration");
    function facts(s) {
      const [, label, kind] = streamState(s), muted = isMuted(s);
      const evLink = s.event_open && s.event_id ? el("a", { href: `/events/${encodeURIComponent(s.event_id)}`, text: "open event" }) : "none";
      fillDl($("#st-live"), [
        ["state", badge(label, kind)],
        ["source", `${s.source}${s.source_detail ? ` · ${s.source_detail}` : ""}`],
        ["score / threshold", `${num(s.score)} / ${num(s.threshold)}`],
        ["k", s.k], ["lag", s.lag_seconds == null ? "–" : `${num(s.lag_seconds, 1)} s${s.lagging ? " (lagging)" : ""}`],
        ["muted", muted ? timeSpan(s.muted_until) : "no"], ["open event", evLink],
        ["model", s.model_id], ["windows scored", s.windows_scored], ["events total", s.events_total],
      ]);
      btn.textContent = muted ? "Unmute" : "Mute";
      sel.disabled = !!gate(btn) || muted;
    }
    function details(d) {
      const det = d.detector || {}, b = d.bundle || {};
      fillDl($("#st-detector"), [
        ["alarm rule", `${det.n ?? "–"} of ${det.m ?? "–"} windows over threshold`],
        ["hold-off", `${fmtVal(det.hold_off_windows)} windows`], ["cooldown", `${fmtVal(det.cooldown_seconds)} s`],
        ["k override", det.k ?? "none (from bundle)"], ["threshold override", det.threshold ?? "none (from bundle)"],
        ["default mute", `${fmtVal(d.mute_minutes)} min`],
      ]);
      const tr = b.training || {}, f = b.features || {}, w = b.window || {}, th = b.threshold || {};
      fillDl($("#st-bundle"), [
        ["name", b.name], ["model id", b.model_id], ["path", b.path], ["created", timeSpan(b.created_at)],
        ["training files", `${fmtVal(tr.files)} (${fmtVal(tr.train_files)} train / ${fmtVal(tr.val_files)} val)`],
        ["training audio", duration(tr.seconds)], ["epochs run", tr.epochs_run], ["data fingerprint", tr.fingerprint],
        ["features", `${fmtVal(f.sample_rate)} Hz · n_fft ${fmtVal(f.n_fft)} · hop ${fmtVal(f.hop_length)} · ${fmtVal(f.n_mels)} mels · fmax ${fmtVal(f.fmax)} Hz`],
        ["window", `${fmtVal(w.n_frames)} frames · ${fmtVal(w.seconds)} s · hop ${fmtVal(w.hop_seconds)} s · score ${fmtVal(w.score)}`],
        ["threshold", `${fmtVal(th.window_value)} = ${fmtVal(th.window_mean)} + ${fmtVal(th.k)} × ${fmtVal(th.window_std)} (${fmtVal(th.n_windows)} windows)`],
        ...Object.entries(b.versions || {}).map(([k, v]) => [`version ${k}`, v]),
      ]);
      const c = b.calibration, cal = $("#st-calibration");
      if (!c) cal.replaceChildren(el("p", { class: "muted", text: "not calibrated (k = 3 default)" }));
      else {
        const dl = el("dl", { class: "kv" });
        fillDl(dl, [["k", c.k], ["target false alarms / day", c.false_alarms_per_day], ["calibrated", timeSpan(c.calibrated_at)],
          ["normal audio", duration(c.normal_seconds)], ["events in normal audio", c.events],
          ["events / day", c.events_per_day], ["events / day (upper 95 %)", c.events_per_day_upper95]]);
        cal.replaceChildren(dl);
      }
      fillDl($("#st-source"), Object.entries(d.source_config || {}));
    }
    async function loadEvents() {
      const d = await getJSON(`/api/events?stream=${encodeURIComponent(name)}&limit=20`, "events");
      if (!d) return;
      fillEvents($("#st-events tbody"), d.events || []);
      $("#st-events-count").textContent = `${(d.events || []).length} of ${d.total ?? "?"}`;
    }
    async function load() {
      const d = await getJSON(`/api/streams/${encodeURIComponent(name)}`, "stream");
      if (!d) return;
      cur = d;
      facts(d);
      details(d);
    }
    btn.addEventListener("click", () => { if (cur) mute(name, isMuted(cur) ? 0 : Number(sel.value), load); });
    const o = await getJSON("/api/overview", "overview");
    if (o) renderHeader(o);
    await load();
    loadEvents();
    startLive((msg) => {
      const s = (msg.streams || []).find((x) => x.name === name);
      if (s && cur) { cur = { ...cur, ...s }; facts(cur); }
      if (version !== undefined && msg.events_version !== version) loadEvents();
      version = msg.events_version;
    });
  }

  // ---------- event page ----------
  async function eventPage() {
    const id = pathPart();
    const audio = $("#ev-audio"), img = $("#ev-spectrogram"), head = $("#ev-playhead"), canvas = $("#ev-scores");
    const markBtn = $("#mark-button"), markNote = $("#mark-note"), muteBtn = $("#ev-mute-button");
    let ev = null, strm = null, version, busy = false;
    function chart() {
      if (!ev) return;
      const base = ev.clip ? ev.clip.event_offset_seconds || 0 : 0;
      const pts = (ev.scores || []).filter((p) => Array.isArray(p)).map(([o, s]) => [o + base, s]);
      const first = pts.length ? pts[0][0] : base, last = pts.length ? pts[pts.length - 1][0] : base;
      const end = typeof ev.duration_seconds === "number" ? base + ev.duration_seconds : last;
      const x0 = Math.min(first, ev.clip ? 0 : base), x1 = Math.max(last, end, ev.clip ? ev.clip.seconds || 0 : base + 1);
      drawChart(canvas, {
        points: pts, x0, x1, thr: ev.threshold, span: [base, Math.max(end, base)],
        playhead: ev.clip && audio.currentTime > 0 ? audio.currentTime : null, fmtX: (x) => `${Math.round(x * 10) / 10} s`,
      });
      $("#ev-chart-caption").textContent = ev.clip
        ? "seconds from clip start · shaded: the event · dashed: threshold"
        : "seconds from event start · shaded: the event · dashed: threshold";
    }
    function playhead() {
      const d = audio.duration || (ev && ev.clip && ev.clip.seconds);
      const f = d && isFinite(d) ? Math.min(1, audio.currentTime / d) : 0;
      head.style.left = `${f * 100}%`;
      head.hidden = !(audio.currentTime > 0);
      chart();
    }
    function buttons() {
      if (ev) {
        const reason = ev.state === "open" ? "the event is still open: it can be marked once it has closed"
          : ev.marked_normal_at ? "already marked as a false alarm" : "";
        const why = busy ? "working…" : gate(markBtn, reason);
        markBtn.disabled = busy || !!why;
        markNote.disabled = markBtn.disabled;
        $("#mark-why").textContent = why;
      }
      const muted = isMuted(strm);
      muteBtn.textContent = muted ? "Unmute stream" : "Mute stream for 1 h";
      gate(muteBtn, strm ? "" : "stream state unknown");
    }
    function render() {
      const e = ev;
      $("#event-title").textContent = `${e.state === "open" ? "Open anomaly" : "Anomaly"} on ${e.stream}`;
      document.title = `${e.stream} event · anomalyd`;
      $("#ev-id").textContent = e.event_id;
      const sLink = $("#ev-stream");
      sLink.textContent = e.stream;
      sLink.href = `/streams/${encodeURIComponent(e.stream)}`;
      $("#ev-state").replaceChildren(badge(e.state, e.state === "open" ? "bad" : "muted"));
      setTime($("#ev-start"), e.started_at);
      if (e.ended_at) setTime($("#ev-end"), e.ended_at); else Object.assign($("#ev-end"), { textContent: "still open", title: "" });
      $("#ev-duration").textContent = e.duration_seconds == null ? "open" : duration(e.duration_seconds);
      $("#ev-peak").textContent = num(e.peak_score);
      $("#ev-mean").textContent = num(e.mean_score);
      $("#ev-threshold").textContent = num(e.threshold);
      $("#ev-baseline").textContent = `mean ${num(e.mean)} · std ${num(e.std)} · k ${num(e.k, 1)}`;
      $("#ev-reason").textContent = e.end_reason || "–";
      $("#ev-windows").textContent = `${fmtVal(e.windows_over)} of ${fmtVal(e.windows)}`;
      $("#ev-model").textContent = e.model_id || "–";
      const mk = $("#ev-marked");
      if (e.marked_normal_at) {
        setTime(mk, e.marked_normal_at);
        mk.textContent = `yes, at ${mk.textContent}${e.mark_note ? ` — ${e.mark_note}` : ""}`;
      } else Object.assign(mk, { textContent: "no", title: "" });
      const spec = e.spectrogram_url;
      img.hidden = !spec;
      $("#ev-spec-wrap").hidden = !spec;
      $("#ev-spec-note").hidden = !!spec;
      if (spec && img.getAttribute("src") !== spec) { img.src = spec; img.alt = `log-mel spectrogram of the clip of this ${e.stream} event; the event span is marked`; }
      const url = e.clip && e.clip.url;
      audio.hidden = !url;
      $("#ev-audio-note").hidden = !!url;
      if (url && audio.getAttribute("src") !== url) audio.src = url;
      buttons();
      chart();
    }
    async function load() {
      const d = await getJSON(`/api/events/${encodeURIComponent(id)}`, "event");
      if (!d) { if (!ev) $("#event-title").textContent = "Event not found"; return; }
      ev = d;
      render();
      if (!strm) loadStream();
    }
    async function loadStream() {
      const s = await getJSON(`/api/streams/${encodeURIComponent(ev.stream)}`, "stream");
      if (s) { strm = s; buttons(); }
    }
    let raf = 0;
    audio.addEventListener("play", () => {
      cancelAnimationFrame(raf);
      const step = () => { playhead(); if (!audio.paused && !audio.ended) raf = requestAnimationFrame(step); };
      step();
    });
    for (const t of ["timeupdate", "seeked", "ended", "loadedmetadata"]) audio.addEventListener(t, playhead);
    img.addEventListener("click", (e) => {
      const r = img.getBoundingClientRect(), d = audio.duration;
      if (d && isFinite(d) && r.width) audio.currentTime = ((e.clientX - r.left) / r.width) * d;
    });
    window.addEventListener("resize", () => requestAnimationFrame(chart));
    markBtn.addEventListener("click", async () => {
      busy = true; buttons();
      const r = await post(`/api/events/${encodeURIComponent(id)}/mark`, { note: markNote.value.trim() });
      busy = false;
      if (r) {
        status(r.already ? "this event was already marked as a false alarm"
          : `marked as a false alarm; its clip joins ${r.stream || "the stream"}'s normal audio for retraining`);
        markNote.value = "";
        await load();
      }
      buttons();
    });
    muteBtn.addEventListener("click", () => {
      if (strm) mute(strm.name || ev.stream, isMuted(strm) ? 0 : 3600, () => loadStream());
    });
    const o = await getJSON("/api/overview", "overview");
    if (o) renderHeader(o);
    await load();
    setInterval(() => { if (ev && ev.state === "open") load(); }, 5000);
    startLive((msg) => {
      const s = ev && (msg.streams || []).find((x) => x.name === ev.stream);
      if (s && strm) strm = { ...strm, ...s };
      buttons();
      if (version !== undefined && msg.events_version !== version) load();
      version = msg.events_version;
    });
  }

  // ---------- boot ----------
  // The header bar every page shares: built here so that the pages hold only their own content.
  function buildTopbar() {
    const hb = (label, id) => el("span", { class: "hb" }, el("span", { class: "lbl", text: label }), " ", el("b", { id, text: "–" }));
    const node = hb("node", "node-name");
    node.append(" ", el("span", { id: "node-version", class: "muted" }));
    $("#topbar").replaceChildren(
      el("a", { class: "brand", href: "/", text: "anomalyd" }), node,
      hb("health", "node-health"), hb("MQTT", "node-mqtt"), hb("event log", "node-storage"),
      el("span", { id: "live-status", class: "live", "data-kind": "muted", role: "status", text: "connecting…" }),
      el("form", { id: "token-form", class: "token" },
        el("label", { for: "token-input" }, "token ", el("span", { id: "token-state", class: "muted" })),
        el("input", { type: "password", id: "token-input", autocomplete: "off", spellcheck: "false", placeholder: "API token" }),
        el("button", { type: "submit", text: "Save" }),
        el("button", { type: "button", id: "token-forget", text: "Forget" })));
  }
  // The events tables' column heads (the dashboard's and a stream page's), matching eventRow's cells.
  function buildEventHeads() {
    const cols = [["Started"], ["Stream"], ["State"], ["Duration", "num"], ["Peak", "num"], ["Threshold", "num"],
      ["Reason"], ["False alarm", "center"]];
    for (const table of document.querySelectorAll("table.events-table")) {
      const row = el("tr", {}, ...cols.map(([text, cls]) => el("th", { scope: "col", class: cls, text })),
        el("th", { scope: "col" }, el("span", { class: "visually-hidden", text: "Link" })));
      table.prepend(el("thead", {}, row));
    }
  }
  function boot() {
    buildTopbar();
    buildEventHeads();
    initToken();
    const pages = { dashboard, stream: streamPage, event: eventPage };
    const fn = pages[document.body.dataset.page];
    if (fn) Promise.resolve().then(fn).catch((err) => setError("page", `page error: ${err.message}`));
  }
  window.addEventListener("unhandledrejection", (e) => { e.preventDefault(); setError("page", `error: ${e.reason && e.reason.message}`); });
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot); else boot();
})();

// Shared helpers for the Lipari dashboard pages (no framework; chart.js from /vendor).
"use strict";
const L = {
  $(sel, root) { return (root || document).querySelector(sel); },
  esc(s) { return String(s == null ? "" : s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c])); },
  num(v, d) { return v == null || isNaN(v) ? "–" : Number(v).toLocaleString("en-US", {minimumFractionDigits: d || 0, maximumFractionDigits: d || 0}); },
  watts(w) { if (w == null) return "–"; return Math.abs(w) >= 10000 ? L.num(w / 1000, 2) + " kW" : L.num(w, 0) + " W"; },
  kwh(wh) { return wh == null ? "–" : L.num(wh / 1000, 2) + " kWh"; },
  utc(t) { if (t == null) return "–"; return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC"; },
  ago(t) {
    if (t == null) return "never";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  },
  async get(url) {
    const r = await fetch(url, {cache: "no-store"});
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); }
    const body = await r.json().catch(() => ({error: "bad response"}));
    if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
    return body;
  },
  // Who is logged in ({name, role, meters, csrf}); fetched once per page.
  me() { return L._me || (L._me = L.get("/api/v1/me")); },
  // A state-changing request on the session: JSON body and the session's CSRF token.
  async post(url, obj) {
    const me = await L.me();
    return fetch(url, {method: "POST", body: JSON.stringify(obj),
      headers: {"Content-Type": "application/json", "X-CSRF-Token": me.csrf || ""}});
  },
  // The signed-in user and a log-out button in the page header.
  async user() {
    const me = await L.me(), hdr = document.querySelector("header"), live = L.$("#live-state");
    const el = document.createElement("span");
    el.id = "who"; el.className = "sub";
    el.innerHTML = `<b>${L.esc(me.name)}</b> (${L.esc(me.role)}) <button id="logout" class="link">log out</button>`;
    hdr.insertBefore(el, live);
    el.querySelector("#logout").addEventListener("click", async () => {
      await fetch("/logout", {method: "POST", headers: {"X-CSRF-Token": me.csrf || ""}});
      location.href = "/login";
    });
    return me;
  },
  // Server-sent events with a visible connection state; EventSource reconnects by itself.
  stream(url, handlers) {
    const st = L.$("#live-state");
    const es = new EventSource(url);
    es.onopen = () => { if (st) { st.textContent = "live"; st.className = "live ok"; } };
    es.onerror = () => { if (st) { st.textContent = "reconnecting…"; st.className = "live bad"; } };
    for (const [ev, fn] of Object.entries(handlers)) {
      es.addEventListener(ev, e => { window.__lipariUpdates = (window.__lipariUpdates || 0) + 1; fn(JSON.parse(e.data)); });
    }
    return es;
  },
  // Bar chart of energy per bucket; returns an object with .update(data).
  energyChart(canvas, note) {
    if (!window.Chart) {
      if (note) note.innerHTML = '<span class="notice">chart library missing: run <code>npm ci</code> (make setup does it)</span>';
      return {update() {}};
    }
    const chart = new Chart(canvas, {
      type: "bar",
      data: {labels: [], datasets: [
        {label: "import kWh", data: [], backgroundColor: "#1f5fbf"},
        {label: "export kWh", data: [], backgroundColor: "#f59e0b"}]},
      options: {animation: false, maintainAspectRatio: false, responsive: true,
        scales: {x: {ticks: {maxTicksLimit: 12, autoSkip: true}}, y: {beginAtZero: true, title: {display: true, text: "kWh"}}},
        plugins: {legend: {position: "bottom"}}},
    });
    return {
      chart,
      update(d) {
        const lab = d.bucket_s >= 86400 ? (t => new Date(t * 1000).toISOString().slice(5, 10))
                                        : (t => new Date(t * 1000).toISOString().slice(5, 16).replace("T", " "));
        chart.data.labels = d.buckets.map(b => lab(b.t));
        chart.data.datasets[0].data = d.buckets.map(b => b.import_wh / 1000);
        chart.data.datasets[1].data = d.buckets.map(b => b.export_wh / 1000);
        chart.data.datasets[1].hidden = !d.buckets.some(b => b.export_wh > 0);
        chart.update();
      },
    };
  },
  // Line chart of the live active power per phase, fed by SSE (the last `keep` readings).
  powerChart(canvas, keep) {
    if (!window.Chart) return {push() {}};
    const colors = ["#1f5fbf", "#d97706", "#15803d"];
    const chart = new Chart(canvas, {
      type: "line",
      data: {labels: [], datasets: []},
      options: {animation: false, maintainAspectRatio: false, responsive: true,
        elements: {point: {radius: 0}, line: {borderWidth: 2, tension: 0.2}},
        scales: {x: {ticks: {maxTicksLimit: 8}}, y: {title: {display: true, text: "W"}}},
        plugins: {legend: {position: "right"}}},
    });
    let lastT = null;
    return {
      chart,
      push(rt) {
        if (!rt || rt.t === lastT || rt.p_mw == null) return;
        lastT = rt.t;
        const p = Array.isArray(rt.p_mw) ? rt.p_mw : [rt.p_mw];
        while (chart.data.datasets.length < p.length) {
          const i = chart.data.datasets.length;
          chart.data.datasets.push({label: "L" + (i + 1), data: [], borderColor: colors[i % 3], backgroundColor: colors[i % 3]});
        }
        chart.data.labels.push(new Date(rt.t * 1000).toISOString().slice(11, 19));
        p.forEach((v, i) => chart.data.datasets[i].data.push(v / 1000));
        if (chart.data.labels.length > keep) {
          chart.data.labels.shift();
          chart.data.datasets.forEach(d => d.data.shift());
        }
        chart.update();
      },
    };
  },
  periodButtons(root, onChange) {
    root.querySelectorAll("button").forEach(b => b.addEventListener("click", () => {
      root.querySelectorAll("button").forEach(x => x.classList.toggle("on", x === b));
      onChange(b.dataset.period);
    }));
  },
};

"use strict";
(function () {
  let period = "day", newest = null;
  const chart = L.energyChart(L.$("#energy-chart"), L.$("#chart-note"));
  const prevPower = {};

  async function loadChart() {
    try {
      const d = await L.get("/api/v1/fleet/energy?period=" + period);
      chart.update(d);
      L.$("#chart-note").textContent = "to " + L.utc(d.t1) + " · import " + L.kwh(d.buckets.reduce((a, b) => a + b.import_wh, 0));
    } catch (e) { L.$("#chart-note").textContent = "energy: " + e.message; }
  }

  function render(f) {
    L.$("#k-meters").textContent = f.count;
    L.$("#k-online").textContent = f.online + " / " + f.count;
    L.$("#k-power").textContent = L.watts(f.p_w);
    L.$("#k-newest").textContent = f.newest_interval_t ? L.utc(f.newest_interval_t) : "–";
    const tb = L.$("#fleet-table tbody");
    if (!f.meters.length) {
      tb.innerHTML = '<tr><td colspan="8" class="muted">no meters yet: start one with <code>lipari meter --broker HOST:PORT</code> or run <code>make run</code></td></tr>';
    } else {
      tb.innerHTML = f.meters.map(m => `<tr data-meter="${L.esc(m.id)}">
        <td><a href="/meter/${encodeURIComponent(m.id)}">${L.esc(m.id)}</a></td>
        <td class="state"><span class="dot ${m.online ? "on" : "off"}"></span>${m.online ? "online" : "offline"}</td>
        <td><span class="badge">${L.esc(m.transport || "–")}</span></td>
        <td>${L.esc(m.fw || "–")}</td><td class="muted">${L.esc(m.board || "–")}</td>
        <td class="seen" title="${L.utc(m.last_seen)}">${L.ago(m.last_seen)}</td>
        <td class="num p_w">${m.online ? L.watts(m.p_w) : "–"}</td>
        <td class="num">${L.kwh(m.ai_wh)}</td></tr>`).join("");
      for (const m of f.meters) {
        if (prevPower[m.id] !== undefined && prevPower[m.id] !== m.p_w) {
          const tr = tb.querySelector(`tr[data-meter="${CSS.escape(m.id)}"]`);
          if (tr) tr.classList.add("flash");
        }
        prevPower[m.id] = m.p_w;
      }
    }
    if (f.newest_interval_t !== newest) { newest = f.newest_interval_t; loadChart(); }
  }

  L.periodButtons(L.$("#period"), p => { period = p; loadChart(); });
  L.user().catch(() => {});
  L.stream("/api/v1/stream", {fleet: render});
})();

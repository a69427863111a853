"use strict";
(function () {
  const id = decodeURIComponent(location.pathname.split("/").pop());
  const api = "/api/v1/meters/" + encodeURIComponent(id);
  document.title = "Lipari — " + id;
  L.$("#m-id").textContent = id;
  L.$("#csv").href = api + "/intervals.csv";
  let period = "day", lastSeq = null;
  const chart = L.energyChart(L.$("#energy-chart"), L.$("#chart-note"));
  const power = L.powerChart(L.$("#power-chart"), 120);

  // A live value may be a per-phase list or one number; units are the meter's integers.
  const at = (v, i) => Array.isArray(v) ? v[i] : (i === 0 ? v : undefined);
  function phases(rt) {
    const tb = L.$("#phases tbody");
    if (!rt) return;
    const n = Math.max(...["v_mv", "i_ma", "p_mw", "pf_milli"].map(k => Array.isArray(rt[k]) ? rt[k].length : (rt[k] != null ? 1 : 0)));
    const f = Array.isArray(rt.f_mhz) ? rt.f_mhz : [rt.f_mhz];
    let rows = "";
    for (let i = 0; i < n; i++) {
      const v = at(rt.v_mv, i), c = at(rt.i_ma, i), p = at(rt.p_mw, i), pf = at(rt.pf_milli, i);
      const fi = f[i] != null ? f[i] : f[0];
      rows += `<tr class="ph" data-phase="${i + 1}"><td>L${i + 1}</td>
        <td class="num v">${v == null ? "–" : L.num(v / 1000, 1) + " V"}</td>
        <td class="num i">${c == null ? "–" : L.num(c / 1000, 3) + " A"}</td>
        <td class="num p">${p == null ? "–" : L.watts(p / 1000)}</td>
        <td class="num pf">${pf == null ? "–" : L.num(pf / 1000, 3)}</td>
        <td class="num f">${fi == null ? "–" : L.num(fi / 1000, 3) + " Hz"}</td></tr>`;
    }
    if (n > 1 && rt.p_mw != null) {
      const tot = Array.isArray(rt.p_mw) ? rt.p_mw.reduce((a, b) => a + b, 0) : rt.p_mw;
      rows += `<tr><td><b>total</b></td><td></td><td></td><td class="num"><b id="p-total">${L.watts(tot / 1000)}</b></td><td></td><td></td></tr>`;
    }
    tb.innerHTML = rows || '<tr><td colspan="6" class="muted">reading has no per-phase values</td></tr>';
    L.$("#rt-time").textContent = rt.t ? "meter time " + L.utc(rt.t) : "";
  }

  function header(m) {
    const b = L.$("#m-online");
    if (!m) { b.textContent = "unknown meter"; return; }
    b.innerHTML = `<span class="dot ${m.online ? "on" : "off"}"></span>${m.online ? "online" : "offline"} · ${L.esc(m.transport || "?")} · seen ${L.ago(m.last_seen)}`;
  }

  // "Firmware and OTA": what the meter itself last reported on lipari/v1/<id>/ota/state
  // (headend/ota_store.py), with the rollout it belongs to.
  const OTA_STATE = {idle: "idle", verifying: "checking the release", downloading: "downloading",
    rebooting: "installed, rebooting into it", trial: "on trial (new firmware must prove itself)",
    confirmed: "confirmed", rolled_back: "rolled back", rolling_back: "rolling back",
    refused: "refused", failed: "failed", disabled: "disabled", error: "agent error"};
  function fw(m, status, ota) {
    const s = status || {};
    const o = (ota && ota.state) || null;
    const rows = [["firmware", (o && o.fw) || (m && m.fw) || s.fw], ["board", (m && m.board) || s.board],
      ["transport", (m && m.transport) || s.transport], ["signal", m && m.signal != null ? m.signal : s.signal]];
    for (const [k, label] of [["queued", "records queued on the meter"], ["dropped", "records dropped (queue full)"], ["q_errors", "records the flash queue refused"], ["held", "records waiting in RAM (flash failing)"], ["held_dropped", "records lost (flash failed too long)"], ["early", "records released before their resend window"], ["task_errors", "command/live tasks restarted, or MQTT link out of memory"], ["reconnects", "reconnects"]]) {
      if (s[k] != null) rows.push([label, s[k]]);
    }
    if (!o) rows.push(["OTA", "no update reported"]);
    else {
      rows.push(["OTA", OTA_STATE[o.state] || o.state]);
      if (o.slot) rows.push(["slot", o.slot]);
      if (o.target) rows.push(["release", o.target]);
      if (o.state === "downloading" && o.total) rows.push(["progress", Math.floor(100 * o.done / o.total) + " % of " + L.num(o.total / 1024, 0) + " KiB"]);
      if (o.reason) rows.push(["reason", o.reason]);
      if (o.t) rows.push(["reported", "meter time " + L.utc(o.t)]);
    }
    const t = ota && ota.target;
    if (t) rows.push(["rollout", "#" + t.rollout_id + " " + (t.version || "") + ": " + (t.outcome || t.state)]);
    L.$("#fw").innerHTML = rows.map(([k, v]) => `<dt>${L.esc(k)}</dt><dd>${L.esc(v == null ? "–" : v)}</dd>`).join("");
  }

  function events(ev) {
    const tb = L.$("#events tbody");
    if (!ev || !ev.length) { tb.innerHTML = '<tr><td colspan="4" class="muted">none</td></tr>'; return; }
    tb.innerHTML = ev.map(e => `<tr><td>${L.utc(e.t)}</td><td>${L.esc(e.kind)}</td><td>${e.phase == null ? "–" : L.esc(e.phase)}</td><td>${L.esc(e.value == null ? "" : e.value)}</td></tr>`).join("");
  }

  async function loadChart() {
    try {
      const d = await L.get(api + "/energy?period=" + period);
      chart.update(d);
      L.$("#chart-note").textContent = "to " + L.utc(d.t1) + " · import " + L.kwh(d.buckets.reduce((a, b) => a + b.import_wh, 0)) +
        " · export " + L.kwh(d.buckets.reduce((a, b) => a + b.export_wh, 0));
    } catch (e) { L.$("#chart-note").textContent = "energy: " + e.message; }
  }

  async function loadBill() {
    try {
      const b = await L.get(api + "/bill");
      const cur = L.esc(b.currency);
      L.$("#bill").className = "";
      L.$("#bill").innerHTML = `<div class="kpis"><div class="kpi"><div class="v" id="bill-projected">${b.projected_total == null ? "–" : cur + " " + L.num(b.projected_total, 2)}</div><div class="l">projected for the period</div></div>
        <div class="kpi"><div class="v">${cur} ${L.num(b.cost_so_far, 2)}</div><div class="l">so far (${L.num(b.covered_fraction * 100, 0)} % of period)</div></div></div>
        <table><thead><tr><th>rate</th><th class="num">kWh</th><th class="num">price</th><th class="num">cost</th></tr></thead><tbody>
        ${b.rates.map(r => `<tr><td>${L.esc(r.name)}</td><td class="num">${L.num(r.kwh, 2)}</td><td class="num">${L.num(r.per_kwh, 4)}</td><td class="num">${L.num(r.cost, 2)}</td></tr>`).join("")}
        <tr><td>standing charge</td><td></td><td class="num">${L.num(b.standing_per_day, 2)}/day</td><td></td></tr></tbody></table>
        <div class="muted">${L.esc(b.tariff)} · ${L.utc(b.period_start)} → ${L.utc(b.period_end)}</div>`;
    } catch (e) { L.$("#bill").textContent = "bill: " + e.message; }
  }

  function update(s) {
    header(s.meter); phases(s.rt); power.push(s.rt); fw(s.meter, s.status, s.ota); events(s.events);
    const seq = s.last_interval ? s.last_interval.seq : null;
    if (seq !== lastSeq) { lastSeq = seq; loadChart(); loadBill(); }
  }

  L.$("#cmd-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const f = ev.target, out = L.$("#cmd-reply"), btn = f.querySelector("button");
    let args = null;
    if (f.args.value.trim()) {
      try { args = JSON.parse(f.args.value); } catch (e) { out.hidden = false; out.className = "reply err"; out.textContent = "args must be JSON: " + e.message; return; }
    }
    const timeout = Number(f.timeout_s.value) || 10;
    btn.disabled = true; out.hidden = false; out.className = "reply"; out.textContent = `sending ${f.cmd.value} (waiting up to ${timeout} s)…`;
    try {
      const r = await L.post(api + "/commands", {cmd: f.cmd.value, args, timeout_s: timeout});
      const body = await r.json().catch(() => ({error: "bad response (HTTP " + r.status + ")"}));
      if (r.ok) {
        const refused = body.reply && body.reply.ok === false;
        out.className = refused ? "reply err" : "reply";
        out.textContent = (refused ? "the meter refused it" : "reply") + ` after ${body.elapsed_ms} ms:\n` + JSON.stringify(body.reply, null, 2);
      }
      else { out.className = "reply err"; out.textContent = (r.status === 504 ? "time-out: " : r.status === 403 ? "not allowed: " : "error: ") + body.error; }
    } catch (e) { out.className = "reply err"; out.textContent = "error: " + e.message; }
    btn.disabled = false;
    loadAudit();
  });

  // Audit log: one row per entry, newest first (a command shows as "sent", then its outcome).
  async function loadAudit() {
    try {
      const rows = await L.get(api + "/audit?limit=50");
      const tb = L.$("#audit tbody");
      if (!rows.length) { tb.innerHTML = '<tr><td colspan="7" class="muted">none</td></tr>'; return; }
      tb.innerHTML = rows.map(a => `<tr class="audit-${L.esc(a.outcome)}" data-user="${L.esc(a.user_name)}"><td>${L.utc(a.t)}</td><td>${L.esc(a.user_name)}</td><td>${L.esc(a.role)}</td>
        <td>${L.esc(a.cmd)}</td><td><code>${L.esc(a.args ? JSON.stringify(a.args) : "")}</code></td>
        <td class="outcome">${L.esc(a.outcome)}</td><td><code>${L.esc(a.answer ? JSON.stringify(a.answer) : "")}</code></td></tr>`).join("");
    } catch (e) { L.$("#audit tbody").innerHTML = `<tr><td colspan="7" class="muted">${L.esc(e.message)}</td></tr>`; }
  }

  L.periodButtons(L.$("#period"), p => { period = p; loadChart(); });
  L.user().then(me => {
    L.$("#cmd-role").textContent = me.role === "viewer"
      ? "You are a viewer: commands need the operator role (ping, get, time, reboot, reporting settings) or admin (everything else)."
      : me.role === "operator" ? "As an operator you may send ping, get, time, reboot and reporting settings; calibrate, preset, reset and other settings need an admin." : "";
  }).catch(() => {});
  L.$("#audit-csv").href = "/api/v1/audit.csv?meter=" + encodeURIComponent(id);
  loadAudit();
  L.get(api).then(update).catch(e => { L.$("#m-online").textContent = e.message; });
  L.stream("/api/v1/stream?meter=" + encodeURIComponent(id), {meter: update});
})();

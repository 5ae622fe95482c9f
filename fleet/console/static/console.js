// quantfleet console: live refresh of the server-rendered pages, the charts (uPlot,
// vendored), and the write actions. Every figure comes aggregated from the fleet's
// JSON endpoints under /console/api/; nothing is computed here but the layout.
(function () {
  "use strict";
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const prefix = meta("console-prefix");
  const csrf = meta("csrf-token");
  const COLORS = ["#2857c5", "#c62828", "#1a7f37", "#b26a00", "#7b1fa2", "#00838f", "#5d4037", "#455a64"];
  // Charts by id, for people poking in the devtools and for the browser tests.
  const plots = (window.qfPlots = {});
  const charts = (window.qfCharts = {});

  function flash(message, ok) {
    const el = document.getElementById("flash");
    if (!el) return;
    el.textContent = message;
    el.className = ok ? "ok" : "error";
  }

  async function api(path, params) {
    const url = new URL(prefix + path, location.origin);
    for (const [k, v] of Object.entries(params || {})) if (v) url.searchParams.set(k, v);
    const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
    return body;
  }

  async function post(path, body) {
    const resp = await fetch(prefix + path, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
    });
    let doc = {};
    try { doc = await resp.json(); } catch (e) { doc = {}; }
    if (!resp.ok) throw new Error(`${resp.status}: ${doc.error ? doc.error.message : resp.statusText}`);
    return doc;
  }

  function every(ms, fn) {
    let busy = false;
    const run = async () => {
      if (busy || document.hidden) return;
      busy = true;
      try { await fn(); } catch (e) { flash(e.message, false); } finally { busy = false; }
    };
    setInterval(run, ms);
    return run;
  }

  const stamp = () => {
    const el = document.getElementById("updated");
    if (el) el.textContent = new Date().toISOString().replace("T", " ").slice(0, 19) + "Z";
  };

  // -- charts ---------------------------------------------------------------
  // One chart per signal: per variant a line (its value per bucket) and, for rates
  // and percentiles, a band between the 95 % interval's ends.
  function seriesChart(fig, key, kind, variants, range) {
    const withBand = kind === "rate" || kind === "latency";
    const xs = [...new Set(variants.flatMap((v) => v.points.map((p) => p.t)))].sort((a, b) => a - b);
    const data = [xs];
    const series = [{}];
    const bands = [];
    variants.forEach((v, i) => {
      const color = COLORS[i % COLORS.length];
      const at = new Map(v.points.map((p) => [p.t, p[key]]));
      const pick = (f) => xs.map((t) => {
        const x = at.get(t);
        if (x === undefined || x === null) return null;
        return typeof x === "object" ? x[f] : (f === "value" ? x : null);
      });
      data.push(pick("value"));
      series.push({ label: v.variant, stroke: color, width: 2, points: { show: xs.length < 80 } });
      if (withBand) {
        data.push(pick("high"), pick("low"));
        const hi = series.length, lo = series.length + 1;
        series.push({ label: `${v.variant} 95% high`, stroke: color + "55", width: 1, points: { show: false }, band: true },
                    { label: `${v.variant} 95% low`, stroke: color + "55", width: 1, points: { show: false }, band: true });
        bands.push({ series: [hi, lo], fill: color + "22" });
      }
    });
    draw(fig, key, data, { series, bands }, variants.length, range);
  }

  // The x range is the window asked for, not the data's extent (a lone bucket would
  // otherwise be stretched over years).
  const ranges = {};

  function legend(fig, series) {
    let el = fig.querySelector(".legend");
    if (!el) {
      el = document.createElement("div");
      el.className = "legend";
      fig.appendChild(el);
    }
    el.innerHTML = "";
    series.slice(1).filter((s) => !s.band).forEach((s) => {
      const item = document.createElement("span");
      item.innerHTML = `<i style="background:${s.stroke}"></i>`;
      item.append(s.label);
      el.appendChild(item);
    });
  }

  function draw(fig, key, data, { series, bands }, groups, range) {
    ranges[key] = range || null;
    const old = plots[key];
    if (old && old.series.length === series.length) {
      old.setData(data);
    } else {
      if (old) old.destroy();
      fig.querySelectorAll(".empty").forEach((n) => n.remove());
      const width = Math.max(380, fig.clientWidth - 16);
      plots[key] = new uPlot({
        width, height: 220, series, bands,
        scales: { x: { time: true, range: (u, min, max) => ranges[key] || [min, max] } },
        legend: { show: false },
        hooks: { draw: [(u) => { charts[key].draws += 1; }] },
      }, data, fig);
      charts[key] = { draws: 0 };
      legend(fig, series);
    }
    Object.assign(charts[key], { series: series.length - 1, points: data[0].length, groups });
    let empty = fig.querySelector(".empty");
    if (!data[0].length) {
      if (!empty) {
        empty = document.createElement("div");
        empty.className = "empty";
        fig.appendChild(empty);
      }
      empty.textContent = "no requests in this window";
    } else if (empty) empty.remove();
  }

  // -- pages ----------------------------------------------------------------
  const pages = {};

  pages.fleet = () => {
    const selector = new URLSearchParams(location.search).get("selector") || "";
    every(3000, async () => {
      const s = await api("/api/fleet", { selector });
      document.getElementById("total").textContent = s.total;
      document.querySelectorAll("table.count").forEach((t) => {
        const counts = s.counts[t.dataset.key] || {};
        t.tBodies[0].innerHTML = "";
        for (const [k, n] of Object.entries(counts)) {
          const row = t.tBodies[0].insertRow();
          row.insertCell().textContent = k;
          const c = row.insertCell(); c.textContent = n; c.className = "n";
        }
      });
      const body = document.querySelector("#devices tbody");
      body.innerHTML = "";
      for (const d of s.devices) {
        const row = body.insertRow();
        const a = document.createElement("a");
        a.href = `${prefix}/devices/${encodeURIComponent(d.device_id)}`;
        a.textContent = d.device_id;
        row.insertCell().appendChild(a);
        for (const v of [d.online ? "online" : "offline", d.variant || "-", d.update_state || "-", d.cpu_class,
                         `${Math.max(0, Math.round(s.now - d.last_seen))} s ago`]) row.insertCell().textContent = v;
      }
      stamp();
    });
    const form = document.getElementById("desired-form");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      try {
        const r = await post("/api/desired", { selector: f.get("selector"), variant: f.get("variant") });
        flash(`desired state set for ${r.devices} devices`, true);
      } catch (e) { flash(e.message, false); }
    });
  };

  pages.signals = () => {
    const q = new URLSearchParams(location.search);
    const window_ = q.get("window") || "1h", selector = q.get("selector") || "";
    const refresh = every(10000, async () => {
      const s = await api("/api/signals", { window: window_, selector });
      const total = s.variants.reduce((a, v) => a + v.requests, 0);
      document.getElementById("summary").textContent =
        `${total} requests of ${s.variants.length} variants` +
        (s.devices !== null ? ` on ${s.devices} devices` : "") + `, buckets of ${s.step_s} s`;
      document.querySelectorAll("figure.chart").forEach((fig) =>
        seriesChart(fig, fig.dataset.key, fig.dataset.kind, s.variants, [s.start, s.end]));
      stamp();
    });
    refresh();
  };

  pages.device = () => {
    const s = JSON.parse(document.getElementById("device-signals").textContent);
    document.querySelectorAll("figure.chart").forEach((fig) =>
      seriesChart(fig, fig.dataset.key, fig.dataset.kind, s.variants, [s.start, s.end]));
  };

  pages.rollout = () => {
    const doc = JSON.parse(document.getElementById("rollout-data").textContent);
    verdictCharts(doc.verdicts);
    every(5000, async () => {
      const d = await api(`/api/rollouts/${encodeURIComponent(doc.id)}`);
      const st = document.getElementById("state");
      st.textContent = d.rollout.state;
      st.className = `state state-${d.rollout.state}`;
      if (d.verdicts.length !== doc.verdicts.length) location.reload();
    });
    const form = document.getElementById("control-form");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const action = ev.submitter ? ev.submitter.value : "pause";
      if (action === "abort" && !confirm(`Abort ${doc.id} and roll every canary back?`)) return;
      try {
        const r = await post(`/api/rollouts/${encodeURIComponent(doc.id)}/${action}`,
                             { reason: new FormData(form).get("reason") || "" });
        flash(`${doc.id}: ${r.state}`, true);
        setTimeout(() => location.reload(), 300);
      } catch (e) { flash(e.message, false); }
    });
  };

  // One chart per gate (a rate difference and a latency ratio do not share an axis):
  // its estimate at every verdict, the 95 % interval as a band, the limit dashed.
  function verdictCharts(verdicts) {
    const box = document.getElementById("verdict-charts");
    if (!box) return;
    const metrics = [...new Set(verdicts.flatMap((v) => v.gates.map((g) => g.metric)))];
    const xs = verdicts.map((v) => v.ts);
    const range = xs.length ? [xs[0] - 1, xs[xs.length - 1] + 1] : null;
    metrics.forEach((m, i) => {
      const key = `verdict:${m}`;
      let fig = box.querySelector(`figure[data-key="${key}"]`);
      if (!fig) {
        fig = document.createElement("figure");
        fig.className = "chart";
        fig.dataset.key = key;
        const cap = document.createElement("figcaption");
        cap.textContent = m;
        fig.appendChild(cap);
        box.appendChild(fig);
      }
      const color = COLORS[i % COLORS.length];
      const gate = (v) => v.gates.find((x) => x.metric === m);
      const get = (f) => verdicts.map((v) => {
        const g = gate(v);
        return g && g[f] !== null && g[f] !== undefined ? g[f] : null;
      });
      const limit = verdicts.map((v) => {
        const g = gate(v);
        return g ? g.limits[g.limits.length - 1] : null;
      });
      const series = [{},
        { label: `${m} estimate`, stroke: color, width: 2 },
        { label: "95% high", stroke: color + "55", points: { show: false }, band: true },
        { label: "95% low", stroke: color + "55", points: { show: false }, band: true },
        { label: "tolerated limit", stroke: "#c62828", dash: [6, 4], points: { show: false } }];
      draw(fig, key, [xs, get("estimate"), get("high"), get("low"), limit],
           { series, bands: [{ series: [2, 3], fill: color + "22" }] }, 1, range);
    });
  }

  pages.rollouts = () => {
    every(5000, async () => {
      const doc = await api("/api/rollouts");
      const rows = document.querySelectorAll("#rollouts tr[data-rollout]");
      if (rows.length !== doc.rollouts.length) { location.reload(); return; }
      for (const r of doc.rollouts) {
        const row = document.querySelector(`#rollouts tr[data-rollout="${CSS.escape(r.id)}"]`);
        if (!row) continue;
        const cells = row.cells;
        cells[1].textContent = r.state;
        cells[1].className = `state state-${r.state}`;
        cells[2].textContent = `${r.step}/${r.steps} (${r.phase})`;
        cells[5].textContent = r.reason;
      }
    });
    const form = document.getElementById("create-form");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      try {
        const r = await post("/api/rollouts", { spec: f.get("spec"), unpin: f.get("unpin") === "on" });
        flash(`created ${r.id} (${r.state})`, true);
        location.href = `${prefix}/rollouts/${encodeURIComponent(r.id)}`;
      } catch (e) { flash(e.message, false); }
    });
  };

  document.addEventListener("click", async (ev) => {
    const b = ev.target.closest && ev.target.closest("button.unpin");
    if (!b) return;
    try {
      await post("/api/pins/unpin", { cohort: b.dataset.cohort, variant: b.dataset.variant });
      flash(`unpinned ${b.dataset.variant} from ${b.dataset.cohort}`, true);
      b.closest("tr, li").remove();
    } catch (e) { flash(e.message, false); }
  });

  const page = pages[document.body.dataset.page];
  if (page) page();
})();

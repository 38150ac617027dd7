// xpuflow dashboard: renders the snapshots that GET dashboard/events pushes (Server-Sent Events).
// Every value from the server is written with textContent, never as HTML.
"use strict";

(function () {
  const COLORS = { rate: "#4ea1ff", errors: "#e5534b", p50: "#3fb97f", p99: "#e0a93b" };
  let updates = 0;
  let rateChart = null;
  let latencyChart = null;

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function fmtInt(v) {
    return v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US");
  }

  function fmtNum(v, digits) {
    if (v === null || v === undefined) return "–";
    return v.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  }

  function fmtMs(v) {
    if (v === null || v === undefined) return "–";
    return v >= 1000 ? fmtNum(v / 1000, 2) + " s" : fmtNum(v, v < 10 ? 2 : 1) + " ms";
  }

  function fmtBytes(v) {
    if (v === null || v === undefined) return "–";
    const gib = v / 1024 ** 3;
    return gib >= 1 ? fmtNum(gib, 1) + " GiB" : fmtNum(v / 1024 ** 2, 0) + " MiB";
  }

  function fmtTime(ts) {
    if (ts === null || ts === undefined) return "–";
    return new Date(ts * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }

  function chartSize(target) {
    const width = Math.max(300, target.clientWidth || 400);
    return { width: width, height: 220 };
  }

  function makeChart(target, series) {
    if (typeof uPlot === "undefined") return null; // the page still shows numbers and tables
    const opts = Object.assign(chartSize(target), {
      scales: { x: { time: true } },
      series: [{}].concat(series),
      axes: [
        { stroke: "#8593a3", grid: { stroke: "#2a3440" }, ticks: { stroke: "#2a3440" } },
        { stroke: "#8593a3", grid: { stroke: "#2a3440" }, ticks: { stroke: "#2a3440" }, size: 60 },
      ],
      legend: { live: false },
    });
    return new uPlot(opts, [[]].concat(series.map(() => [])), target);
  }

  function ensureCharts() {
    if (!rateChart) {
      rateChart = makeChart($("chart-rate"), [
        { label: "requests/s", stroke: COLORS.rate, width: 2, spanGaps: true },
        { label: "errors/s", stroke: COLORS.errors, width: 2, spanGaps: true },
      ]);
    }
    if (!latencyChart) {
      latencyChart = makeChart($("chart-latency"), [
        { label: "p50 ms", stroke: COLORS.p50, width: 2, spanGaps: true },
        { label: "p99 ms", stroke: COLORS.p99, width: 2, spanGaps: true },
      ]);
    }
  }

  function renderCharts(series) {
    ensureCharts();
    if (!series) return;
    if (rateChart) rateChart.setData([series.t, series.requests_per_s, series.errors_per_s]);
    if (latencyChart) latencyChart.setData([series.t, series.p50_ms, series.p99_ms]);
  }

  function renderTotals(totals) {
    $("requests-total").textContent = fmtInt(totals.requests_total);
    $("errors-total").textContent = fmtInt(totals.errors_total);
    $("requests-per-s").textContent = fmtNum(totals.requests_per_s, 1);
    $("p50-ms").textContent = fmtMs(totals.p50_ms);
    $("p99-ms").textContent = fmtMs(totals.p99_ms);
    $("tokens-per-s").textContent = fmtNum(totals.tokens_per_s, 1);
    $("workers-healthy").textContent = fmtInt(totals.healthy_workers) + " / " + fmtInt(totals.workers);
  }

  function vram(device) {
    const free = device.free_memory_bytes;
    const total = device.total_memory_bytes;
    if (free === null && total === null) return el("div", { class: "vram vram-text", text: "memory: –" });
    const used = total !== null && free !== null ? Math.max(0, total - free) : null;
    const pct = used !== null && total > 0 ? (100 * used) / total : 0;
    const bar = el("div", { class: "vram-bar" }, [el("div", { class: "vram-used" })]);
    bar.firstChild.style.width = pct.toFixed(1) + "%";
    const text = "memory free " + fmtBytes(free) + " of " + fmtBytes(total);
    return el("div", { class: "vram" }, [bar, el("div", { class: "vram-text", text: text })]);
  }

  function batchText(worker) {
    const sizes = Object.keys(worker.batch_sizes || {});
    if (!sizes.length) return "–";
    const max = Math.max.apply(null, sizes.map(Number));
    return fmtNum(worker.mean_batch_size, 1) + " / " + max;
  }

  function fmtUptime(s) {
    if (s === null || s === undefined) return null;
    if (s < 60) return "up " + Math.floor(s) + " s";
    if (s < 3600) return "up " + Math.floor(s / 60) + " min";
    return "up " + fmtNum(s / 3600, 1) + " h";
  }

  // The model server a managed worker's gateway started: state, pid, restarts (and uptime); the last
  // error, when there is one, is the cell's tooltip.
  function managedCell(m) {
    if (!m) return el("td", { class: "managed managed-none muted", text: "–" });
    const state = m.state || "unknown";
    const restarts = m.restarts === null ? "restarts –" : m.restarts + (m.restarts === 1 ? " restart" : " restarts");
    const parts = [
      el("span", { class: "managed-state managed-" + state, text: state }),
      el("span", { class: "managed-pid", text: m.pid === null ? "pid –" : "pid " + m.pid }),
      el("span", { class: "managed-restarts", text: restarts }),
    ];
    const uptime = state === "running" ? fmtUptime(m.uptime_s) : null;
    if (uptime) parts.push(el("span", { class: "managed-uptime muted", text: uptime }));
    const title = m.last_error || (m.last_exit_code === null ? "" : "last exit code " + m.last_exit_code);
    return el("td", { class: "managed", title: title }, parts);
  }

  function workerRow(w, withManaged) {
    const health = w.draining && w.health === "healthy" ? "draining" : w.health;
    const cells = [
      el("td", { text: w.worker_id, title: w.deployment || "" }),
      el("td", { text: [w.model, w.tier].filter(Boolean).join(" / ") || w.deployment || "–" }),
      el("td", { class: "health health-" + health, text: health }),
      el("td", { class: "num", text: fmtInt(w.queue_depth) }),
      el("td", { class: "num", text: fmtInt(w.in_flight) }),
      el("td", { class: "num", text: fmtMs(w.ema_latency_ms) }),
      el("td", { class: "num", text: fmtNum(w.tokens_per_s, 1) }),
      el("td", { class: "num", text: batchText(w) }),
    ];
    if (withManaged) cells.push(managedCell(w.managed));
    return el("tr", { class: "worker-row", "data-worker-id": w.worker_id }, cells);
  }

  function deviceCard(d) {
    // the "model server" column only where a worker here runs a server this gateway started
    const withManaged = d.workers.some(function (w) { return Boolean(w.managed); });
    const names = [
      "worker", "model / tier", "health", "queue", "in flight", "EMA latency", "tokens/s", "batch (mean / max)",
    ];
    if (withManaged) names.push("model server");
    const head = el("tr", {}, names.map(function (name, i) {
      return el("th", { class: i >= 3 && i < 8 ? "num" : "", text: name });
    }));
    const table = el("table", {}, [
      el("thead", {}, [head]),
      el("tbody", {}, d.workers.map(function (w) { return workerRow(w, withManaged); })),
    ]);
    const title = el("div", { class: "device-head" }, [
      el("span", { class: "device-name", text: d.device }),
      el("span", { class: "muted", text: d.healthy_workers + " of " + d.workers.length + " workers healthy" }),
    ]);
    return el("div", { class: "device", "data-device": d.device }, [title, vram(d), table]);
  }

  // One machine: a card per device. Cluster mode (the snapshot lists nodes): a group per node, holding
  // the cards of that node's devices.
  function renderDevices(devices, nodes) {
    const root = $("devices");
    $("devices-title").textContent = nodes.length ? "Workers by node and device" : "Workers by device";
    root.classList.toggle("by-node", nodes.length > 0);
    let cards;
    if (nodes.length) {
      const byId = {};
      devices.forEach(function (d) { byId[d.device] = d; });
      cards = nodes.map(function (n) {
        const name = n.node === null ? "no node" : n.node;
        const title = el("div", { class: "node-head" }, [
          el("span", { class: "node-name", text: "node " + name }),
          el("span", { class: "muted", text: n.healthy_workers + " of " + n.workers + " workers healthy" }),
        ]);
        const inner = n.devices.filter(function (id) { return byId[id]; }).map(function (id) {
          return deviceCard(byId[id]);
        });
        return el("div", { class: "node", "data-node": name }, [title, el("div", { class: "devices" }, inner)]);
      });
    } else {
      cards = devices.map(deviceCard);
    }
    if (!cards.length) cards.push(el("p", { class: "muted", text: "no workers yet" }));
    root.replaceChildren.apply(root, cards);
  }

  function renderDecisions(decisions) {
    const body = $("decisions").tBodies[0];
    const rows = decisions.map(function (d) {
      return el("tr", { class: "decision-row", "data-request-id": d.request_id || "" }, [
        el("td", { text: fmtTime(d.ts) }),
        el("td", { text: d.model || "–" }),
        el("td", { text: d.tier || "–" }),
        el("td", { text: d.worker || "–" }),
        el("td", { text: d.device || "–" }),
        el("td", { class: "reason", text: d.reason || "" }),
      ]);
    });
    if (!rows.length) {
      rows.push(el("tr", { class: "empty" }, [el("td", { colSpan: 6, class: "muted", text: "no decisions yet" })]));
    }
    body.replaceChildren.apply(body, rows);
  }

  function renderQos(contexts) {
    const section = $("qos-section");
    section.hidden = !contexts.length;
    const body = $("qos").tBodies[0];
    const rows = contexts.map(function (c) {
      const used = c.used_bytes;
      const max = c.max_bytes;
      const pct = used !== null && max ? Math.min(100, (100 * used) / max) : 0;
      const bar = el("div", { class: "vram-bar" }, [el("div", { class: "vram-used" })]);
      bar.firstChild.style.width = pct.toFixed(1) + "%";
      const usage = el("td", {}, [bar, el("div", { class: "vram-text", text: fmtBytes(used) + " / " + fmtBytes(max) })]);
      return el("tr", { class: "qos-row", "data-context": c.name }, [
        el("td", { text: c.name }),
        el("td", { text: c.qos || "–" }),
        el("td", { text: c.device || "–" }),
        usage,
        el("td", { class: "num", text: fmtInt(c.admitted) }),
        el("td", { class: "num", text: fmtInt(c.rejected) }),
        el("td", { class: "num", text: fmtInt(c.shed) }),
      ]);
    });
    body.replaceChildren.apply(body, rows);
  }

  function renderResidency(models) {
    const section = $("residency-section");
    section.hidden = !models.length;
    const body = $("residency").tBodies[0];
    const rows = models.map(function (m) {
      const state = m.resident ? (m.in_use ? "loaded, in use" : "loaded") + (m.pinned ? " (pinned)" : "") : "unloaded";
      const used = m.resident_bytes;
      const max = m.budget_bytes;
      const pct = used !== null && max ? Math.min(100, (100 * used) / max) : 0;
      const bar = el("div", { class: "vram-bar" }, [el("div", { class: "vram-used" })]);
      bar.firstChild.style.width = pct.toFixed(1) + "%";
      const usage = el("td", {}, [bar, el("div", { class: "vram-text", text: fmtBytes(used) + " / " + fmtBytes(max) })]);
      return el("tr", { class: "residency-row", "data-worker": m.worker, "data-resident": String(m.resident) }, [
        el("td", { text: m.worker }),
        el("td", { text: m.device || "–" }),
        el("td", { text: state }),
        el("td", { text: fmtBytes(m.size_bytes) }),
        usage,
        el("td", { class: "num", text: m.idle_s === null ? "–" : m.idle_s.toFixed(0) }),
        el("td", { class: "num", text: fmtInt(m.loads) }),
        el("td", { class: "num", text: fmtInt(m.evictions) }),
        el("td", { class: "num", text: m.load_ms_p50 === null ? "–" : m.load_ms_p50.toFixed(0) }),
      ]);
    });
    body.replaceChildren.apply(body, rows);
  }

  function render(snapshot) {
    const banner = $("error");
    banner.hidden = !snapshot.error;
    banner.textContent = snapshot.error || "";
    renderTotals(snapshot.totals || {});
    renderDevices(snapshot.devices || [], snapshot.nodes || []);
    renderDecisions(snapshot.decisions || []);
    renderQos(snapshot.qos || []);
    renderResidency(snapshot.residency || []);
    renderCharts(snapshot.series);
    $("updated").textContent = "updated " + fmtTime(snapshot.ts);
    updates += 1;
    document.body.dataset.updates = String(updates);
  }

  function setConnection(state, text, cls) {
    const badge = $("connection");
    badge.dataset.state = state;
    badge.textContent = text;
    badge.className = "badge " + cls;
  }

  // A gateway with dashboard_require_key answers the feeds 401/403 without a key that holds the
  // "dashboard" right. The page then asks for one, keeps it for this tab only (sessionStorage), and
  // reads the event stream with fetch, which can send the Authorization header (EventSource cannot).
  const KEY_ITEM = "xpuflow-dashboard-key";

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_ITEM);
    } catch (err) {
      return null;
    }
  }

  function askForKey(message) {
    setConnection("locked", "key needed", "badge-bad");
    $("key-error").textContent = message;
    $("key-form").hidden = false;
    $("key-input").focus();
  }

  function handleSnapshotEvent(data) {
    try {
      render(JSON.parse(data));
    } catch (err) {
      console.error("dashboard: bad snapshot", err);
    }
  }

  async function streamWithKey(key) {
    const headers = { Authorization: "Bearer " + key };
    let response;
    try {
      response = await fetch(new URL("dashboard/events", document.baseURI), { headers: headers, cache: "no-store" });
    } catch (err) {
      response = null;
    }
    if (response && (response.status === 401 || response.status === 403)) {
      askForKey(response.status === 401 ? "that key is not valid" : "that key lacks the dashboard right");
      return;
    }
    if (!response || !response.ok || !response.body) {
      setConnection("reconnecting", "reconnecting", "badge-bad");
      setTimeout(function () { streamWithKey(key); }, 1000);
      return;
    }
    setConnection("open", "live", "badge-ok");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const part = await reader.read();
        if (part.done) break;
        buffer += decoder.decode(part.value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let event = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          }
          if (event === "snapshot" && data.length) handleSnapshotEvent(data.join("\n"));
        }
      }
    } catch (err) {
      console.error("dashboard: stream ended", err);
    }
    setConnection("reconnecting", "reconnecting", "badge-bad");
    setTimeout(function () { streamWithKey(key); }, 1000);
  }

  async function connect() {
    const key = storedKey();
    if (key) {
      streamWithKey(key);
      return;
    }
    let status = 0;
    try {
      status = (await fetch(new URL("dashboard/snapshot", document.baseURI), { cache: "no-store" })).status;
    } catch (err) {
      status = 0;
    }
    if (status === 401 || status === 403) {
      askForKey("this gateway asks for an API key with the dashboard right");
      return;
    }
    openEventSource();
  }

  function openEventSource() {
    const source = new EventSource(new URL("dashboard/events", document.baseURI));
    source.addEventListener("open", function () {
      setConnection("open", "live", "badge-ok");
    });
    source.addEventListener("error", function () {
      // EventSource reconnects by itself; the badge says so meanwhile.
      setConnection("reconnecting", "reconnecting", "badge-bad");
    });
    source.addEventListener("snapshot", function (event) {
      handleSnapshotEvent(event.data);
    });
  }

  window.addEventListener("resize", function () {
    for (const chart of [rateChart, latencyChart]) {
      if (chart) chart.setSize(chartSize(chart.root.parentNode));
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    ensureCharts();
    $("key-form").addEventListener("submit", function (event) {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      try {
        sessionStorage.setItem(KEY_ITEM, key);
      } catch (err) {
        // storage off: the key lives until the page is reloaded
      }
      $("key-input").value = "";
      $("key-form").hidden = true;
      streamWithKey(key);
    });
    connect();
  });
})();

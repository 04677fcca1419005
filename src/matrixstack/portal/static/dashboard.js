// MatrixStack portal dashboard: polls GET {base}/state with an admin key and draws the matrix, the catalog tree
// and live usage. Vanilla JS, no build step. Every name from the server goes into the page as text (textContent),
// never as HTML.
(() => {
  "use strict";

  const BASE = document.body.dataset.base || "/dashboard";
  const POLL_MS = 2000;
  const HISTORY_POINTS = 90; // 3 minutes of tokens/s at one poll every 2 s
  const KEY_STORE = "matrixstack.dashboard.key";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const rates = []; // [{at: ms since epoch, value: tokens/s}], oldest first
  let timer = null;
  let inFlight = false;

  const $ = (id) => document.getElementById(id);

  // el("div", {class: "x", dataset: {a: 1}}, "text", child) -> element; strings become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "style") Object.assign(node.style, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  const fmt = (n) => Number(n || 0).toLocaleString("en-US");
  const fmtRate = (n) => Number(n || 0).toLocaleString("en-US", { maximumFractionDigits: 1, minimumFractionDigits: 1 });
  const plural = (n, word) => `${fmt(n)} ${word}${n === 1 ? "" : "s"}`;

  // --- the key ------------------------------------------------------------------------------------------------

  function takeKeyFromHash() {
    const match = /(?:^#|&)key=([^&]*)/.exec(location.hash);
    if (!match) return;
    const key = decodeURIComponent(match[1]).trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    // Drop the key from the address bar and the tab's history.
    history.replaceState(null, "", location.pathname + location.search);
  }

  const currentKey = () => sessionStorage.getItem(KEY_STORE);

  function showForm(show) {
    $("key-form").hidden = !show;
    $("forget").hidden = show || !currentKey();
    if (show) {
      $("content").hidden = true;
      setStatus("idle", "waiting for a key");
      $("key-input").focus();
    }
  }

  function showError(message) {
    const banner = $("error");
    banner.textContent = message;
    banner.hidden = !message;
  }

  function setStatus(kind, text) {
    $("status-dot").dataset.status = kind;
    $("status-text").textContent = text;
  }

  // --- polling ------------------------------------------------------------------------------------------------

  // The message of an error answer (OpenAI's {"error": {"message"}} or FastAPI's {"detail"}), without its final dot.
  async function errorMessage(response) {
    let message;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
      else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      else message = JSON.stringify(body);
    } catch (_) {
      message = response.statusText || "no message";
    }
    return String(message).replace(/[.\s]+$/, "");
  }

  function start() {
    stop();
    if (!currentKey()) {
      showForm(true);
      return;
    }
    showForm(false);
    setStatus("idle", "connecting…");
    poll();
    timer = setInterval(poll, POLL_MS);
  }

  function stop() {
    if (timer !== null) clearInterval(timer);
    timer = null;
  }

  async function poll() {
    const key = currentKey();
    if (!key || inFlight) return;
    inFlight = true;
    try {
      const response = await fetch(`${BASE}/state`, {
        headers: { Authorization: `Bearer ${key}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
      if (response.status === 401 || response.status === 403) {
        const message = await errorMessage(response);
        stop();
        sessionStorage.removeItem(KEY_STORE);
        showError(
          response.status === 401
            ? `The portal refused this key (401): ${message}. Enter a valid admin key.`
            : `This key is not an admin key (403): ${message}. The dashboard needs an admin key.`,
        );
        showForm(true);
        setStatus("error", response.status === 401 ? "key refused" : "not an admin key");
        return;
      }
      if (!response.ok) {
        const message = await errorMessage(response);
        showError(`The portal answered ${response.status}: ${message}. Retrying every ${POLL_MS / 1000} s.`);
        setStatus("error", `error ${response.status}`);
        return;
      }
      const state = await response.json();
      showError("");
      render(state);
      $("content").hidden = false;
      const at = new Date(state.generated_at || Date.now());
      setStatus("live", `live · updated ${at.toLocaleTimeString("en-GB")}`);
    } catch (error) {
      showError(`Cannot reach the portal (${error.message}). Retrying every ${POLL_MS / 1000} s.`);
      setStatus("error", "offline");
    } finally {
      inFlight = false;
    }
  }

  // --- drawing ------------------------------------------------------------------------------------------------

  function render(state) {
    renderMatrix(state.pools || [], state.deployments || []);
    renderCatalog(state.catalog || []);
    renderUsage(state.usage || {}, state.generated_at);
  }

  function renderMatrix(pools, deployments) {
    const colour = new Map(deployments.map((d) => [d.name, d.colour]));
    const held = new Map(deployments.map((d) => [d.name, 0]));
    const totals = { devices: 0, allocated: 0, failed: 0, unassigned: 0 };
    const poolNodes = pools.map((pool) => {
      const fabrics = pool.fabrics.map((fabric) => {
        const counts = { devices: 0, allocated: 0, failed: 0 };
        const nodes = fabric.nodes.map((node) => {
          const columns = Math.min(node.devices.length, 8);
          const devices = node.devices.map((d) => {
            counts.devices += 1;
            if (d.state === "allocated") counts.allocated += 1;
            if (d.state === "failed") counts.failed += 1;
            if (d.deployment) held.set(d.deployment, (held.get(d.deployment) || 0) + 1);
            if (d.state === "allocated" && !d.deployment) totals.unassigned += 1;
            return deviceSquare(pool.name, fabric, node, d, colour);
          });
          return el(
            "div",
            { class: "node" },
            el("div", { class: "node-label" }, `node ${node.node}`),
            el("div", { class: "node-devices", style: { gridTemplateColumns: `repeat(${columns}, var(--cell))` } }, devices),
          );
        });
        totals.devices += counts.devices;
        totals.allocated += counts.allocated;
        totals.failed += counts.failed;
        const free = counts.devices - counts.allocated - counts.failed;
        return el(
          "div",
          { class: "fabric", dataset: { fabric: fabric.index } },
          el(
            "div",
            { class: "fabric-head" },
            el("span", { class: "fabric-name" }, `pool ${pool.name} · fabric ${fabric.index}: ${fabric.name}`),
            el(
              "span",
              { class: "muted" },
              `${plural(counts.devices, "device")} · ${fmt(counts.allocated)} allocated · ${fmt(free)} free · ` +
                `${fmt(counts.failed)} failed`,
            ),
          ),
          el("div", { class: "nodes" }, nodes),
        );
      });
      return el("div", { class: "pool", dataset: { pool: pool.name } }, fabrics);
    });
    const matrix = $("matrix");
    matrix.replaceChildren(...poolNodes);
    if (!pools.length) {
      matrix.append(el("p", { class: "empty" }, "No matrix pools yet: `matrixstack matrix create --pool NAME --fabric cloudmatrix384`."));
    }
    const share = totals.devices ? Math.round((100 * totals.allocated) / (totals.devices - totals.failed || 1)) : 0;
    $("matrix-summary").textContent =
      `${plural(pools.length, "pool")} · ${plural(totals.devices, "device")} · ${share}% of healthy devices allocated`;

    const legend = deployments.map((d) =>
      el(
        "span",
        { class: "legend-item", dataset: { deployment: d.name, status: d.status } },
        el("span", { class: "swatch", style: { background: d.colour } }),
        el("span", { class: "legend-name" }, d.name),
        el(
          "span",
          { class: "muted" },
          `${d.kind} · ${d.status}${d.pool ? ` · ${d.pool}/slice ${d.slice_id}` : ""} · ${plural(held.get(d.name) || 0, "device")}`,
        ),
      ),
    );
    legend.push(el("span", { class: "legend-item" }, el("span", { class: "swatch free" }), "free"));
    if (totals.unassigned) {
      legend.push(el("span", { class: "legend-item" }, el("span", { class: "swatch unassigned" }), "slice, no deployment"));
    }
    legend.push(el("span", { class: "legend-item" }, el("span", { class: "swatch failed" }, "✕"), "failed"));
    $("legend").replaceChildren(...legend);
  }

  function deviceSquare(pool, fabric, node, d, colour) {
    const where = `pool ${pool} · fabric ${fabric.index} · node ${node.node} · device ${d.device}`;
    let title = `${where}: free`;
    let style = null;
    let classes = "device";
    if (d.state === "failed") {
      title = `${where}: FAILED`;
    } else if (d.state === "allocated" && d.deployment) {
      title = `${where}: ${d.deployment} (slice ${d.slice})`;
      style = { background: colour.get(d.deployment) || "#495057" };
    } else if (d.state === "allocated") {
      title = `${where}: slice ${d.slice}, no deployment`;
      classes += " unassigned";
    }
    return el(
      "div",
      {
        class: classes,
        title,
        style,
        dataset: { state: d.state, deployment: d.deployment || "", slice: d.slice ?? "", device: d.device },
      },
      d.state === "failed" ? "✕" : null,
    );
  }

  function renderCatalog(tree) {
    const counts = { L0: 0, L1: 0, L2: 0 };
    const branch = (entries) =>
      el(
        "ul",
        { class: "tree" },
        entries.map((entry) => {
          counts[entry.level] = (counts[entry.level] || 0) + 1;
          const row = el(
            "div",
            { class: "entry", dataset: { level: entry.level, name: entry.name } },
            el("span", { class: `badge level ${entry.level}` }, entry.level),
            el("span", { class: "entry-name" }, entry.name),
            el("span", { class: `badge provider ${entry.provider}` }, entry.provider),
            entry.backend_kind ? el("span", { class: "badge backend" }, entry.backend_kind) : null,
            entry.owner ? el("span", { class: "badge owner", title: "a private entry: only this tenant sees it" }, `private · ${entry.owner}`) : null,
          );
          const children = entry.children && entry.children.length ? branch(entry.children) : null;
          return el("li", {}, row, children);
        }),
      );
    const catalog = $("catalog");
    catalog.replaceChildren(branch(tree));
    if (!tree.length) catalog.append(el("p", { class: "empty" }, "No catalog entries yet: `matrixstack catalog add FILE`."));
    const total = counts.L0 + counts.L1 + counts.L2;
    $("catalog-summary").textContent = `${fmt(total)} ${total === 1 ? "entry" : "entries"} · ${counts.L0} L0 · ${counts.L1} L1 · ${counts.L2} L2`;
  }

  function renderUsage(usage, generatedAt) {
    const at = Date.parse(generatedAt) || Date.now();
    const last = rates[rates.length - 1];
    if (!last || last.at !== at) rates.push({ at, value: Number(usage.tokens_per_s || 0) });
    while (rates.length > HISTORY_POINTS) rates.shift();

    const windowS = usage.window_s || 60;
    const total = (usage.prompt_tokens || 0) + (usage.completion_tokens || 0);
    const stat = (name, value, label, detail) =>
      el(
        "div",
        { class: "stat", dataset: { stat: name } },
        el("div", { class: "stat-value", id: `usage-${name}` }, value),
        el("div", { class: "stat-label" }, label),
        detail ? el("div", { class: "stat-detail muted" }, detail) : null,
      );
    const stats = el(
      "div",
      { class: "stats" },
      stat("requests", fmt(usage.requests), "requests"),
      stat("tokens", fmt(total), "tokens", `${fmt(usage.prompt_tokens)} prompt · ${fmt(usage.completion_tokens)} completion`),
      stat("tokens_per_s", fmtRate(usage.tokens_per_s), "tokens / s"),
    );

    const byEntry = usage.by_entry || [];
    const most = Math.max(1, ...byEntry.map((e) => e.total_tokens));
    const table = el(
      "table",
      { class: "entries" },
      el("thead", {}, el("tr", {}, el("th", {}, "entry"), el("th", { class: "num" }, "requests"), el("th", { class: "num" }, "tokens"), el("th", {}, ""))),
      el(
        "tbody",
        {},
        byEntry.map((e) =>
          el(
            "tr",
            { class: "usage-entry", dataset: { entry: e.entry } },
            el("td", { class: "entry-name" }, e.entry),
            el("td", { class: "num" }, fmt(e.requests)),
            el("td", { class: "num" }, fmt(e.total_tokens)),
            el("td", { class: "bar-cell" }, el("span", { class: "bar", style: { width: `${(100 * e.total_tokens) / most}%` } })),
          ),
        ),
      ),
    );
    const parts = [stats, sparkline()];
    parts.push(byEntry.length ? table : el("p", { class: "empty" }, `No requests in the last ${windowS} s.`));
    const others = (usage.entries || 0) - byEntry.length;
    if (others > 0) parts.push(el("p", { class: "muted", id: "usage-more" }, `and ${fmt(others)} more ${others === 1 ? "entry" : "entries"} with fewer tokens`));
    $("usage").replaceChildren(...parts);
    $("usage-summary").textContent = `last ${windowS} s`;
  }

  function sparkline() {
    const width = 600;
    const height = 90;
    const pad = 4;
    const values = rates.map((r) => r.value);
    const peak = Math.max(...values, 1e-9);
    const top = peak * 1.15;
    const n = Math.max(values.length, 2);
    const points = (values.length === 1 ? [values[0], values[0]] : values).map((v, i) => [
      pad + ((width - 2 * pad) * i) / (n - 1),
      height - pad - ((height - 2 * pad) * v) / top,
    ]);
    const line = points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    const area = `${pad},${height - pad} ${line} ${(width - pad).toFixed(1)},${height - pad}`;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", class: "spark", role: "img" });
    chart.setAttribute("aria-label", "tokens per second, recent history");
    chart.append(svg("polygon", { points: area, class: "spark-area" }));
    chart.append(svg("polyline", { points: line, class: "spark-line" }));
    const seconds = Math.round((rates[rates.length - 1].at - rates[0].at) / 1000);
    return el(
      "div",
      { class: "spark-box" },
      el(
        "div",
        { class: "spark-head" },
        el("span", {}, "tokens / s"),
        el("span", { class: "muted" }, `peak ${fmtRate(peak < 1e-6 ? 0 : peak)} · ${seconds ? `last ${seconds} s` : "collecting…"}`),
      ),
      chart,
    );
  }

  // --- wiring -------------------------------------------------------------------------------------------------

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    $("key-input").value = "";
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    showError("");
    start();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    stop();
    showError("");
    showForm(true);
  });
  window.addEventListener("hashchange", () => {
    if (/(?:^#|&)key=/.test(location.hash)) {
      takeKeyFromHash();
      showError("");
      start();
    }
  });

  takeKeyFromHash();
  start();
})();

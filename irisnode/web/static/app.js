// The status page: fetch /status.json every second and draw it. No framework, no build step.
// Every value from the node goes in through textContent or an attribute, never as markup.
"use strict";

const REFRESH_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
let previous = null; // { status, at } of the last refresh, for the rates

function $(selector) {
  return document.querySelector(selector);
}

function element(tag, attributes = {}, text = null) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function row(cells, attributes = {}) {
  const tr = element("tr", attributes);
  for (const cell of cells) {
    tr.append(cell instanceof Node ? wrap(cell) : element("td", {}, String(cell)));
  }
  return tr;
}

function wrap(child) {
  const td = element("td");
  td.append(child);
  return td;
}

function path(object, dotted) {
  return dotted.split(".").reduce((value, key) => (value == null ? undefined : value[key]), object);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit += 1;
  }
  return `${n.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min`;
  if (s < 172800) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} days`;
}

// A peer's overlay address is "PORT HOST HOST..."; show where it listens as HOST:PORT.
function listenAddress(address) {
  if (!address) return "";
  const [port, host] = address.split(" ");
  if (!host) return `port ${port}`;
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

// Position on the ring: the id's fraction of the 128-bit space (first 52 bits are plenty).
function angle(nodeId) {
  return (parseInt(nodeId.slice(0, 13), 16) / 2 ** 52) * 2 * Math.PI - Math.PI / 2;
}

function roles(overlay) {
  const leaf = new Set([...overlay.leaf_set.left, ...overlay.leaf_set.right]);
  const table = new Set(Object.values(overlay.routing_table.rows).flat());
  return (id) => (leaf.has(id) ? "leaf" : table.has(id) ? "table" : "other");
}

function drawRing(overlay) {
  const svg = $("#ring");
  svg.replaceChildren(element("svg:circle", { class: "circle", cx: 0, cy: 0, r: 90 }));
  if (!overlay) {
    $("#ring-note").textContent = "Developer mode: no overlay (start the node with --net and --key).";
    return;
  }
  const role = roles(overlay);
  const at = (id, radius) => [radius * Math.cos(angle(id)), radius * Math.sin(angle(id))];
  const [sx, sy] = at(overlay.node_id, 90);
  const ids = new Set([
    ...overlay.peers.map((p) => p.node_id),
    ...overlay.leaf_set.left,
    ...overlay.leaf_set.right,
  ]);
  for (const id of ids) {
    const [x, y] = at(id, 90);
    const kind = role(id);
    svg.append(element("svg:line", { class: `chord ${kind}`, x1: sx, y1: sy, x2: x, y2: y }));
    const dot = element("svg:circle", { class: kind, cx: x, cy: y, r: 4, "data-node-id": id });
    dot.append(element("svg:title", {}, `${id} (${kind === "table" ? "routing table" : kind})`));
    svg.append(dot);
  }
  const self = element("svg:circle", { class: "self", cx: sx, cy: sy, r: 6 });
  self.append(element("svg:title", {}, `${overlay.node_id} (this node)`));
  svg.append(self);
  const [lx, ly] = at(overlay.node_id, 74); // inside the ring: never clipped
  svg.append(element("svg:text", { x: lx, y: ly + 2 }, overlay.node_id.slice(0, 8)));
  $("#ring-note").textContent = `${ids.size} other node${ids.size === 1 ? "" : "s"} known; ${
    overlay.routing_table.entries
  } routing-table entries.`;
}

function drawHeader(status) {
  const overlay = status.overlay;
  $("#version").textContent = `irisnode ${status.version}`;
  $("#uptime").textContent = duration(status.uptime);
  const state = $("#state");
  if (!overlay) {
    $("#node-id").textContent = "developer mode";
    $("#network").textContent = "";
    state.textContent = "no overlay";
    state.className = "badge";
    return;
  }
  $("#node-id").textContent = overlay.node_id;
  $("#network").textContent = `network ${overlay.network}`;
  const linked = overlay.peers.filter((p) => p.link === "up").length;
  const alone = linked === 0 && overlay.leaf_set.left.length + overlay.leaf_set.right.length === 0;
  state.textContent = alone ? "alone" : overlay.ready ? `joined · ${linked} linked` : "joining";
  state.className = `badge ${alone ? "bad" : overlay.ready ? "good" : ""}`;
}

function drawPeers(overlay) {
  const body = $("#peers tbody");
  const note = $("#peers-note");
  if (!overlay) {
    body.replaceChildren();
    $("#peer-count").textContent = "";
    note.textContent = "Developer mode: a network of one.";
    return;
  }
  const role = roles(overlay);
  const names = { leaf: "leaf set", table: "routing table", other: "linked" };
  body.replaceChildren(
    ...overlay.peers.map((peer) =>
      row(
        [
          element("code", {}, peer.node_id),
          element("span", { class: `link-${peer.link}` }, peer.link),
          names[role(peer.node_id)],
          listenAddress(peer.address),
        ],
        { "data-node-id": peer.node_id },
      ),
    ),
  );
  $("#peer-count").textContent = `(${overlay.peers.length})`;
  const failing = (overlay.dialling || []).filter((d) => d.failure);
  note.textContent = failing.length
    ? failing.map((d) => `${d.address}: ${d.failure}`).join("; ")
    : overlay.peers.length
      ? ""
      : "No peers yet.";
}

function where(sizes) {
  const others = sizes.other_nodes;
  return others === null || others === undefined
    ? `${sizes.here} here`
    : `${sizes.here} here, ${others} other node${others === 1 ? "" : "s"}`;
}

function drawGroups(groups) {
  const fill = (selector, entries, empty) => {
    const rows = Object.entries(entries || {}).sort(([a], [b]) => a.localeCompare(b));
    $(selector).replaceChildren(
      ...(rows.length ? rows.map(([name, n]) => row([name, where(n)])) : [row([empty, ""])]),
    );
  };
  fill("#clusters tbody", groups && groups.clusters, "no clusters");
  fill("#topics tbody", groups && groups.topics, "no topics");
  $("#groups-scope").textContent = groups && groups.scope === "node" ? "(this node)" : "";
}

function drawRates(status, now) {
  for (const cell of document.querySelectorAll("[data-rate]")) {
    const key = cell.dataset.rate;
    if (!previous || path(status, key) === undefined) {
      cell.textContent = "–";
      continue;
    }
    const seconds = (now - previous.at) / 1000;
    const rate = Math.max(0, (path(status, key) - path(previous.status, key)) / seconds);
    cell.textContent = cell.dataset.unit === "bytes" ? bytes(rate) : rate.toFixed(1);
  }
  $("#connections").textContent = status.relay.connections;
  $("#backlog").textContent = bytes(status.relay.backlog_bytes || 0);
}

function draw(status) {
  const now = performance.now();
  drawHeader(status);
  drawRing(status.overlay);
  drawPeers(status.overlay);
  drawGroups(status.groups);
  drawRates(status, now);
  previous = { status, at: now };
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function refresh() {
  try {
    const response = await fetch("status.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`status.json: HTTP ${response.status}`);
    draw(await response.json());
    $("#error").hidden = true;
  } catch (error) {
    const banner = $("#error");
    banner.textContent = `Cannot reach the node (${error.message}); retrying.`;
    banner.hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();

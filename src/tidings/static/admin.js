// tidings admin page: log in for a short-lived admin token, then call the server API with it.
// Everything shown is written as text (textContent), never as HTML.
"use strict";

const $ = (s) => document.querySelector(s);
// the page is served at <prefix>/admin: the API is at <prefix>/api/<method>
const BASE = location.pathname.replace(/\/admin\/?$/, "");
const KEY = "tidings-admin-token";
const REFRESH_MS = 3000;
let token = sessionStorage.getItem(KEY);
let timer = null;
let shownChannel = null;

class Expired extends Error {}

function show(loggedIn, message) {
  $("#login-view").hidden = loggedIn;
  $("#admin-view").hidden = !loggedIn;
  $("#logout").hidden = !loggedIn;
  $("#login-error").textContent = message || "";
  if (!loggedIn) {
    $("#summary").textContent = "";
    clearInterval(timer);
    timer = null;
  }
}

function logout(message) {
  token = null;
  sessionStorage.removeItem(KEY);
  show(false, message);
}

async function login(password) {
  let r;
  try {
    r = await fetch(BASE + "/admin/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ password }),
    });
  } catch (e) {
    return show(false, "cannot reach the server: " + e.message);
  }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const why = (body.error && body.error.message) || "HTTP " + r.status;
    const wait = r.headers.get("Retry-After");
    return show(false, why + (wait ? ` (retry in ${wait} s)` : ""));
  }
  token = body.token;
  sessionStorage.setItem(KEY, token);
  start();
}

// POST /api/<method>: the result, or an Error with the API's message; Expired on 401
async function api(method, params) {
  let r;
  try {
    r = await fetch(BASE + "/api/" + method, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
      body: JSON.stringify(params || {}),
    });
  } catch (e) {
    throw new Error("cannot reach the server: " + e.message);
  }
  if (r.status === 401) throw new Expired("session expired: log in again");
  const body = await r.json().catch(() => null);
  if (body === null) throw new Error("HTTP " + r.status + ": not a JSON answer");
  if (body.error) throw new Error(`${body.error.message} (code ${body.error.code})`);
  if (!r.ok) throw new Error("HTTP " + r.status);
  return body.result;
}

// run an action; an expired token sends the page back to the login form
async function guarded(action, onError) {
  try {
    return await action();
  } catch (e) {
    if (e instanceof Expired) logout(e.message);
    else onError(e.message);
  }
}

function cell(row, text, numeric) {
  const td = row.insertCell();
  td.textContent = text;
  if (numeric) td.className = "num";
  return td;
}

function uptime(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

async function refreshNodes() {
  const { nodes } = await api("info");
  const body = $("#nodes tbody");
  body.replaceChildren();
  let clients = 0;
  for (const n of nodes) {
    const items = (n.metrics && n.metrics.items) || {};
    const row = body.insertRow();
    row.dataset.uid = n.uid;
    cell(row, n.name);
    cell(row, n.version);
    cell(row, uptime(n.uptime), true);
    for (const v of [n.num_clients, n.num_users, n.num_channels, n.num_subs]) cell(row, v, true);
    for (const k of ["tidings_publications", "tidings_deliveries", "tidings_slow_clients"]) {
      cell(row, k in items ? items[k] : "-", true);
    }
    clients += n.num_clients;
  }
  $("#nodes-note").textContent = nodes.length === 1 ? "1 node" : `${nodes.length} nodes`;
  $("#summary").textContent = `${nodes.length} node${nodes.length === 1 ? "" : "s"}, ${clients} client${clients === 1 ? "" : "s"}`;
}

async function refreshChannels() {
  const pattern = $("#filter [name=pattern]").value.trim();
  const { channels } = await api("channels", pattern ? { pattern } : {});
  const names = Object.keys(channels).sort(
    (a, b) => channels[b].num_clients - channels[a].num_clients || (a < b ? -1 : 1));
  const body = $("#channels tbody");
  body.replaceChildren();
  for (const name of names) {
    const row = body.insertRow();
    row.dataset.channel = name;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link";
    button.textContent = name;
    button.addEventListener("click", () => openChannel(name));
    row.insertCell().append(button);
    cell(row, channels[name].num_clients, true);
    cell(row, channels[name].num_pubs ?? "-", true);
  }
  $("#channels-empty").hidden = names.length > 0;
}

function info(client) {
  const extra = client.conn_info === undefined ? "" : " " + JSON.stringify(client.conn_info);
  return `${client.user || "(anonymous)"} · ${client.client}${extra}`;
}

async function openChannel(name) {
  shownChannel = name;
  $("#open [name=channel]").value = name;
  $("#publish [name=channel]").value = name;
  $("#channel-detail").hidden = false;
  $("#channel-view h2").textContent = "Channel " + name;
  await showChannel();
}

async function showChannel() {
  const channel = shownChannel;
  if (channel === null) return;
  const presence = $("#presence"), history = $("#history");
  await guarded(async () => {
    const result = await api("presence", { channel });
    const clients = Object.values(result.presence);
    presence.replaceChildren(...clients.map((c) => {
      const li = document.createElement("li");
      li.textContent = info(c);
      return li;
    }));
    $("#presence-count").textContent = `${clients.length} client${clients.length === 1 ? "" : "s"}`;
    $("#presence-error").textContent = clients.length ? "" : "nobody is subscribed";
  }, (message) => {
    presence.replaceChildren();
    $("#presence-count").textContent = "";
    $("#presence-error").textContent = message;
  });
  await guarded(async () => {
    const result = await api("history", { channel, limit: 20, reverse: true });
    history.replaceChildren(...result.publications.map((p) => {
      const li = document.createElement("li");
      li.value = p.offset;
      li.textContent = JSON.stringify(p.data);
      return li;
    }));
    history.reversed = true;
    $("#history-position").textContent = `offset ${result.offset}, epoch ${result.epoch}`;
    $("#history-error").textContent = result.publications.length ? "" : "no publication kept";
  }, (message) => {
    history.replaceChildren();
    $("#history-position").textContent = "";
    $("#history-error").textContent = message;
  });
}

async function refresh() {
  await guarded(async () => {
    await refreshNodes();
    await refreshChannels();
    $("#status").textContent = "";
  }, (message) => { $("#status").textContent = message; });
}

function start() {
  show(true);
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

function result(selector, ok, text) {
  const el = $(selector);
  el.className = ok ? "ok" : "bad";
  el.textContent = text;
}

$("#login").addEventListener("submit", (e) => {
  e.preventDefault();
  const field = e.target.elements.password;
  login(field.value);
  field.value = "";
});

$("#logout").addEventListener("click", () => logout(""));

$("#filter").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });

$("#open").addEventListener("submit", (e) => {
  e.preventDefault();
  openChannel(e.target.elements.channel.value.trim());
});

$("#publish").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target.elements;
  const channel = f.channel.value.trim();
  let data = f.data.value;
  if (!f.text.checked) {
    try {
      data = JSON.parse(data);
    } catch (err) {
      return result("#publish-result", false, "not JSON (tick \"as text\" to send it as a string): " + err.message);
    }
  }
  await guarded(async () => {
    const r = await api("publish", { channel, data });
    result("#publish-result", true, `published to ${channel}: offset ${r.offset}, epoch ${r.epoch}`);
    if (channel === shownChannel) await showChannel();
  }, (message) => result("#publish-result", false, message));
});

$("#disconnect").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target.elements;
  const user = f.user.value.trim(), client = f.client.value.trim();
  await guarded(async () => {
    await api("disconnect", client ? { user, client } : { user });
    result("#disconnect-result", true, `disconnected ${client ? "client " + client + " of " : ""}user ${user}`);
    refresh();
  }, (message) => result("#disconnect-result", false, message));
});

$("#call").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target.elements;
  const out = $("#call-result");
  let params;
  try {
    params = JSON.parse(f.params.value || "{}");
  } catch (err) {
    out.textContent = "params are not JSON: " + err.message;
    return;
  }
  await guarded(async () => {
    out.textContent = JSON.stringify(await api(f.method.value, params), null, 2);
  }, (message) => { out.textContent = message; });
});

if (token) start(); else show(false);

// The inspector page (kasagi_relay/inspector.py serves it): joins a room through the relay's
// own /ws with the client at /kasagi-client.js, shows the state as a tree updated live, the
// seq, the deltas per second and the members, and sends deltas typed in. Room data is only
// ever written as text (textContent), never as HTML. A token is kept in this page's memory.
import { Client } from "/kasagi-client.js";

const $ = (id) => document.getElementById(id);
let client = null;
let room = null;
let applied = []; // [time, deltas] of recent changes, for deltas/s
let drawPending = false;

function log(text) {
  const line = `${new Date().toISOString().slice(11, 23)} ${text}\n`;
  const el = $("log");
  el.textContent = (line + el.textContent).slice(0, 20000);
}

function node(value, key) {
  const li = document.createElement("li");
  if (key !== undefined) {
    const k = document.createElement("span");
    k.className = "k";
    k.textContent = `${JSON.stringify(key)}: `;
    li.append(k);
  }
  if (value !== null && typeof value === "object") {
    const entries = Array.isArray(value) ? value.map((v, i) => [i, v]) : Object.entries(value);
    const details = document.createElement("details");
    details.open = true;
    const summary = document.createElement("summary");
    summary.textContent = Array.isArray(value) ? `[${entries.length}]` : `{${entries.length}}`;
    details.append(summary);
    const ul = document.createElement("ul");
    for (const [k, v] of entries.slice(0, 500)) ul.append(node(v, k));
    if (entries.length > 500) {
      const more = document.createElement("li");
      more.className = "muted";
      more.textContent = `… ${entries.length - 500} more`;
      ul.append(more);
    }
    details.append(ul);
    li.append(details);
  } else {
    const v = document.createElement("span");
    v.className = { string: "s", number: "n", boolean: "b" }[typeof value] ?? "z";
    v.textContent = JSON.stringify(value);
    li.append(v);
  }
  return li;
}

function draw() {
  drawPending = false;
  if (room === null) return;
  const ul = document.createElement("ul");
  ul.style.borderLeft = "none";
  ul.style.paddingLeft = "0";
  ul.append(node(room.state));
  $("tree").replaceChildren(ul);
  $("seq").textContent = String(room.seq);
  $("tree").dataset.seq = String(room.seq);
}

function schedule() {
  if (!drawPending) {
    drawPending = true;
    requestAnimationFrame(draw);
  }
}

function showMembers(members) {
  const ul = $("members");
  ul.replaceChildren();
  $("member-count").textContent = `(${members.length})`;
  for (const m of members) {
    const li = document.createElement("li");
    const who = m.sub === null || m.sub === undefined ? "anonymous" : m.sub;
    li.textContent = `${who} · ${m.conn}${m.info && Object.keys(m.info).length ? " " + JSON.stringify(m.info) : ""}`;
    ul.append(li);
  }
}

setInterval(() => {
  const now = performance.now();
  applied = applied.filter(([t]) => now - t < 1000);
  $("rate").textContent = String(applied.reduce((n, [, d]) => n + d, 0));
}, 250);

async function join(name) {
  if (client !== null) client.close();
  const token = $("token").value.trim();
  client = new Client("/ws", token ? { getToken: () => $("token").value.trim() } : {});
  client.on("status", (status) => {
    $("status").textContent = status;
    $("status").dataset.status = status;
    log(`status ${status}`);
  });
  client.on("error", (error) => log(`error: ${error.message}`));
  room = client.room(name, { presence: $("presence").checked });
  room.on("change", (_state, { from, seq }) => {
    applied.push([performance.now(), seq - from + 1]);
    schedule();
  });
  room.on("reset", (_state, { seq }) => {
    log(`state replaced at seq ${seq}`);
    schedule();
  });
  room.on("presence", showMembers);
  room.on("error", (error) => log(`room error: ${error.message}`));
  $("room-name").textContent = name;
  try {
    await room.join();
    log(`joined ${name} at seq ${room.seq}`);
    $("send-button").disabled = false;
    $("leave-button").disabled = false;
    draw();
  } catch (error) {
    log(`join failed: ${error.message}`);
  }
}

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("room").value.trim();
  const url = new URL(location.href);
  url.searchParams.set("room", name);
  history.replaceState(null, "", url);
  void join(name);
});

$("leave-button").addEventListener("click", async () => {
  if (room === null) return;
  await room.leave();
  log(`left ${room.name}`);
  $("send-button").disabled = true;
  $("leave-button").disabled = true;
});

$("send").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = $("result");
  result.className = "";
  let delta;
  try {
    delta = JSON.parse($("delta").value);
  } catch (error) {
    result.className = "error";
    result.textContent = `not JSON: ${error.message}`;
    return;
  }
  try {
    const { seq } = await room.send(delta);
    result.textContent = `acknowledged as seq ${seq}`;
  } catch (error) {
    result.className = "error";
    result.textContent = `${error.code ?? "error"}: ${error.message}`;
  }
});

// ?room=NAME joins at once: open the same link in two tabs to watch them converge.
const wanted = new URL(location.href).searchParams.get("room");
if (wanted) {
  $("room").value = wanted;
  void join(wanted);
}
window.inspector = { get client() { return client; }, get room() { return room; } };

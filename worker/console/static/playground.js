// Playground: pick a project, send a message, watch the answer stream in (v2 streaming through the
// console's MQTT client), with the session kept per browser, a reset and a cancel button. Answers are
// untrusted text: they reach the page through textContent only.
"use strict";
const chat = document.getElementById("chat");
const meta = document.getElementById("meta");
const projectSelect = document.getElementById("project");
const sendButton = document.getElementById("send");
const cancelButton = document.getElementById("cancel");
let session = localStorage.getItem("vw-session");
if (!session) {
  session = `pg-${Math.random().toString(36).slice(2, 10)}`;
  localStorage.setItem("vw-session", session);
}
let current = null;  // {project, requestId} while a request runs

function line(cls, text) {
  const div = document.createElement("div");
  div.className = `turn ${cls}`;
  div.textContent = text;
  chat.appendChild(div);
  return div;
}

function toolLine(answer, data) {
  // A tool call or its result, shown above the answer it leads to (text only: it is untrusted).
  const div = document.createElement("div");
  div.className = "turn tool";
  if (data.event === "toolCall") {
    const c = data.toolCall || {};
    div.textContent = `→ ${c.name}(${JSON.stringify(c.arguments)})` + (c.error ? ` [${c.error}]` : "");
  } else {
    const r = data.toolResult || {};
    div.textContent = `← ${r.name}: ${r.result}` + (r.ms !== undefined ? ` (${r.ms} ms)` : "");
  }
  div.dataset.event = data.event;
  chat.insertBefore(div, answer);
}

async function post(path, body) {
  const res = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  return res;
}

async function loadProjects() {
  const res = await fetch("/api/projects");
  const data = await res.json();
  document.getElementById("who").textContent = `clientId ${data.clientId}, session ${session}`;
  const chosen = projectSelect.value;
  projectSelect.replaceChildren();
  for (const p of data.projects) {
    const opt = document.createElement("option");
    opt.value = p;
    opt.textContent = p;
    projectSelect.appendChild(opt);
  }
  if (chosen) projectSelect.value = chosen;
  if (!data.projects.length) setTimeout(loadProjects, 1000);
}

function parseEvents(buffer, onEvent) {
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    let name = "message";
    let data = "";
    for (const l of block.split("\n")) {
      if (l.startsWith("event: ")) name = l.slice(7);
      else if (l.startsWith("data: ")) data += l.slice(6);
    }
    onEvent(name, JSON.parse(data));
  }
  return buffer;
}

async function ask(message) {
  const project = projectSelect.value;
  const requestId = `pg-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  current = { project, requestId };
  sendButton.disabled = true;
  cancelButton.disabled = false;
  line("user", message);
  const answer = line("assistant", "");
  answer.dataset.requestId = requestId;
  answer.dataset.state = "streaming";
  meta.textContent = "";
  const res = await post("/api/ask", { project, session, message, requestId });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (name, data) => {
      if (name === "chunk") {
        answer.textContent += data.delta;
      } else if (name === "tool") {
        toolLine(answer, data);
      } else if (name === "done") {
        for (const call of data.toolCalls || []) toolLine(answer, { event: "toolCall", toolCall: call });
        if (data.error) {
          answer.classList.add("error");
          answer.textContent += (answer.textContent ? " " : "") + `[${data.error.code}] ${data.error.message}`;
          answer.dataset.state = data.error.code;
        } else {
          answer.textContent += data.delta || "";
          answer.dataset.state = "done";
          answer.dataset.final = data.text;
        }
        const t = data.timing || {};
        const u = data.usage || {};
        meta.textContent = `worker ${data.worker || "-"}, model ${data.model || "-"}: TTFT ${t.ttftMs ?? "-"} ms, `
          + `total ${t.totalMs ?? "-"} ms, ${u.promptTokens ?? "-"} prompt + ${u.completionTokens ?? "-"} completion tokens`;
      } else if (name === "failed") {
        answer.classList.add("error");
        answer.textContent = data.message;
        answer.dataset.state = "failed";
      }
    });
  }
  current = null;
  sendButton.disabled = false;
  cancelButton.disabled = true;
}

document.getElementById("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("message");
  const message = input.value.trim();
  if (!message || current) return;
  input.value = "";
  ask(message);
});
cancelButton.addEventListener("click", () => {
  if (current) post("/api/cancel", current);
});
document.getElementById("reset").addEventListener("click", async () => {
  const res = await post("/api/reset", { project: projectSelect.value, session });
  const data = await res.json();
  line(data.reset ? "system" : "error", data.reset ? "(session reset)" : "(reset not confirmed)");
});
loadProjects();

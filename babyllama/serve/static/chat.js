// The chat page: keeps the conversation in the browser and streams each reply from
// /v1/chat/completions (server-sent events), showing tokens/s. No libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far (the server is stateless)
let modelName = null;
let controller = null;  // aborts the running request (Stop)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function checkHealth() {
  try {
    const r = await fetch("/health");
    const body = await r.json();
    modelName = body.model;
    $("model").textContent = body.model;
    $("status").textContent = r.ok ? "ready" : body.status + "…";
    $("status").classList.toggle("ready", r.ok);
    if (!r.ok) setTimeout(checkHealth, 1000);
  } catch (e) {
    $("status").textContent = "server unreachable";
    setTimeout(checkHealth, 2000);
  }
}

// Yields each server-sent event's data, however the network splits the stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

function errorText(body, status) {
  return (body && body.error && body.error.message) || ("HTTP " + status);
}

async function send(text) {
  $("error").textContent = "";
  history.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const request = {
    model: modelName || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
  };
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens) request.max_tokens = Number(maxTokens);

  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let first = null, chunks = 0, usage = null, content = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (e) { /* not JSON */ }
      throw new Error(errorText(body, r.status));
    }
    for await (const data of events(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (first === null) first = performance.now();
          chunks += 1;
          content += piece;
          reply.textContent = content;
          reply.scrollIntoView({ block: "end" });
          showStats(started, first, chunks, null);
        }
      }
    }
    showStats(started, first, chunks, usage);
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = e.message;
  } finally {
    reply.classList.remove("streaming");
    reply.dataset.done = "true";
    if (content) {
      history.push({ role: "assistant", content });
    } else {  // nothing came back: the turn is not part of the conversation
      history.pop();
      reply.remove();
      asked.classList.add("failed");
    }
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function showStats(started, first, chunks, usage) {
  const now = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;
  const parts = [];
  if (first !== null) {
    parts.push("first token " + ((first - started) / 1000).toFixed(2) + " s");
    const seconds = (now - first) / 1000;
    if (tokens > 1 && seconds > 0) parts.push(((tokens - 1) / seconds).toFixed(1) + " tokens/s");
  }
  parts.push(tokens + " tokens");
  $("stats").textContent = parts.join(" · ");
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").textContent = "";
  $("stats").textContent = "";
});
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
});
checkHealth();

// The chat page: streams /v1/chat/completions (server-sent events) and keeps the conversation here, in the
// page. No framework, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop"), status = $("status");
let history = [];      // OpenAI messages of this conversation (without the system prompt)
let model = null;
let controller = null; // aborts the reply being streamed

$("api-key").value = localStorage.getItem("kq-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("kq-api-key", $("api-key").value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { $("model").textContent = await errorText(r); return; }
    model = (await r.json()).data[0].id;
    $("model").textContent = model;
  } catch (e) { $("model").textContent = String(e); }
}

function bubble(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text || "";
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function busy(on) { send.disabled = on; stop.disabled = !on; }

function tools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  return JSON.parse(text);
}

// One reply: POST with stream: true, read the SSE lines as they arrive, and grow the assistant bubble.
async function reply() {
  const system = $("system").value.trim();
  const body = {
    model: model, stream: true, stream_options: { include_usage: true },
    messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  let toolList;
  try { toolList = tools(); } catch (e) { bubble("error", "Tools are not valid JSON: " + e.message); return; }
  if (toolList) { body.tools = toolList; body.tool_choice = $("tool-choice").value; }
  const div = bubble("assistant", "");
  const text = document.createElement("span");
  div.appendChild(text);
  const calls = [];   // {id, type, function: {name, arguments}}, with the element that shows each
  controller = new AbortController();
  busy(true);
  status.textContent = "";
  let finish = null, usage = null, started = performance.now(), first = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) { div.className = "msg error"; text.textContent = await errorText(r); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder("utf-8");  // stream: true keeps a split Korean syllable for the next read
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { div.className = "msg error"; text.textContent += "\n" + chunk.error.message; continue; }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (delta.content) { if (first === null) first = performance.now(); text.textContent += delta.content; }
          for (const tc of delta.tool_calls || []) {
            if (first === null) first = performance.now();
            if (!calls[tc.index]) {
              const el = document.createElement("code");
              el.className = "call";
              div.appendChild(el);
              calls[tc.index] = { id: tc.id, type: "function", function: { name: tc.function.name, arguments: "" }, el };
            }
            const call = calls[tc.index];
            call.function.arguments += (tc.function && tc.function.arguments) || "";
            call.el.textContent = "🔧 " + call.function.name + "(" + call.function.arguments + ")";
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        log.scrollTop = log.scrollHeight;
      }
      // Let clicks (Stop) and painting in between reads: a fast model fills the network buffer faster than
      // this loop drains it, and reads of buffered data would otherwise never give the page a turn.
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { div.className = "msg error"; text.textContent += "\n" + e; }
  } finally {
    busy(false);
    controller = null;
  }
  const message = { role: "assistant", content: text.textContent };
  if (calls.length) message.tool_calls = calls.map((c) => ({ id: c.id, type: c.type, function: c.function }));
  history.push(message);
  const meta = document.createElement("span");
  meta.className = "meta";
  const seconds = (performance.now() - started) / 1000;
  meta.textContent = [finish && "finish: " + finish, usage && usage.completion_tokens + " tokens",
    first !== null && "first token " + ((first - started) / 1000).toFixed(2) + " s",
    usage && (usage.completion_tokens / seconds).toFixed(1) + " tokens/s"].filter(Boolean).join(" · ");
  div.appendChild(meta);
  if (calls.length) status.textContent = "Tool calls: type each result as a message starting with /tool to send it back.";
}

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const content = input.value.trim();
  if (!content || controller) return;
  input.value = "";
  const last = history[history.length - 1];
  if (content.startsWith("/tool ") && last && last.tool_calls) {
    // A tool result for the first call still waiting for one.
    const answered = new Set(history.filter((m) => m.role === "tool").map((m) => m.tool_call_id));
    const call = last.tool_calls.find((c) => !answered.has(c.id)) || last.tool_calls[0];
    history.push({ role: "tool", tool_call_id: call.id, content: content.slice(6) });
    bubble("tool", call.function.name + " → " + content.slice(6));
  } else {
    history.push({ role: "user", content });
    bubble("user", content);
  }
  await reply();
});

// Enter sends, but not while an IME is composing a Korean syllable (that Enter commits the syllable).
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
stop.addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => { if (controller) controller.abort(); history = []; log.textContent = ""; status.textContent = ""; });

loadModel();

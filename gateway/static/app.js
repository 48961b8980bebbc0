// glmv-serve web page: image + question -> streamed answer over the gateway's SSE endpoint.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_IMAGE_BYTES = 10 * 1024 * 1024;
const state = { image: null, model: "glm-4.6v-flash", controller: null };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function authHeaders() {
  const key = $("api-key").value.trim();
  localStorage.setItem("glmv-api-key", key);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    if (r.ok) {
      const body = await r.json();
      if (body.data && body.data.length) state.model = body.data[0].id;
    } else if (r.status === 401) {
      needKey();
    }
  } catch (e) { /* the page still works with the default model id */ }
  $("model").textContent = state.model;
}

function needKey() {
  $("settings").open = true;
  $("api-key").focus();
  showError("This server needs an API key: enter it under Settings.");
}

function setImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError("That file is not an image (" + (file.type || "unknown type") + ")."); return; }
  if (file.size > MAX_IMAGE_BYTES) {
    showError(`The image is ${(file.size / 1048576).toFixed(1)} MiB, over the ${MAX_IMAGE_BYTES / 1048576} MiB limit.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("preview").src = reader.result;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    const size = file.size < 1024 ? `${file.size} B` : file.size < 1048576 ? `${(file.size / 1024).toFixed(0)} KiB`
      : `${(file.size / 1048576).toFixed(1)} MiB`;
    $("image-info").textContent = `${file.name || "pasted image"} · ${size}`;
    showError("");
  };
  reader.readAsDataURL(file);
}

function errorText(status, body) {
  const err = body && body.error;
  const message = err ? (typeof err === "string" ? err : err.message) : "";
  const prefix = { 400: "Invalid request", 401: "Authentication failed", 404: "Not found", 413: "Too large",
                   429: "Too many requests", 502: "Inference server error", 503: "Inference server unavailable",
                   504: "Inference server timed out" }[status] || `Error ${status}`;
  return message ? `${prefix}: ${message}` : prefix;
}

function renderStats(s) {
  const parts = [];
  if (s.ttft !== null) parts.push(`TTFT ${(s.ttft * 1000).toFixed(0)} ms`);
  if (s.tokens) parts.push(`${s.tokens} tokens`);
  // Decode rate over the streamed window; when everything arrived at once, over the whole request.
  const window = s.decodeSeconds >= 0.05 && s.tokens > 1 ? s.decodeSeconds : s.total;
  if (s.tokens && window > 0) {
    const rate = s.decodeSeconds >= 0.05 && s.tokens > 1 ? (s.tokens - 1) / window : s.tokens / window;
    parts.push(`${rate.toFixed(1)} tokens/s`);
  }
  parts.push(`total ${s.total.toFixed(2)} s`);
  if (s.finish) parts.push(`finish: ${s.finish}`);
  $("stats").innerHTML = parts.map((p) => `<span>${p}</span>`).join("");
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) { showError("Please type a question."); return; }
  showError("");
  const content = [];
  if (state.image) content.push({ type: "image_url", image_url: { url: state.image } });
  content.push({ type: "text", text: question });
  const body = {
    model: state.model,
    messages: [{ role: "user", content }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 512,
    temperature: parseFloat($("temperature").value) || 0,
    chat_template_kwargs: { enable_thinking: $("thinking").checked },
  };
  const answer = $("answer"), reasoning = $("reasoning");
  answer.textContent = ""; reasoning.textContent = "";
  $("reasoning-box").hidden = true; $("reasoning-box").open = false;
  answer.classList.add("streaming");
  $("send").disabled = true; $("stop").hidden = false;
  const controller = new AbortController();
  state.controller = controller;
  const started = performance.now();
  const stats = { ttft: null, tokens: 0, decodeSeconds: 0, total: 0, finish: "" };
  let firstAt = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    if (!r.ok) {
      let payload = null;
      try { payload = await r.json(); } catch (e) { /* not JSON */ }
      if (r.status === 401) $("settings").open = true;
      const retry = r.headers.get("Retry-After");
      throw new Error(errorText(r.status, payload) + (retry ? ` (retry in ${retry} s)` : ""));
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false, chunks = 0;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, { stream: true });
      let sep;
      while ((sep = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, sep); buffer = buffer.slice(sep + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data) continue;
        if (data === "[DONE]") { done = true; break; }
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(errorText(0, msg).replace(/^Error 0/, "Error"));
        if (msg.usage) stats.tokens = msg.usage.completion_tokens;
        const choice = msg.choices && msg.choices[0];
        if (!choice) continue;
        const delta = choice.delta || {};
        const piece = (delta.content || "") + (delta.reasoning_content || "");
        if (piece) {
          const now = performance.now();
          if (firstAt === null) { firstAt = now; stats.ttft = (now - started) / 1000; }
          chunks += 1;
          stats.decodeSeconds = (now - firstAt) / 1000;
        }
        if (delta.reasoning_content) { $("reasoning-box").hidden = false; reasoning.textContent += delta.reasoning_content; }
        if (delta.content) answer.textContent += delta.content;
        if (choice.finish_reason) stats.finish = choice.finish_reason;
        stats.total = (performance.now() - started) / 1000;
        if (!stats.tokens) { stats.tokens = chunks; }
        renderStats(stats);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stats.finish = "stopped";
    else showError(e.message.startsWith("Failed to fetch") ? "Cannot reach the server." : e.message);
  } finally {
    answer.classList.remove("streaming");
    stats.total = (performance.now() - started) / 1000;
    renderStats(stats);
    $("send").disabled = false; $("stop").hidden = true;
    state.controller = null;
  }
}

function init() {
  $("api-key").value = localStorage.getItem("glmv-api-key") || "";
  const drop = $("drop"), file = $("file");
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  file.addEventListener("change", () => setImage(file.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setImage(e.dataTransfer.files[0]); });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) setImage(item.getAsFile());
  });
  $("ask").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit(); });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  loadModel();
}

init();

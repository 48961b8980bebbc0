// glmv-serve web page: a conversation about images over the gateway's OpenAI-compatible SSE endpoint.
//
// `state.messages` is the OpenAI message history, resent whole with every question: each user turn
// carries the images added before it (so follow-ups keep them, and the engine's prefix cache makes the
// repeated prefix cheap), each assistant turn its answer text. A question that fails is taken back out
// of the thread and returned to the composer; a stopped answer stays in the history as far as its answer
// text got (one stopped before any answer text is taken back like a failure).
// Answers are Markdown: marked renders them with raw HTML shown as text and images shown as their alt
// text (no requests to addresses the model names), then DOMPurify keeps only the tags listed below.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_IMAGE_BYTES = 10 * 1024 * 1024;
const RATE_MIN_TOKENS = 4; // tokens after the first before a decode rate is shown ...
const RATE_MIN_SECONDS = 0.2; // ... and seconds between the first and the last of them
const SAFE_TAGS = ["a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li",
  "ol", "p", "pre", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"];
const SAFE_ATTRS = ["href", "title", "start", "align"];
const state = { model: "glm-4.6v-flash", messages: [], pending: [], controller: null, conversation: 0 };

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const markdown = new marked.Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html: (token) => escapeHtml(token.text),
    image: (token) => escapeHtml(token.text || token.href),
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
});

function renderMarkdown(text) {
  return DOMPurify.sanitize(markdown.parse(text), { ALLOWED_TAGS: SAFE_TAGS, ALLOWED_ATTR: SAFE_ATTRS }).trim();
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

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

function formatBytes(n) {
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(0)} KiB` : `${(n / 1048576).toFixed(1)} MiB`;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addImages(files) {
  const errors = [];
  for (const file of files) {
    const name = file.name || "pasted image";
    if (!file.type.startsWith("image/")) { errors.push(`${name} is not an image (${file.type || "unknown type"}).`); continue; }
    if (file.size > MAX_IMAGE_BYTES) {
      errors.push(`${name} is ${(file.size / 1048576).toFixed(1)} MiB, over the ${MAX_IMAGE_BYTES / 1048576} MiB limit.`);
      continue;
    }
    state.pending.push({ url: await readAsDataUrl(file), name, size: file.size });
  }
  showError(errors.join(" "));
  renderPending();
}

function renderPending() {
  const list = $("attachments");
  list.replaceChildren(...state.pending.map((image, i) => {
    const item = el("li", "thumb");
    const img = el("img");
    img.src = image.url; img.alt = image.name; img.title = `${image.name} · ${formatBytes(image.size)}`;
    const remove = el("button", "remove", "×");
    remove.type = "button"; remove.title = `Remove ${image.name}`; remove.setAttribute("aria-label", remove.title);
    remove.addEventListener("click", () => { state.pending.splice(i, 1); renderPending(); });
    item.append(img, remove);
    return item;
  }));
  $("drop").classList.toggle("has-images", state.pending.length > 0);
}

function appendUserTurn(question, images) {
  const li = el("li", "turn user");
  if (images.length) {
    const row = el("div", "turn-images");
    for (const image of images) {
      const img = el("img");
      img.src = image.url; img.alt = image.name; img.title = image.name;
      row.append(img);
    }
    li.append(row);
  }
  li.append(el("div", "question", question));
  $("thread").append(li);
  $("empty").hidden = true;
  return li;
}

function appendAssistantTurn() {
  const li = el("li", "turn assistant");
  const reasoningBox = el("details", "reasoning-box");
  reasoningBox.hidden = true;
  reasoningBox.append(el("summary", "", "Reasoning · 思考过程"));
  const reasoning = el("div", "reasoning");
  reasoningBox.append(reasoning);
  const answer = el("div", "answer markdown streaming");
  const footer = el("div", "turn-footer");
  const stats = el("div", "stats");
  const copy = el("button", "copy secondary", "Copy");
  copy.type = "button"; copy.hidden = true;
  footer.append(stats, copy);
  li.append(reasoningBox, answer, footer);
  $("thread").append(li);
  $("empty").hidden = true;
  const turn = { li, reasoningBox, reasoning, answer, stats, copy, text: "", pending: false };
  copy.addEventListener("click", () => copyText(turn.text, copy));
  return turn;
}

function renderAnswer(turn) {
  turn.pending = false;
  turn.answer.innerHTML = renderMarkdown(turn.text);
}

function scheduleAnswer(turn) {
  if (turn.pending) return;
  turn.pending = true;
  requestAnimationFrame(() => { if (turn.pending) renderAnswer(turn); });
}

async function copyText(text, button) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
    } else { // plain http on another host has no Clipboard API
      const area = el("textarea");
      area.value = text; area.style.position = "fixed"; area.style.opacity = "0";
      document.body.append(area); area.select();
      const ok = document.execCommand("copy");
      area.remove();
      if (!ok) throw new Error("copy refused");
    }
    button.textContent = "Copied";
  } catch (e) {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function errorText(status, body) {
  const err = body && body.error;
  const message = err ? (typeof err === "string" ? err : err.message) : "";
  const prefix = { 400: "Invalid request", 401: "Authentication failed", 404: "Not found", 413: "Too large",
                   429: "Too many requests", 502: "Inference server error", 503: "Inference server unavailable",
                   504: "Inference server timed out" }[status] || `Error ${status}`;
  return message ? `${prefix}: ${message}` : prefix;
}

function decodeRate(s) {
  if (s.cacheHit || s.tokens - 1 < RATE_MIN_TOKENS || s.decodeSeconds < RATE_MIN_SECONDS) return null;
  return (s.tokens - 1) / s.decodeSeconds;
}

function renderStats(target, s) {
  const parts = [];
  if (s.cacheHit) parts.push(["badge", "from the response cache"]);
  else if (s.ttft !== null) parts.push(["", `TTFT ${(s.ttft * 1000).toFixed(0)} ms`]);
  if (s.tokens) parts.push(["", `${s.tokens} ${s.tokens === 1 ? "token" : "tokens"}`]);
  const rate = decodeRate(s);
  if (rate !== null) parts.push(["", `${rate.toFixed(1)} tokens/s`]);
  if (s.cachedPromptTokens > 0) parts.push(["", `${s.cachedPromptTokens} of ${s.promptTokens} prompt tokens cached`]);
  parts.push(["", `total ${s.total.toFixed(2)} s`]);
  if (s.finish) parts.push(["", `finish: ${s.finish}`]);
  target.replaceChildren(...parts.map(([className, text]) => el("span", className, text)));
}

// Streams one answer into `turn`; resolves with the finish reason, rejects with the error to show.
async function streamAnswer(body, turn, stats, signal) {
  const started = performance.now();
  const r = await fetch("/v1/chat/completions", {
    method: "POST", signal,
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
  stats.cacheHit = r.headers.get("x-glmv-cache") === "hit";
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", pieces = 0, firstAt = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return stats.finish;
    buffer += decoder.decode(value, { stream: true });
    let sep;
    while ((sep = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, sep); buffer = buffer.slice(sep + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (!data) continue;
      if (data === "[DONE]") return stats.finish;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(errorText(0, msg).replace(/^Error 0/, "Error"));
      if (msg.usage) {
        stats.tokens = msg.usage.completion_tokens;
        stats.promptTokens = msg.usage.prompt_tokens;
        stats.cachedPromptTokens = (msg.usage.prompt_tokens_details || {}).cached_tokens || 0;
      }
      const choice = msg.choices && msg.choices[0];
      if (choice) {
        const delta = choice.delta || {};
        if (delta.content || delta.reasoning_content) {
          const now = performance.now();
          if (firstAt === null) { firstAt = now; stats.ttft = (now - started) / 1000; }
          pieces += 1;
          stats.tokens = pieces; // a lower bound until usage arrives: one piece carries one or more tokens
          stats.decodeSeconds = (now - firstAt) / 1000;
        }
        if (delta.reasoning_content) { turn.reasoningBox.hidden = false; turn.reasoning.textContent += delta.reasoning_content; }
        if (delta.content) { turn.text += delta.content; scheduleAnswer(turn); }
        if (choice.finish_reason) stats.finish = choice.finish_reason;
      }
      stats.total = (performance.now() - started) / 1000;
      renderStats(turn.stats, stats);
    }
  }
}

async function ask(event) {
  event.preventDefault();
  if (state.controller) return;
  const question = $("question").value.trim();
  if (!question) { showError("Please type a question."); return; }
  showError("");
  const images = state.pending;
  const content = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  content.push({ type: "text", text: question });
  const userMessage = { role: "user", content };
  const body = {
    model: state.model,
    messages: [...state.messages, userMessage],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 512,
    temperature: parseFloat($("temperature").value) || 0,
    chat_template_kwargs: { enable_thinking: $("thinking").checked },
  };
  state.pending = []; renderPending();
  $("question").value = "";
  const userTurn = appendUserTurn(question, images);
  const turn = appendAssistantTurn();
  userTurn.scrollIntoView({ block: "nearest" });
  $("send").disabled = true; $("stop").hidden = false;
  const controller = new AbortController();
  state.controller = controller;
  const conversation = state.conversation;
  const stats = { ttft: null, tokens: 0, decodeSeconds: 0, total: 0, finish: "", cacheHit: false,
                  promptTokens: 0, cachedPromptTokens: 0 };
  let failure = null;
  const started = performance.now();
  try {
    await streamAnswer(body, turn, stats, controller.signal);
  } catch (e) {
    if (e.name === "AbortError") stats.finish = "stopped";
    else failure = e.message.startsWith("Failed to fetch") ? "Cannot reach the server." : e.message;
  }
  state.controller = null;
  $("send").disabled = false; $("stop").hidden = true;
  if (conversation !== state.conversation) return; // New conversation was pressed: this one is gone
  stats.total = (performance.now() - started) / 1000;
  renderAnswer(turn);
  turn.answer.classList.remove("streaming");
  const isKept = !failure && (stats.finish !== "stopped" || turn.text !== "");
  if (isKept) {
    state.messages.push(userMessage, { role: "assistant", content: turn.text });
    renderStats(turn.stats, stats);
    turn.copy.hidden = !turn.text;
  } else { // nothing came back: give the question and its images back to the composer
    userTurn.remove(); turn.li.remove();
    $("empty").hidden = state.messages.length > 0;
    $("question").value = question;
    state.pending = images.concat(state.pending); renderPending();
    showError(failure || "");
  }
  $("question").placeholder = state.messages.length ? "Ask a follow-up question · 继续提问" : "What is in this picture? · 图片里有什么？";
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.conversation += 1;
  state.messages = []; state.pending = [];
  renderPending();
  $("thread").replaceChildren();
  $("empty").hidden = false;
  $("question").value = "";
  $("question").placeholder = "What is in this picture? · 图片里有什么？";
  showError("");
  $("question").focus();
}

function init() {
  $("api-key").value = localStorage.getItem("glmv-api-key") || "";
  const drop = $("drop"), file = $("file");
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  file.addEventListener("change", () => { addImages([...file.files]); file.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addImages([...e.dataTransfer.files]); });
  document.addEventListener("paste", (e) => {
    const files = [...((e.clipboardData && e.clipboardData.files) || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) { e.preventDefault(); addImages(files); }
  });
  $("ask").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit();
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-conversation").addEventListener("click", newConversation);
  loadModel();
}

init();

// The chat page of `kiln serve`: plain JS, no build step, nothing loaded from elsewhere.
// It talks to the same OpenAI-compatible API any client uses (relative URLs, so it also works behind
// a path prefix): GET v1/models, POST v1/chat/completions with stream=true, read as server-sent events.
"use strict";

const KEY_ITEM = "kiln-api-key"; // sessionStorage only: the key lives as long as this tab
const $ = (id) => document.getElementById(id);

const state = {
  history: [],        // the conversation: {role, content}, system prompt excluded (added per request)
  controller: null,   // AbortController of the stream in flight
};

// --- the API key -------------------------------------------------------------------------------
function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

class NeedKey extends Error {}

function askForKey(message) {
  $("key-error").textContent = message || "";
  $("key-overlay").hidden = false;
  $("key").focus();
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $("key").value = "";
  $("key-overlay").hidden = true;
  loadModels();
});

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: authHeaders() });
  if (resp.status === 401) {
    const had = sessionStorage.getItem(KEY_ITEM);
    sessionStorage.removeItem(KEY_ITEM);
    askForKey(had ? "That key was refused." : "");
    throw new NeedKey("API key required");
  }
  return resp;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

// --- models ------------------------------------------------------------------------------------
async function loadModels() {
  setStatus("connecting…");
  try {
    const resp = await api("v1/models");
    if (!resp.ok) throw new Error(await errorText(resp));
    const body = await resp.json();
    const select = $("model");
    const previous = select.value;
    select.replaceChildren();
    for (const m of body.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.kiln && m.kiln.format ? `${m.id} (${m.kiln.format})` : m.id;
      select.append(opt);
    }
    if (previous && body.data.some((m) => m.id === previous)) select.value = previous;
    select.dataset.loaded = "true";
    setStatus(body.data.length ? "" : "no model served");
  } catch (err) {
    if (!(err instanceof NeedKey)) setStatus("cannot list models: " + err.message, true);
    else setStatus("API key required", true);
  }
}

function setStatus(text, bad = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

// --- rendering ---------------------------------------------------------------------------------
function addMessage(role, text) {
  $("empty").hidden = true;
  const msg = document.createElement("div");
  msg.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "you" : role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  msg.append(who, body);
  $("log").append(msg);
  scrollDown();
  return msg;
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function addMeta(msg, text, cls = "meta") {
  const el = document.createElement("div");
  el.className = cls;
  el.textContent = text;
  msg.append(el);
  return el;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const fmt = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

function showReport(msg, report) {
  const box = document.createElement("div");
  box.className = "posterior";
  const head = document.createElement("div");
  head.className = "posterior-head";
  if (report.sampler === "smc") {
    head.textContent = `SMC posterior · ${report.particles} particles · ESS ${fmt(report.ess, 2)} · ` +
      `log Ẑ ${fmt(report.log_z, 3)} · ${plural(report.steps, "step")}, ${plural(report.resample_steps, "resample")}`;
    box.append(head);
    const table = document.createElement("table");
    for (const item of report.posterior || []) {
      const tr = document.createElement("tr");
      const answer = document.createElement("td");
      answer.className = "answer";
      const code = document.createElement("code");
      code.textContent = item.text;
      answer.append(code);
      const barCell = document.createElement("td");
      barCell.className = "bar";
      const bar = document.createElement("span");
      bar.style.width = (100 * item.probability).toFixed(1) + "%";
      barCell.append(bar);
      const p = document.createElement("td");
      p.className = "p";
      p.textContent = (100 * item.probability).toFixed(1) + "%";
      tr.append(answer, barCell, p);
      table.append(tr);
    }
    if (!(report.posterior || []).length) {
      const tr = document.createElement("tr");
      tr.textContent = "no particle finished within max tokens";
      table.append(tr);
    }
    box.append(table);
  } else {
    head.textContent = `mask-only decoding · ${plural(report.samples, "sample")} · ${report.failed} failed · ` +
      `${plural(report.steps, "step")} (no weights: not an exact draw)`;
    box.append(head);
  }
  msg.append(box);
  scrollDown();
}

// --- one request -------------------------------------------------------------------------------
function readNumber(id) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const x = Number(raw);
  if (!Number.isFinite(x)) throw new Error(`${id}: not a number`);
  return x;
}

function buildRequest() {
  const model = $("model").value;
  if (!model) throw new Error("no model selected");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = readNumber("temperature");
  if (temperature !== null) body.temperature = temperature;
  const maxTokens = readNumber("max-tokens");
  if (maxTokens !== null) body.max_tokens = Math.round(maxTokens);
  const kind = $("constraint-kind").value;
  const value = $("constraint").value.trim();
  let constraint = null;
  if (kind && value) {
    const kiln = { sampler: $("sampler").value };
    const particles = readNumber("particles");
    if (particles !== null) kiln.particles = Math.round(particles);
    if (kind === "regex") {
      kiln.regex = value;
    } else {
      let schema;
      try {
        schema = JSON.parse(value);
      } catch (err) {
        throw new Error("the JSON schema does not parse: " + err.message);
      }
      body.response_format = { type: "json_schema", json_schema: { name: "page", schema } };
    }
    body.kiln = kiln;
    constraint = kind === "regex" ? "regex" : "JSON schema";
  }
  return { body, constraint };
}

function handleEvent(data, out) {
  if (data === "[DONE]") {
    out.done = true;
    return;
  }
  const obj = JSON.parse(data);
  if (obj.error) throw new Error(obj.error.message || "server error");
  for (const choice of obj.choices || []) {
    if (choice.index !== 0) continue;
    const delta = choice.delta || {};
    if (delta.content) {
      out.text += delta.content;
      out.el.textContent = out.text;
      scrollDown();
    }
    if (choice.finish_reason) out.finish = choice.finish_reason;
  }
  if (obj.kiln) out.report = obj.kiln;
  if (obj.usage) out.usage = obj.usage;
}

async function send(text) {
  let request;
  try {
    request = buildRequest();
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  setStatus("");
  state.history.push({ role: "user", content: text });
  request.body.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const msg = addMessage("assistant", "");
  msg.classList.add("streaming");
  if (request.constraint) {
    msg.dataset.constraint = request.constraint;
    addMeta(msg, `sampling a ${request.constraint}-constrained answer…`, "meta pending");
  }
  const out = { text: "", el: msg.querySelector(".text"), finish: null, report: null, usage: null, done: false };
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  const t0 = performance.now();
  let outcome = "done";
  try {
    const resp = await api("v1/chat/completions", {
      method: "POST", body: JSON.stringify(request.body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (!out.done) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) handleEvent(data, out);
      }
    }
    if (!out.done) throw new Error("the stream ended early");
  } catch (err) {
    if (err.name === "AbortError") outcome = "stopped";
    else {
      outcome = "error";
      addMeta(msg, err instanceof NeedKey ? "API key required: enter it and send again." : err.message,
        "meta error");
    }
  } finally {
    state.controller = null;
    busy(false);
    msg.classList.remove("streaming");
    const pending = msg.querySelector(".pending");
    if (pending) pending.remove();
  }
  msg.dataset.state = outcome;
  if (outcome !== "done" && !out.text) {
    state.history.pop(); // nothing answered: the turn is left out of the conversation
    msg.classList.add("void");
    if (outcome === "stopped") addMeta(msg, "stopped before any text");
    return;
  }
  state.history.push({ role: "assistant", content: out.text });
  const seconds = ((performance.now() - t0) / 1000).toFixed(1);
  const parts = [];
  if (outcome === "stopped") parts.push("stopped");
  else if (out.finish) parts.push(out.finish === "length" ? "cut at max tokens" : "finished");
  if (out.usage) parts.push(plural(out.usage.completion_tokens, "token"));
  parts.push(`${seconds} s`);
  if (request.constraint) parts.push(request.constraint);
  addMeta(msg, parts.join(" · "));
  if (out.report) showReport(msg, out.report);
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  document.body.classList.toggle("busy", on);
}

// --- wiring ------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (state.controller) return;
  const text = $("input").value;
  if (!text.trim()) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
});

$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  for (const el of [...document.querySelectorAll("#log .msg")]) el.remove();
  $("empty").hidden = false;
});

$("constraint-kind").addEventListener("change", () => {
  const kind = $("constraint-kind").value;
  $("constraint").placeholder = kind === "json_schema"
    ? '{"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}'
    : "(Yes|No)\\.";
});

loadModels();

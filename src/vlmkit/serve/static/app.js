// vlmkit chat page: talks only to the public API (/v1/models, /v1/chat/completions), no external assets.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], image: null, model: null, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

async function errorMessage(response) {
  // The API's own message, never a generic "network error".
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status + " " + response.statusText;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) { $("model").textContent = await errorMessage(response); return; }
    const body = await response.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    $("model").textContent = "server unreachable: " + e.message;
  }
}

function setImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(file.name + " is not an image"); return; }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data: URL
    $("preview").src = state.image;
    $("preview").hidden = false;
    $("remove-image").hidden = false;
    $("drop-hint").hidden = true;
  };
  reader.readAsDataURL(file);
}

function removeImage() {
  state.image = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("remove-image").hidden = true;
  $("drop-hint").hidden = false;
  $("file").value = "";
}

function render() {
  const box = $("conversation");
  box.innerHTML = "";
  for (const m of state.messages) {
    const div = document.createElement("div");
    div.className = "turn " + m.role;
    if (Array.isArray(m.content)) {
      for (const part of m.content) {
        if (part.type === "image_url") {
          const img = document.createElement("img");
          img.src = part.image_url.url;
          img.alt = "your image";
          div.appendChild(img);
        } else {
          div.appendChild(document.createTextNode(part.text));
        }
      }
    } else {
      div.appendChild(document.createTextNode(m.content));
    }
    box.appendChild(div);
  }
  $("regenerate").disabled = !state.messages.some((m) => m.role === "assistant");
}

async function complete() {
  clearError();
  const answer = { role: "assistant", content: "" };
  const request = {
    model: state.model,
    messages: state.messages.map((m) => ({ role: m.role, content: m.content })),
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  state.controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) { showError(await errorMessage(response)); return false; }
    state.messages.push(answer);
    render();
    const bubble = $("conversation").lastChild;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { showError(chunk.error.message); continue; }
        const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
        if (delta) { answer.content += delta; bubble.textContent = answer.content; }
      }
    }
    return true;
  } catch (e) {
    if (e.name !== "AbortError") showError("the request failed: " + e.message);
    return false;
  } finally {
    $("send").disabled = false; $("stop").disabled = true;
    state.controller = null;
    render();
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  const content = [];
  if (state.image) content.push({ type: "image_url", image_url: { url: state.image } });
  content.push({ type: "text", text });
  state.messages.push({ role: "user", content });
  render();
  const ok = await complete();
  if (ok) { $("prompt").value = ""; removeImage(); }
  else { state.messages.pop(); render(); }
}

async function regenerate() {
  while (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") state.messages.pop();
  render();
  await complete();
}

function setup() {
  $("composer").addEventListener("submit", send);
  $("file").addEventListener("change", () => setImage($("file").files[0]));
  $("remove-image").addEventListener("click", removeImage);
  $("regenerate").addEventListener("click", regenerate);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => { state.messages = []; clearError(); removeImage(); render(); });
  $("api-key").addEventListener("change", loadModel);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    setImage(e.dataTransfer.files[0]);
  });
  loadModel();
}

setup();

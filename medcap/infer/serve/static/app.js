// medcap web page: choose or drop images, see each one with its caption.
// Plain JavaScript, no build step and nothing fetched from outside this server.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const dropZone = $("drop-zone");
  const fileInput = $("file-input");
  const optionsForm = $("options-form");
  const button = $("caption-button");
  const statusBox = $("status");
  const errorBox = $("error");
  const results = $("results");
  const template = $("result-template");
  const tokenRow = $("token-row");
  const tokenInput = $("token-input");

  // Formats a browser can draw itself; anything else (DICOM, TIFF) shows the server's PNG preview.
  const BROWSER_TYPES = ["image/jpeg", "image/png", "image/gif", "image/webp"];
  const BROWSER_EXT = /\.(jpe?g|png|gif|webp)$/i;

  let currentFiles = [];
  let objectUrls = [];

  tokenInput.value = sessionStorage.getItem("medcap-token") || "";
  tokenInput.addEventListener("change", () => {
    sessionStorage.setItem("medcap-token", tokenInput.value);
    loadModelInfo();
  });

  function authHeaders() {
    const t = tokenInput.value.trim();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  async function loadModelInfo() {
    const infoBox = $("model-info");
    try {
      const r = await fetch("/v1/model", { headers: authHeaders() });
      if (r.status === 401) {
        tokenRow.hidden = false;
        infoBox.textContent = "this service needs an access token";
        return;
      }
      const info = await r.json();
      if (!r.ok) {
        infoBox.textContent = "model information unavailable: " + (info.detail || r.status);
        return;
      }
      let text = "model: " + (info.base || "?");
      if (info.adapter) text += " + adapter " + info.adapter;
      text += " \u00b7 medcap " + info.medcap_version;
      infoBox.textContent = text;
      // Show the server's defaults as placeholders, so an empty field visibly means "default".
      for (const [name, value] of Object.entries(info.generate_defaults || {})) {
        const input = optionsForm.elements[name];
        if (!input) continue;
        if (input.type === "checkbox") input.checked = Boolean(value);
        else input.placeholder = String(value);
      }
      const limits = info.limits || {};
      if (limits.max_beams) optionsForm.elements.num_beams.max = limits.max_beams;
      if (limits.max_new_tokens) optionsForm.elements.max_new_tokens.max = limits.max_new_tokens;
    } catch (e) {
      infoBox.textContent = "could not reach the service: " + e;
    }
  }

  function browserCanShow(file) {
    return BROWSER_TYPES.includes(file.type) || (!file.type && BROWSER_EXT.test(file.name));
  }

  function optionFields() {
    const out = [];
    for (const input of optionsForm.elements) {
      if (!input.name) continue;
      if (input.type === "checkbox") {
        out.push([input.name, input.checked ? "true" : "false"]);
      } else if (input.value.trim() !== "") {
        out.push([input.name, input.value.trim()]);
      }
    }
    return out;
  }

  function describeTimings(r) {
    const t = r.timings || {};
    const parts = [r.format.toUpperCase() + " " + r.width + "\u00d7" + r.height];
    if (t.generate_ms !== undefined) parts.push("generate " + Math.round(t.generate_ms) + " ms");
    if (t.batch_size !== undefined) parts.push("batch of " + t.batch_size);
    if (t.queue_ms !== undefined) parts.push("queued " + Math.round(t.queue_ms) + " ms");
    return parts.join(" \u00b7 ");
  }

  async function captionOne(file, card) {
    const img = card.querySelector("img");
    const captionEl = card.querySelector(".caption");
    const meta = card.querySelector(".meta");
    const local = browserCanShow(file);
    if (local) {
      const url = URL.createObjectURL(file);
      objectUrls.push(url);
      img.src = url;
    }
    const body = new FormData();
    body.append("files", file, file.name);
    for (const [k, v] of optionFields()) body.append(k, v);
    if (!local) body.append("preview", "true");
    const started = performance.now();
    let r, data;
    try {
      r = await fetch("/v1/captions", { method: "POST", body, headers: authHeaders() });
      data = await r.json();
    } catch (e) {
      throw new Error("the service did not answer: " + e);
    }
    if (r.status === 401) tokenRow.hidden = false;
    if (!r.ok) {
      throw new Error(data.detail || ("HTTP " + r.status));
    }
    const res = data.results[0];
    if (res.preview) img.src = res.preview;
    img.alt = "image " + res.filename;
    captionEl.textContent = res.caption;
    meta.textContent = describeTimings(res) + " \u00b7 total " + Math.round(performance.now() - started) + " ms";
    card.classList.remove("pending");
    card.dataset.state = "done";
  }

  async function captionAll() {
    if (!currentFiles.length) return;
    showError("");
    for (const u of objectUrls) URL.revokeObjectURL(u);
    objectUrls = [];
    results.replaceChildren();
    button.disabled = true;
    statusBox.textContent = "captioning " + currentFiles.length + " image" + (currentFiles.length > 1 ? "s" : "") + "...";
    const jobs = currentFiles.map((file) => {
      const card = template.content.firstElementChild.cloneNode(true);
      card.classList.add("pending");
      card.dataset.state = "pending";
      card.querySelector(".filename").textContent = file.name;
      card.querySelector(".caption").textContent = "captioning...";
      results.appendChild(card);
      return captionOne(file, card).catch((e) => {
        card.classList.remove("pending");
        card.classList.add("failed");
        card.dataset.state = "failed";
        card.querySelector(".caption").textContent = e.message;
        // The file could not be read as an image: say so instead of a broken picture.
        const note = document.createElement("div");
        note.className = "no-preview";
        note.textContent = "no preview";
        card.querySelector(".image-box").replaceChildren(note);
        return e;
      });
    });
    const outcomes = await Promise.all(jobs);
    const failed = outcomes.filter((o) => o instanceof Error);
    statusBox.textContent = (outcomes.length - failed.length) + " of " + outcomes.length + " captioned";
    if (failed.length) showError(failed.map((e) => e.message).join("\n"));
    button.disabled = false;
  }

  function useFiles(files) {
    currentFiles = Array.from(files || []);
    button.disabled = currentFiles.length === 0;
    captionAll();
  }

  fileInput.addEventListener("change", () => useFiles(fileInput.files));
  button.addEventListener("click", captionAll);
  dropZone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      fileInput.click();
    }
  });
  for (const ev of ["dragenter", "dragover"]) {
    dropZone.addEventListener(ev, (e) => {
      e.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  for (const ev of ["dragleave", "drop"]) {
    dropZone.addEventListener(ev, (e) => {
      e.preventDefault();
      dropZone.classList.remove("dragging");
    });
  }
  dropZone.addEventListener("drop", (e) => useFiles(e.dataTransfer.files));
  // A file dropped beside the zone should not make the browser navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  loadModelInfo();
})();

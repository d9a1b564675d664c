/*
 * The model page's try-out: draw on the pad or pick a picture (or type an array), post it to
 * the API's own classify endpoint for the version shown, and show the top labels as bars.
 * A file, not an inline script, so the page works under `script-src 'self'`; every text from
 * the server goes in through textContent, never as markup.
 */
"use strict";

(function () {
  const COUNTER_REFRESH_MS = 10000;
  const tryout = document.getElementById("tryout");
  const counters = document.getElementById("counters");

  // The counters are a convenience: a failed refresh keeps the figures shown.
  async function refreshCounters(box) {
    try {
      const response = await fetch(box.dataset.countersUrl, { cache: "no-store" });
      if (!response.ok) return;
      const answer = await response.json();
      for (const [key, text] of Object.entries(answer.display)) {
        const cell = box.querySelector('[data-counter="' + key + '"]');
        if (cell) cell.textContent = text;
      }
    } catch (error) {
      // ignored: the next refresh tries again
    }
  }

  if (counters) {
    window.setInterval(() => {
      if (document.visibilityState === "visible") refreshCounters(counters);
    }, COUNTER_REFRESH_MS);
  }
  if (!tryout) return;

  const url = tryout.dataset.classifyUrl + "?top_k=" + encodeURIComponent(tryout.dataset.topK);
  const result = document.getElementById("result");
  const statusLine = document.getElementById("result-status");
  const bars = document.getElementById("predictions");
  const errorLine = document.getElementById("tryout-error");

  setUpPad(document.getElementById("pad"));
  setUpUpload(document.getElementById("upload"));
  setUpArray(document.getElementById("array-form"), document.getElementById("array-input"));

  function setUpPad(canvas) {
    if (!canvas) return;
    const pen = canvas.getContext("2d");
    let drawn = false;
    let last = null;

    // White paper, black ink, as a person draws: the model's metadata says how to invert it.
    function blank() {
      pen.fillStyle = "#fff";
      pen.fillRect(0, 0, canvas.width, canvas.height);
      drawn = false;
    }
    function at(event) {
      const box = canvas.getBoundingClientRect();
      return [
        ((event.clientX - box.left) * canvas.width) / box.width,
        ((event.clientY - box.top) * canvas.height) / box.height,
      ];
    }
    function stroke(from, to) {
      pen.strokeStyle = "#000";
      pen.lineWidth = canvas.width / 7; // small models see the pad at 8×8: strokes must be thick
      pen.lineCap = "round";
      pen.lineJoin = "round";
      pen.beginPath();
      pen.moveTo(from[0], from[1]);
      pen.lineTo(to[0], to[1]);
      pen.stroke();
      drawn = true;
    }

    blank();
    canvas.addEventListener("pointerdown", (event) => {
      canvas.setPointerCapture(event.pointerId);
      last = at(event);
      stroke(last, last);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (last === null) return;
      const next = at(event);
      stroke(last, next);
      last = next;
    });
    for (const type of ["pointerup", "pointercancel"]) {
      canvas.addEventListener(type, () => {
        last = null;
      });
    }
    document.getElementById("clear-drawing").addEventListener("click", () => {
      blank();
      reset("Top " + tryout.dataset.topK + " labels appear here.");
    });
    document.getElementById("classify-drawing").addEventListener("click", () => {
      if (!drawn) {
        showError("Draw something on the pad first.");
        return;
      }
      canvas.toBlob((blob) => classify(asForm(blob, "drawing.png"), "your drawing"), "image/png");
    });
  }

  function setUpUpload(input) {
    if (!input) return;
    input.addEventListener("change", () => {
      const file = input.files[0];
      if (file) classify(asForm(file, file.name), file.name);
    });
  }

  function setUpArray(form, textarea) {
    if (!form) return;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      classify(textarea.value, "the array", "application/json");
    });
  }

  function asForm(blob, filename) {
    const form = new FormData();
    form.append("file", blob, filename);
    return form;
  }

  async function classify(body, source, contentType) {
    reset("Classifying " + source + "…");
    result.dataset.state = "busy";
    const headers = {};
    if (contentType) headers["Content-Type"] = contentType; // FormData sets its own boundary
    const token = document.getElementById("token");
    if (token && token.value.trim()) headers.Authorization = "Bearer " + token.value.trim();
    const started = performance.now();
    try {
      const response = await fetch(url, { method: "POST", body, headers, cache: "no-store" });
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        throw new Error(answer.error || response.status + " " + response.statusText);
      }
      showPredictions(answer, source, performance.now() - started);
    } catch (error) {
      showError(error.message);
    }
    if (counters) refreshCounters(counters);
  }

  function reset(message) {
    bars.replaceChildren();
    errorLine.hidden = true;
    errorLine.textContent = "";
    statusLine.textContent = message;
    result.dataset.state = "idle";
    delete result.dataset.top;
  }

  function showPredictions(answer, source, elapsedMs) {
    const top = answer.predictions[0];
    bars.replaceChildren(...top.map(bar));
    statusLine.textContent =
      "Top " + top.length + " for " + source + " (version " + answer.model_version + ", " +
      Math.round(elapsedMs) + " ms):";
    result.dataset.top = labelOf(top[0]);
    result.dataset.state = "done";
  }

  function bar(prediction) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = labelOf(prediction);
    const meter = document.createElement("progress");
    meter.max = 1;
    meter.value = prediction.probability;
    meter.setAttribute("aria-label", "probability of " + labelOf(prediction));
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = (prediction.probability * 100).toFixed(1) + " %";
    item.dataset.label = labelOf(prediction);
    item.append(label, meter, value);
    return item;
  }

  function labelOf(prediction) {
    return prediction.label === null ? "#" + prediction.index : prediction.label;
  }

  function showError(message) {
    bars.replaceChildren();
    statusLine.textContent = "";
    errorLine.textContent = message;
    errorLine.hidden = false;
    result.dataset.state = "error";
  }
})();

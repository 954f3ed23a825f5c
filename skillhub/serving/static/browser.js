// The registry browser's only script: the playground's streamed answer (from this server only).
"use strict";

function playground(form) {
  const show = (id, text) => { document.getElementById(id).textContent = text; };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    show("answer", ""); show("error", ""); show("packs", ""); show("task", ""); show("probability", "");
    const body = {
      model: document.getElementById("model").value, stream: true, temperature: 0,
      max_tokens: Number(document.getElementById("max-tokens").value),
      messages: [{ role: "user", content: document.getElementById("prompt").value }],
    };
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, credentials: "same-origin",
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await response.json();
      show("error", error.error.message);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", answer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (line === "[DONE]") { form.dataset.done = "true"; continue; }
        const chunk = JSON.parse(line);
        if (chunk.error) { show("error", chunk.error.message); continue; }
        if (chunk.skillhub) {
          show("packs", chunk.skillhub.packs.join(", ") || "(base)");
          show("task", chunk.skillhub.task || "base");
          show("probability", chunk.skillhub.probability === null ? "-" : chunk.skillhub.probability.toFixed(3));
        }
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) { answer += choice.delta.content; show("answer", answer); }
        }
      }
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("playground");
  if (form) playground(form);
});

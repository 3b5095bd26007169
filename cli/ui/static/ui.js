// tlreg lineage browser: after the first paint, fill in each node's line "what changed
// against its parent, bytes shared with it" (read from the manifests by /api/changes).
// Read-only: only GET requests to this server. Values are set as text, never as markup.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const cells = Array.from(document.querySelectorAll("svg.lineage text.changed[data-id]"))
    .filter((el) => el.textContent === "");
  const batch = 100;
  for (let i = 0; i < cells.length; i += batch) {
    const part = cells.slice(i, i + batch);
    const ids = part.map((el) => el.dataset.id);
    const url = "/api/changes?" + ids.map((id) => "id=" + encodeURIComponent(id)).join("&");
    fetch(url, { method: "GET", credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : {}))
      .then((counts) => {
        for (const el of part) {
          el.textContent = counts[el.dataset.id] || "";
        }
      })
      .catch(() => {});
  }
});

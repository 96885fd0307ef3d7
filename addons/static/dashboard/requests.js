// Requests: the ledger newest first, filtered; a row opens its whole record.
"use strict";

(() => {
  const D = Dashboard;
  const form = () => document.getElementById("filters");
  let operator = false;
  let cursor = null;

  // The filters as the metering API's query (the page's own URL keeps them too).
  function query() {
    const params = new URLSearchParams();
    for (const [name, value] of new FormData(form())) {
      if (!value) continue;
      if (name === "metadata") {
        const [key, ...rest] = value.split("=");
        params.set(`metadata.${key.trim()}`, rest.join("=").trim());
      } else if (name.startsWith("created_")) {
        params.set(name, value.length === 16 ? `${value}:00Z` : `${value}Z`); // the inputs are in UTC
      } else {
        params.set(name, value);
      }
    }
    return params;
  }

  async function load(more) {
    const table = document.getElementById("requests");
    const problem = document.getElementById("problem");
    const params = query();
    params.set("limit", "50");
    if (more && cursor) params.set("cursor", cursor);
    let page;
    try {
      page = await D.api(`/v1/requests?${params}`);
    } catch (error) {
      problem.textContent = error.message;
      problem.hidden = false;
      return;
    }
    problem.hidden = true;
    if (!more) {
      table.replaceChildren();
      D.header(table, D.REQUEST_COLUMNS(operator));
      table.createTBody();
    }
    for (const record of page.data) table.tBodies[0].append(D.requestRow(record, operator));
    cursor = page.next_cursor;
    document.getElementById("more").hidden = !page.has_more;
    document.body.dataset.ready = "true";
  }

  async function detail(requestId) {
    const record = await D.api(`/v1/requests/${encodeURIComponent(requestId)}`);
    document.getElementById("detail-title").textContent = record.request_id;
    const fields = document.getElementById("detail-fields");
    fields.replaceChildren();
    for (const [name, value] of Object.entries(record)) {
      const term = document.createElement("dt");
      term.textContent = name;
      const description = document.createElement("dd");
      description.dataset.field = name;
      description.textContent = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
      fields.append(term, description);
    }
    document.getElementById("detail").hidden = false;
  }

  document.addEventListener("DOMContentLoaded", async () => {
    operator = (await D.whoami()).viewer === "operator";
    const filters = form();
    const fromUrl = new URLSearchParams(location.search);
    for (const element of filters.elements) {
      if (element.name && fromUrl.has(element.name)) element.value = fromUrl.get(element.name);
    }
    filters.addEventListener("submit", (event) => {
      event.preventDefault();
      const shown = new URLSearchParams();
      for (const [name, value] of new FormData(filters)) if (value) shown.set(name, value);
      history.replaceState(null, "", `?${shown}`);
      document.body.dataset.ready = "false";
      load(false);
    });
    document.getElementById("more").addEventListener("click", () => load(true));
    document.getElementById("requests").addEventListener("click", (event) => {
      const row = event.target.closest("tr[data-request-id]");
      if (row) detail(row.dataset.requestId);
    });
    document.getElementById("close-detail").addEventListener("click", () => {
      document.getElementById("detail").hidden = true;
    });
    load(false);
  });
})();

// Live: each call appears as it completes (server-sent events from /dashboard/events).
"use strict";

(() => {
  const D = Dashboard;
  const KEPT = 200;

  document.addEventListener("DOMContentLoaded", async () => {
    const operator = (await D.whoami()).viewer === "operator";
    const table = document.getElementById("live");
    const status = document.getElementById("status");
    D.header(table, D.REQUEST_COLUMNS(operator));
    const body = table.createTBody();
    const events = new EventSource("/dashboard/events");
    events.addEventListener("open", () => {
      status.textContent = "live";
      document.body.dataset.ready = "true";
    });
    events.addEventListener("request", (event) => {
      body.prepend(D.requestRow(JSON.parse(event.data), operator));
      while (body.rows.length > KEPT) body.deleteRow(-1);
    });
    events.addEventListener("error", async () => {
      // Each answer ends and the browser asks again (an "error" too); a refusal closes it.
      if (events.readyState !== EventSource.CLOSED) return;
      status.textContent = "disconnected";
      await D.api("/dashboard/session"); // signed out or expired: to the sign-in page
    });
  });
})();

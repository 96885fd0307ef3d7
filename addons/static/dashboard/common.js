// Shared by the dashboard's pages: the API, money, tables. Money arrives as exact decimal
// strings with 10 places; sums are added exactly (BigInt of 1e-10 dollars), and shown rounded
// with the exact amount on hover (title) and in a request's detail.
"use strict";

const Dashboard = (() => {
  async function api(path) {
    const response = await fetch(path, { credentials: "same-origin", headers: { accept: "application/json" } });
    if (response.status === 401) {
      location.assign("/dashboard/sign-in");
      throw new Error("signed out");
    }
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    return body;
  }

  const SCALE = 10n ** 10n;
  const units = (text) => BigInt((text || "0").replace(".", ""));
  function exact(units) {
    const negative = units < 0n;
    const magnitude = negative ? -units : units;
    const text = `${magnitude / SCALE}.${(magnitude % SCALE).toString().padStart(10, "0")}`;
    return (negative ? "-" : "") + text;
  }
  const total = (texts) => exact(texts.reduce((sum, text) => sum + units(text), 0n));

  // $12.34 from a dollar up, three significant digits below: $0.00000435, $0.0639.
  function dollars(text) {
    const value = Number(text || 0);
    if (value === 0) return "$0";
    const options = Math.abs(value) >= 1
      ? { minimumFractionDigits: 2, maximumFractionDigits: 2 }
      : { maximumSignificantDigits: 3 };
    return new Intl.NumberFormat("en-US", { style: "currency", currency: "USD", ...options }).format(value);
  }

  function money(text) {
    const cell = document.createElement("td");
    cell.className = "money";
    cell.textContent = dollars(text);
    cell.title = `$${text}`;
    cell.dataset.exact = text;
    return cell;
  }

  function cell(value, className) {
    const element = document.createElement("td");
    element.textContent = value === null || value === undefined ? "" : String(value);
    if (className) element.className = className;
    return element;
  }

  function header(table, names) {
    const row = table.createTHead().insertRow();
    for (const name of names) {
      const th = document.createElement("th");
      th.textContent = name;
      row.append(th);
    }
  }

  const count = (value) => new Intl.NumberFormat("en-US").format(value || 0);
  const ms = (value) => (value === null || value === undefined ? "" : `${count(value)} ms`);
  const time = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z") : "");

  // One ledger row as the requests and live pages show it.
  function requestRow(record, operator) {
    const row = document.createElement("tr");
    row.dataset.requestId = record.request_id;
    row.className = `status-${record.status}`;
    row.append(
      cell(time(record.timestamp)),
      cell(record.status, "status"),
      cell(record.model),
      cell(record.provider),
      ...(operator ? [cell(record.merchant_id)] : []),
      cell(record.connection_id),
      cell(record.product_id),
      cell(`${count(record.input_tokens)} → ${count(record.output_tokens)}`, "tokens"),
      money(record.total_cost),
      cell(record.usage_source),
      cell(ms(record.latency_ms)),
      cell(ms(record.ttfb_ms)),
      cell(record.error_message, "error-message"),
    );
    return row;
  }
  const REQUEST_COLUMNS = (operator) => [
    "Time (UTC)", "Status", "Model", "Provider", ...(operator ? ["Merchant"] : []), "Connection", "Product",
    "Tokens in → out", "Cost", "Usage", "Latency", "First byte", "Error",
  ];

  let session = null;
  async function whoami() {
    session = session || await api("/dashboard/session");
    return session;
  }

  document.addEventListener("DOMContentLoaded", async () => {
    const page = document.body.dataset.page;
    document.querySelector(`[data-nav="${page}"]`)?.classList.add("current");
    const me = await whoami();
    document.getElementById("viewer").textContent =
      me.viewer === "operator" ? "Operator: every merchant" : `${me.name} (${me.merchant_id})`;
  });

  return { api, dollars, money, cell, header, count, total, exact, units, requestRow, REQUEST_COLUMNS, whoami, time };
})();

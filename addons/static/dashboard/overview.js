// Overview: spend, requests and tokens for today, 7 and 30 days; spend per day by model;
// top models, connections and products; wallets.
"use strict";

(() => {
  const D = Dashboard;
  const DAY = 86400000;
  const today = new Date().toISOString().slice(0, 10);
  const since = (days) => new Date(Date.parse(today) - (days - 1) * DAY).toISOString().slice(0, 10);
  const from = `${since(30)}T00:00:00Z`;
  const query = (groupBy) => `/v1/usage?group_by=${groupBy}&created_after=${encodeURIComponent(from)}`;

  function periods(days) {
    const section = document.getElementById("periods");
    for (const [label, length] of [["Today", 1], ["7 days", 7], ["30 days", 30]]) {
      const inside = days.filter((day) => day.date >= since(length));
      const card = document.createElement("div");
      card.className = "card";
      card.dataset.period = String(length);
      const spend = D.total(inside.map((day) => day.total_cost));
      const requests = inside.reduce((sum, day) => sum + day.requests, 0);
      const tokens = inside.reduce((sum, day) => sum + day.input_tokens + day.output_tokens, 0);
      card.innerHTML = "<h3></h3><p class='spend'></p><p class='requests'></p><p class='tokens'></p>";
      card.querySelector("h3").textContent = label;
      const spendLine = card.querySelector(".spend");
      spendLine.textContent = D.dollars(spend);
      spendLine.title = `$${spend}`;
      card.querySelector(".requests").textContent = `${D.count(requests)} requests`;
      card.querySelector(".tokens").textContent = `${D.count(tokens)} tokens`;
      section.append(card);
    }
  }

  const COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"];
  function chart(groups) {
    const days = [];
    for (let day = Date.parse(since(30)); day <= Date.parse(today); day += DAY) {
      days.push(new Date(day).toISOString().slice(0, 10));
    }
    const models = [...new Set(groups.map((group) => group.model || "(none)"))];
    const datasets = models.map((model, index) => ({
      label: model,
      backgroundColor: COLOURS[index % COLOURS.length],
      data: days.map((day) => {
        const found = groups.find((group) => group.day === day && (group.model || "(none)") === model);
        return found ? Number(found.total_cost) : 0; // drawn only: the exact sums are in the tables
      }),
    }));
    new Chart(document.getElementById("spend-chart"), {
      type: "bar",
      data: { labels: days.map((day) => day.slice(5)), datasets },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        scales: {
          x: { stacked: true },
          y: { stacked: true, ticks: { callback: (value) => D.dollars(value) } },
        },
        plugins: { tooltip: { callbacks: { label: (item) => `${item.dataset.label}: ${D.dollars(item.raw)}` } } },
      },
    });
  }

  function top(name, groups) {
    const table = document.getElementById(`top-${name}`);
    D.header(table, [name[0].toUpperCase() + name.slice(1), "Requests", "Tokens", "Spend"]);
    const body = table.createTBody();
    const sorted = [...groups].sort((a, b) => (D.units(b.total_cost) > D.units(a.total_cost) ? 1 : -1));
    for (const group of sorted.slice(0, 5)) {
      const row = body.insertRow();
      const label = group[`${name}_name`] ? `${group[`${name}_name`]} (${group[name]})` : group[name] || "(none)";
      row.append(
        D.cell(label),
        D.cell(D.count(group.requests)),
        D.cell(D.count(group.input_tokens + group.output_tokens)),
        D.money(group.total_cost),
      );
    }
  }

  function wallets(list) {
    const table = document.getElementById("wallets");
    D.header(table, ["Wallet", "Balance", "Held", "Available"]);
    const body = table.createTBody();
    for (const wallet of list) {
      const row = body.insertRow();
      row.dataset.walletId = wallet.id;
      if (wallet.low) row.className = "low";
      row.append(D.cell(`${wallet.name} (${wallet.id})`), D.money(wallet.balance), D.money(wallet.held), D.money(wallet.available));
    }
  }

  // One rollup by day, model, connection and product (one pass over the ledger), summed here by
  // fewer keys: counts as numbers, costs exactly.
  function regroup(groups, keys) {
    const merged = new Map();
    for (const group of groups) {
      const id = JSON.stringify(keys.map((key) => group[key]));
      const into = merged.get(id) || { ...Object.fromEntries(keys.map((key) => [key, group[key]])), requests: 0,
        input_tokens: 0, output_tokens: 0, cost: 0n };
      for (const key of keys) if (group[`${key}_name`]) into[`${key}_name`] = group[`${key}_name`];
      into.requests += group.requests;
      into.input_tokens += group.input_tokens;
      into.output_tokens += group.output_tokens;
      into.cost += D.units(group.total_cost);
      merged.set(id, into);
    }
    return [...merged.values()].map(({ cost, ...rest }) => ({ ...rest, total_cost: D.exact(cost) }));
  }

  document.addEventListener("DOMContentLoaded", async () => {
    const [usage, walletList] = await Promise.all([D.api(query("day,model,connection,product")), D.api("/v1/wallets")]);
    const days = regroup(usage.data, ["day"]).map((day) => ({ ...day, date: day.day }));
    periods(days);
    chart(regroup(usage.data, ["day", "model"]));
    for (const name of ["model", "connection", "product"]) top(name, regroup(usage.data, [name]));
    wallets(walletList.data);
    document.body.dataset.ready = "true";
  });
})();

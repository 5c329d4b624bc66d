// The rates board: every stored pair, live over /ws/rates, with 7-day sparklines, a quote box and a
// "rate at" lookup. Plain modules, no build step, nothing fetched from outside the service.

const SPARK_DAYS = 7;
const DAY_MS = 86400 * 1000;
const MOVE_MARK_MS = 5000;
const BACKOFF_START_MS = 500;
const BACKOFF_MAX_MS = 30000;
const OFFLINE_AFTER_ATTEMPTS = 6;

const rows = new Map(); // "USD/NGN" -> {item, history: [{at, value}], element, cells, historyLoaded}
const board = document.getElementById("board");
const connection = document.getElementById("connection");

// ---- formatting -------------------------------------------------------------------------------

function digitsFor(value) {
  if (value >= 1000) return 2;
  if (value >= 1) return 4;
  return Math.min(10, 3 - Math.floor(Math.log10(value)) + 2);
}

// Grouped by hand rather than with Intl.NumberFormat or toLocaleString: their first use loads the
// locale data, which was the largest single cost of drawing the board (a long task on a phone CPU).
// The board's numbers are always en-US style anyway: digits grouped by commas, a point for decimals.
function formatNumber(value, digits = digitsFor(value)) {
  const [whole, fraction] = value.toFixed(digits).split(".");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return fraction === undefined ? grouped : `${grouped}.${fraction}`;
}

function formatAge(isoTime) {
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(isoTime)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

function formatUtc(isoTime) {
  return new Date(isoTime).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

// ---- charts -----------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function scale(points, width, height, pad) {
  const times = points.map((p) => Date.parse(p.at));
  const values = points.map((p) => p.value);
  const [t0, t1] = [Math.min(...times), Math.max(...times)];
  const [v0, v1] = [Math.min(...values), Math.max(...values)];
  return points.map((p, i) => ({
    x: pad + (t1 > t0 ? ((times[i] - t0) / (t1 - t0)) * (width - 2 * pad) : (width - 2 * pad) / 2),
    y: pad + (v1 > v0 ? (1 - (p.value - v0) / (v1 - v0)) * (height - 2 * pad) : (height - 2 * pad) / 2),
    point: p,
  }));
}

const HISTORY_NOTES = { loading: "loading history…", loaded: "collecting history", failed: "history unavailable" };

// One point is no line: the cell says why it has none (on a fresh install, that history is being collected).
function sparkCell(points, state) {
  if (points.length < 2) return [element("span", { class: "collecting", text: HISTORY_NOTES[state] })];
  const cell = [sparkline(points)];
  const move = state === "loaded" ? dayMove(points) : null;
  if (move !== null) {
    const sign = move > 0 ? "+" : move < 0 ? "−" : "±";
    cell.push(element("span", { class: "day-move", "data-move": move, text: `${sign}${Math.abs(move).toFixed(2)} % 24 h` }));
  }
  return cell;
}

// The move in percent from the value in effect 24 hours ago (the last point at or before then) to the
// newest, or null while the history does not reach back that far.
function dayMove(points) {
  const dayAgo = Date.now() - DAY_MS;
  let then = null;
  for (const point of points) {
    if (Date.parse(point.at) > dayAgo) break;
    then = point.value;
  }
  if (then === null) return null;
  return ((points[points.length - 1].value - then) / then) * 100;
}

function sparkline(points) {
  const chart = svg("svg", { viewBox: "0 0 100 24", preserveAspectRatio: "none", class: "spark", role: "img" });
  const first = points[0].value;
  const last = points[points.length - 1].value;
  chart.setAttribute("aria-label", `${points.length} points over ${SPARK_DAYS} days, ${formatNumber(first)} to ${formatNumber(last)}`);
  const scaled = scale(points, 100, 24, 2);
  chart.append(svg("polyline", { points: scaled.map((s) => `${s.x},${s.y}`).join(" "), fill: "none" }));
  return chart;
}

function bigChart(points) {
  const [width, height, pad] = [640, 280, 28];
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "big", role: "img" });
  if (points.length === 0) {
    chart.setAttribute("aria-label", "no history yet");
    return chart;
  }
  const scaled = scale(points, width, height, pad);
  const values = points.map((p) => p.value);
  chart.setAttribute("aria-label", `${points.length} points from ${formatNumber(Math.min(...values))} to ${formatNumber(Math.max(...values))}`);
  chart.append(svg("polyline", { points: scaled.map((s) => `${s.x},${s.y}`).join(" "), fill: "none" }));
  for (const s of scaled) {
    const dot = svg("circle", { cx: s.x, cy: s.y, r: 3.5 });
    const tip = svg("title");
    tip.textContent = `${formatUtc(s.point.at)}: ${formatNumber(s.point.value)}`;
    dot.append(tip);
    chart.append(dot);
  }
  const label = (text, x, y, anchor) => {
    const node = svg("text", { x, y, "text-anchor": anchor });
    node.textContent = text;
    chart.append(node);
  };
  label(formatNumber(Math.max(...values)), 4, 14, "start");
  label(formatNumber(Math.min(...values)), 4, height - 6, "start");
  label(formatUtc(points[0].at), pad, height - 6, "start");
  label(formatUtc(points[points.length - 1].at), width - pad, height - 6, "end");
  return chart;
}

// ---- the board --------------------------------------------------------------------------------

const groups = new Map(); // "USD" -> tbody

function groupFor(source) {
  let tbody = groups.get(source);
  if (tbody) return tbody;
  board.querySelector(".empty")?.remove();
  const head = element("tr", {},
    element("th", { scope: "col", text: "Pair" }),
    element("th", { scope: "col", text: `1 ${source} =` }),
    element("th", { scope: "col", text: "Updated" }),
    element("th", { scope: "col", class: "spark-col", text: `${SPARK_DAYS} days` }),
    element("th", { scope: "col", text: "Status" }));
  tbody = element("tbody");
  const group = element("section", { class: "group", "data-source": source, "aria-label": `From ${source}` },
    element("h2", { text: `From ${source}` }),
    element("table", {}, element("thead", {}, head), tbody));
  const after = [...groups.keys()].sort().find((s) => s > source);
  board.insertBefore(group, after ? groups.get(after).closest("section") : null);
  groups.set(source, tbody);
  return tbody;
}

function createRow(pair, item) {
  const tbody = groupFor(item.source_currency);
  const cells = {
    number: element("span", { class: "number" }),
    move: element("span", { class: "move" }),
    age: element("td", { class: "age" }),
    spark: element("td", { class: "spark-col" }, ...sparkCell([], "loading")),
    badges: element("td", { class: "badges" }),
  };
  const tr = element("tr", { "data-pair": pair, tabindex: "0", "aria-label": `${pair}, open chart` },
    element("th", { scope: "row", class: "pair", text: `${item.source_currency} → ${item.destination_currency}` }),
    element("td", { class: "value" }, cells.number, cells.move),
    cells.age, cells.spark, cells.badges);
  tr.addEventListener("click", () => openChart(pair));
  tr.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      openChart(pair);
    }
  });
  const after = [...tbody.rows].find((r) => r.dataset.pair > pair);
  tbody.insertBefore(tr, after ?? null);
  historyWatch.observe(tr);
  return { tr, cells };
}

// Rows are drawn in animation frames, never as messages arrive: a poll cycle's burst of updates costs one
// style and layout pass, not one per pair. A frame draws at most DRAW_ROWS_PER_FRAME rows and leaves the
// rest to the next, so a snapshot of 44 new rows (or 44 sparklines) never blocks the page at once: on a
// phone a single frame drawing them all took longer than the 50 ms that makes a task "long". (A count,
// not a time budget: on a busy CPU a time budget runs out after a row or two, and every extra frame
// lays out and paints the whole page again.)
const DRAW_ROWS_PER_FRAME = 12;
const dirty = new Set();
let drawScheduled = false;
let choicesStale = false;

function scheduleDraw(pair) {
  dirty.add(pair);
  if (drawScheduled) return;
  drawScheduled = true;
  requestAnimationFrame(drawDirty);
}

// Histories arrive one by one from the worker; each drawn at once would lay the tables out again for
// every pair. They are gathered for a moment and drawn together.
const HISTORY_GATHER_MS = 250;
let historyTimer = null;
const historyDirty = new Set();

function scheduleHistoryDraw(pair) {
  historyDirty.add(pair);
  historyTimer ??= setTimeout(() => {
    historyTimer = null;
    for (const gathered of historyDirty) scheduleDraw(gathered);
    historyDirty.clear();
  }, HISTORY_GATHER_MS);
}

function drawDirty() {
  drawScheduled = false;
  let drawn = 0;
  for (const pair of dirty) {
    dirty.delete(pair);
    render(pair);
    if (++drawn === DRAW_ROWS_PER_FRAME) break;
  }
  if (dirty.size > 0) {
    drawScheduled = true;
    requestAnimationFrame(drawDirty);
    return;
  }
  if (choicesStale) {
    choicesStale = false;
    fillCurrencyChoices();
  }
}

function render(pair) {
  const row = rows.get(pair);
  if (!row.element) {
    const { tr, cells } = createRow(pair, row.item);
    row.element = tr;
    row.cells = cells;
  }
  const { item, cells } = row;
  cells.number.textContent = formatNumber(item.destination_per_source);
  cells.number.dataset.value = item.destination_per_source;
  cells.age.dataset.time = item.last_updated;
  cells.age.textContent = formatAge(item.last_updated);
  const badges = [];
  if (item.stale) badges.push(element("span", { class: "badge stale", text: "stale" }));
  badges.push(element("span", { class: `badge provider ${item.provider}`, text: item.provider === "demo" ? "DEMO rate" : item.provider }));
  cells.badges.replaceChildren(...badges);
  if (row.drawnHistory !== row.history || row.drawnState !== row.historyState) {
    row.drawnHistory = row.history;
    row.drawnState = row.historyState;
    cells.spark.replaceChildren(...sparkCell(row.history, row.historyState));
  }
  row.element.classList.toggle("is-stale", item.stale);
  if (row.pendingMove) {
    showMove(row, row.pendingMove);
    row.pendingMove = 0;
  }
}

function showMove(row, direction) {
  const move = row.cells.move;
  move.textContent = direction > 0 ? "▲ up" : "▼ down";
  row.element.dataset.moved = direction > 0 ? "up" : "down";
  clearTimeout(row.moveTimer);
  row.moveTimer = setTimeout(() => {
    move.textContent = "";
    delete row.element.dataset.moved;
  }, MOVE_MARK_MS);
}

// `seq`: the store the item reflects. An update older than the row's value is dropped (two replicas' updates
// may arrive out of order); a snapshot's items replace the rows whatever they held.
function upsert(item, { fromUpdate = false, seq = null, snapshot = false } = {}) {
  const pair = `${item.source_currency}/${item.destination_currency}`;
  let row = rows.get(pair);
  if (!row) {
    // The row's element is made when it is first drawn.
    row = { item, seq: null, history: [], historyState: "loading", historyLoaded: null, element: null, cells: null };
    rows.set(pair, row);
    choicesStale = true;
  }
  if (!snapshot && seq !== null && row.seq !== null && seq < row.seq) return;
  if (seq !== null) row.seq = seq;
  const before = row.item.destination_per_source;
  row.item = item;
  const last = row.history[row.history.length - 1];
  if (!last || last.value !== item.destination_per_source) {
    // A new array, so the next draw sees the history changed and redraws the sparkline.
    row.history = [...row.history, { at: item.last_updated, value: item.destination_per_source }];
  }
  if (fromUpdate && before !== item.destination_per_source) row.pendingMove = item.destination_per_source - before;
  scheduleDraw(pair);
}

// Histories are fetched and condensed by a worker (static/history.js): parsing a week of points for 44
// pairs here would block the page just when it is first drawn. The rows near the screen ask first.
const historyAnswers = new Map(); // request id -> {resolve, reject}
let historyRequests = 0;
let historyWorker = null;

// Started with the first request, not when the page loads: the worker's script is then no part of the
// page's first paint.
function startHistoryWorker() {
  const worker = new Worker("/static/history.js", { type: "module" });
  worker.addEventListener("message", (event) => {
    const { id, points, error } = event.data;
    const waiting = historyAnswers.get(id);
    historyAnswers.delete(id);
    if (error === undefined) waiting.resolve(points);
    else waiting.reject(new Error(error));
  });
  return worker;
}

function requestHistory(pair, { full = false } = {}) {
  historyWorker ??= startHistoryWorker();
  const id = ++historyRequests;
  const since = new Date(Date.now() - SPARK_DAYS * DAY_MS).toISOString();
  historyWorker.postMessage({ id, pair, since, dayAgo: Date.now() - DAY_MS, full });
  return new Promise((resolve, reject) => historyAnswers.set(id, { resolve, reject }));
}

// Live values seen since the request went out are kept when they are a change after the stored ones: a
// point is a change, so a repeat of the same value (with a later `last_updated`) is not a new point.
function withLive(points, live) {
  for (const point of live) {
    const last = points.at(-1);
    if (!last || (point.at > last.at && point.value !== last.value)) points.push(point);
  }
  return points;
}

const historyWatch = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    historyWatch.unobserve(entry.target);
    loadHistory(entry.target.dataset.pair);
  }
}, { rootMargin: "200px 0px" });

function loadRemainingHistories() {
  for (const [pair, row] of rows) if (row.historyLoaded === null && row.historyState === "loading") loadHistory(pair);
}

function loadHistory(pair) {
  const row = rows.get(pair);
  row.historyLoaded ??= fetchHistory(pair);
  return row.historyLoaded;
}

async function fetchHistory(pair) {
  const row = rows.get(pair);
  try {
    row.history = withLive(await requestHistory(pair), row.history);
    row.historyState = "loaded";
  } catch {
    // Said in the cell; opening the chart asks again.
    row.historyState = "failed";
    row.historyLoaded = null;
  }
  scheduleHistoryDraw(pair);
}

async function openChart(pair) {
  const row = rows.get(pair);
  // Every point, not the sparkline's condensed line: the dialog lists them.
  let points = row.history;
  try {
    points = withLive(await requestHistory(pair, { full: true }), row.history);
  } catch {
    // The condensed line is what there is.
  }
  const dialog = document.getElementById("chart-dialog");
  document.getElementById("chart-title").textContent = `${pair.replace("/", " → ")}, last ${SPARK_DAYS} days`;
  document.getElementById("chart").replaceChildren(bigChart(points));
  dialog.querySelector("tbody").replaceChildren(...points.slice().reverse().map((p) =>
    element("tr", {}, element("td", { text: formatUtc(p.at) }), element("td", { text: formatNumber(p.value) }))));
  dialog.showModal();
}

setInterval(() => {
  // Only a changed text is written: each write would cost a style and layout pass, every second.
  for (const { cells } of rows.values()) {
    if (!cells?.age.dataset.time) continue;
    const age = formatAge(cells.age.dataset.time);
    if (cells.age.textContent !== age) cells.age.textContent = age;
  }
}, 1000);

// ---- the live connection ----------------------------------------------------------------------
// A WebSocket on /ws/rates, resumed after a cut from the last promised seq; server-sent events on
// /sse/rates when WebSockets cannot connect (a proxy that refuses the upgrade). docs/board.md, "Live".

// The service's WS_HEARTBEAT_SECONDS default: a page cannot read the setting, and no frame says it.
const HEARTBEAT_S = 25;
// Nothing heard, not even a heartbeat, for two intervals: the connection is dead, whatever TCP says.
const DEAD_AFTER_MS = 2 * HEARTBEAT_S * 1000;
// A WebSocket still not open after this long failed: a proxy that holds the upgrade unanswered.
const OPEN_TIMEOUT_MS = 10000;
// WebSocket attempts in a row that failed while the service answered plain HTTP: then events are used.
const REFUSALS_BEFORE_EVENTS = 2;
// Every frame type the board reads, also the names of the events of /sse/rates.
const FRAME_TYPES = ["all_rates", "resumed", "heartbeat", "rate_update", "rates_update"];

let attempts = 0;
let refusals = 0;
let generation = 0; // bumped when a connection is given up: its late events are ignored
let live = null; // the connection now open or opening: {close}
let lastHeard = 0;
// The last frame that promised "every change up to seq" (all_rates, resumed, heartbeat): where a resume
// starts. A rate_update's own seq never counts: two replicas' updates may arrive out of their order.
let promised = null; // {epoch, seq}

function setConnection(state, label = state) {
  connection.dataset.state = state;
  connection.querySelector(".label").textContent = label;
}

function connect() {
  if (refusals >= REFUSALS_BEFORE_EVENTS) connectEvents();
  else connectSocket();
}

function resumeQuery() {
  return promised ? `?epoch=${encodeURIComponent(promised.epoch)}&seq=${promised.seq}` : "";
}

function heard() {
  lastHeard = Date.now();
}

function connectSocket() {
  const id = ++generation;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws/rates${resumeQuery()}`);
  let opened = false;
  // close() on a connecting socket fails it: its close event follows, as for a refused upgrade.
  const openTimer = setTimeout(() => socket.close(), OPEN_TIMEOUT_MS);
  live = { close: () => socket.close() };
  heard();
  socket.addEventListener("open", () => {
    if (id !== generation) return;
    opened = true;
    clearTimeout(openTimer);
    attempts = 0;
    refusals = 0;
    heard();
    setConnection("live");
    connection.dataset.transport = "websocket";
    // Batch mode: one frame carries every pair that moved since the last, so a poll cycle is a few repaints.
    // A new connection follows every pair, so this is asked again on each.
    socket.send(JSON.stringify({ type: "subscribe", pairs: ["*"], batch: true }));
  });
  socket.addEventListener("message", (event) => {
    if (id !== generation) return;
    heard();
    receive(JSON.parse(event.data));
  });
  socket.addEventListener("close", async () => {
    clearTimeout(openTimer);
    if (id !== generation) return;
    live = null;
    // A browser does not say why a WebSocket failed to open. If plain HTTP answers, the upgrade itself was
    // refused (a proxy); if not, the service is away and a WebSocket is still what to try next.
    if (!opened) refusals = (await serviceAnswers()) ? refusals + 1 : 0;
    if (id === generation) reconnectLater();
  });
}

async function serviceAnswers() {
  try {
    const response = await fetch("/healthz", { cache: "no-store", signal: AbortSignal.timeout(5000) });
    return response.ok;
  } catch {
    return false;
  }
}

function connectEvents() {
  const id = ++generation;
  // The first stream starts from the snapshot: EventSource cannot send Last-Event-ID on its first request.
  // On its own reconnects the browser sends the id of the last event, and the service resumes from it.
  const source = new EventSource("/sse/rates?batch=true");
  let opened = false;
  live = { close: () => source.close() };
  heard();
  source.addEventListener("open", () => {
    if (id !== generation) return;
    opened = true;
    attempts = 0;
    heard();
    setConnection("live", "live (events)");
    connection.dataset.transport = "events";
  });
  for (const type of FRAME_TYPES) {
    source.addEventListener(type, (event) => {
      if (id !== generation) return;
      heard();
      receive(JSON.parse(event.data));
    });
  }
  source.addEventListener("error", () => {
    if (id !== generation) return;
    if (opened && source.readyState === EventSource.CONNECTING) {
      setConnection("reconnecting"); // the browser reconnects by itself, after the stream's `retry`
      return;
    }
    // An error answer (a 503 for want of room), or events could not connect at all: back to the loop, which
    // tries a WebSocket first again (the service may have been away, not the WebSocket refused).
    source.close();
    live = null;
    refusals = 0;
    reconnectLater();
  });
}

// Gives up a connection that went quiet: its socket may take a minute to say it closed, so it is left behind.
function drop() {
  generation += 1;
  const dropped = live;
  live = null;
  dropped.close();
  reconnectLater();
}

setInterval(() => {
  if (live && Date.now() - lastHeard > DEAD_AFTER_MS) drop();
}, 5000);

function reconnectLater() {
  attempts += 1;
  // Exponential backoff with full jitter, so a restarted service is not met by every board at once.
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** (attempts - 1));
  const delay = ceiling / 2 + Math.random() * (ceiling / 2);
  setConnection(!navigator.onLine || attempts > OFFLINE_AFTER_ATTEMPTS ? "offline" : "reconnecting");
  delete connection.dataset.transport;
  setTimeout(connect, delay);
}

// Kept only when it promises more than the one held (or is of another epoch: the history was lost).
function keepPromise({ epoch, seq }) {
  if (typeof epoch !== "string" || !Number.isInteger(seq)) return;
  if (promised && promised.epoch === epoch && promised.seq >= seq) return;
  promised = { epoch, seq };
}

function receive(message) {
  if (message.type === "all_rates") {
    // The first snapshot, or one that answers a resume the service could not (`"resumed": false`): every
    // stored pair as of its seq.
    for (const item of message.rates) upsert(item, { seq: message.seq, snapshot: true });
    keepPromise(message);
    board.setAttribute("aria-busy", "false");
    loadRemainingHistories();
  } else if (message.type === "resumed") {
    // Each pair that changed while away, with its own seq: an update like any other, its move marked.
    for (const item of message.rates) upsert(item, { fromUpdate: true, seq: item.seq });
    keepPromise(message);
  } else if (message.type === "heartbeat") {
    keepPromise(message);
  } else if (message.type === "rates_update") {
    for (const item of message.rates) upsert(item, { fromUpdate: true, seq: item.seq });
  } else if (message.type === "rate_update") {
    upsert(message.rate, { fromUpdate: true, seq: message.seq });
  }
}

window.addEventListener("offline", () => setConnection("offline"));

// ---- the quote box and the "rate at" lookup ---------------------------------------------------

function fillCurrencyChoices() {
  const sources = [...new Set([...rows.values()].map((r) => r.item.source_currency))].sort();
  const destinations = [...new Set([...rows.values()].map((r) => r.item.destination_currency))].sort();
  for (const form of document.querySelectorAll("#quote-form, #at-form")) {
    fillSelect(form.elements.source, sources);
    fillSelect(form.elements.destination, destinations);
  }
}

const PREFERRED = { source: "USD", destination: "NGN" };

function fillSelect(select, codes) {
  if (select.options.length === codes.length) return;
  const chosen = select.dataset.chosen ?? PREFERRED[select.name];
  select.replaceChildren(...codes.map((code) => element("option", { value: code, text: code })));
  if (codes.includes(chosen)) select.value = chosen;
}

async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.message ?? `HTTP ${response.status}`);
  return body;
}

document.getElementById("quote-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const output = document.getElementById("quote-result");
  const { source, destination, amount, mode } = Object.fromEntries(new FormData(form));
  const param = mode === "send" ? "source_amount" : "amount";
  output.textContent = "…";
  try {
    const body = await getJson(`/api/rates?source_currency=${source}&destination_currency=${destination}&${param}=${encodeURIComponent(amount)}`);
    const { data, meta } = body;
    output.replaceChildren(
      element("strong", { class: "quote-figure", text: `${formatNumber(data.source.amount, 2)} ${data.source.currency} → ${formatNumber(data.destination.amount, 2)} ${data.destination.currency}` }),
      element("span", { text: ` at 1 ${source} = ${formatNumber(meta.destination_per_source)} ${destination}, updated ${formatAge(meta.last_updated)}${meta.stale ? " (stale)" : ""}${meta.provider === "demo" ? " · DEMO rate" : ""}` }));
    output.dataset.sourceAmount = data.source.amount;
    output.dataset.destinationAmount = data.destination.amount;
  } catch (error) {
    output.textContent = error.message;
  }
});

document.getElementById("at-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const output = document.getElementById("at-result");
  const { source, destination, at } = Object.fromEntries(new FormData(form));
  const moment = new Date(at).toISOString();
  output.textContent = "…";
  try {
    const body = await getJson(`/api/rates/history?source_currency=${source}&destination_currency=${destination}&at=${encodeURIComponent(moment)}`);
    const [point] = body.data.points;
    output.replaceChildren(
      element("strong", { text: `1 ${source} = ${formatNumber(point.destination_per_source)} ${destination}` }),
      element("span", { text: ` in effect at ${formatUtc(moment)} (observed ${formatUtc(point.at)})` }));
    output.dataset.value = point.destination_per_source;
  } catch (error) {
    output.textContent = error.message;
  }
});

for (const select of document.querySelectorAll("form select")) {
  select.addEventListener("change", () => { select.dataset.chosen = select.value; });
}

const now = new Date();
document.querySelector("#at-form input[name=at]").value =
  new Date(now.getTime() - now.getTimezoneOffset() * 60000).toISOString().slice(0, 19);

connect();

// The board's history worker: fetches pairs' histories from /api/rates/history and condenses them for
// sparklines, off the page's main thread. A week of history is about a thousand points a pair, and
// parsing 44 such answers on the main thread blocked a phone's page for most of a second.
//
// Asked {id, pair, since, dayAgo, full}, it answers {id, points} (oldest first, {at, value}) or {id, error}.
// Condensed (full false): per time bucket its first, lowest, highest and last points, plus the point in
// effect at `dayAgo`, so the line keeps its extremes and the move over 24 hours stays exact.

const BUCKETS = 50;
const CONCURRENT = 4;

const queue = [];
let running = 0;

self.addEventListener("message", (event) => {
  queue.push(event.data);
  pump();
});

function pump() {
  while (running < CONCURRENT && queue.length > 0) {
    const request = queue.shift();
    running += 1;
    answer(request).finally(() => {
      running -= 1;
      pump();
    });
  }
}

async function answer({ id, pair, since, dayAgo, full }) {
  const [source, destination] = pair.split("/");
  const url = `/api/rates/history?source_currency=${source}&destination_currency=${destination}` +
    `&since=${encodeURIComponent(since)}&limit=5000`;
  try {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const body = await response.json();
    const points = body.data.points.map((p) => ({ at: p.at, value: p.destination_per_source }));
    self.postMessage({ id, points: full ? points : condense(points, Date.parse(since), dayAgo) });
  } catch (error) {
    self.postMessage({ id, error: String(error) });
  }
}

function condense(points, start, dayAgo) {
  if (points.length <= BUCKETS * 2) return points;
  const width = (Date.now() - start) / BUCKETS;
  const kept = new Set();
  let bucket = -1;
  let first;
  let low;
  let high;
  let last;
  const close = () => {
    if (first !== undefined) for (const index of [first, low, high, last]) kept.add(index);
  };
  let inEffect = -1;
  points.forEach((point, index) => {
    const time = Date.parse(point.at);
    if (time <= dayAgo) inEffect = index;
    const b = Math.floor((time - start) / width);
    if (b !== bucket) {
      close();
      bucket = b;
      first = low = high = index;
    }
    if (point.value < points[low].value) low = index;
    if (point.value > points[high].value) high = index;
    last = index;
  });
  close();
  if (inEffect >= 0) kept.add(inEffect);
  return [...kept].sort((a, b) => a - b).map((index) => points[index]);
}

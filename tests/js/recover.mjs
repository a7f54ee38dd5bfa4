// Connect / subscribe / recover with the npm `centrifuge` SDK, unchanged, against tidings.
// Usage: node recover.mjs BASE_URL TOKEN API_KEY CHANNEL — prints one JSON line per step.
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const [base, token, apiKey, channel] = process.argv.slice(2);
const wsUrl = base.replace(/^http/, 'ws') + '/connection/websocket';
const out = (step, data) => console.log(JSON.stringify({ step, ...data }));

async function publish(data) {
  const r = await fetch(base + '/api/publish', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': apiKey },
    body: JSON.stringify({ channel, data }),
  });
  const body = await r.json();
  if (!body.result) throw new Error('publish failed: ' + JSON.stringify(body));
}

function waitFor(emitter, event) {
  return new Promise((resolve) => emitter.once(event, resolve));
}

const client = new Centrifuge(wsUrl, { token, websocket: WebSocket, debug: false });
const sub = client.newSubscription(channel, { recoverable: true });
const pubs = [];
let onPub = null;
sub.on('publication', (ctx) => {
  pubs.push({ data: ctx.data, offset: ctx.offset });
  if (onPub) onPub();
});
const nextPubs = (n) => new Promise((resolve) => {
  const check = () => { if (pubs.length >= n) { onPub = null; resolve(pubs.slice(0, n)); } };
  onPub = check;
  check();
});

const subscribed = waitFor(sub, 'subscribed');
sub.subscribe();
client.connect();
const first = await subscribed;
out('subscribed', { recoverable: first.recoverable, wasRecovering: first.wasRecovering });
await publish({ n: 0 });
out('live', { pubs: await nextPubs(1) });

const disconnected = waitFor(client, 'disconnected');
client.disconnect();
await disconnected;
for (let i = 1; i <= 3; i++) await publish({ n: i });
const again = waitFor(sub, 'subscribed');
client.connect();
const ctx = await again;
out('resubscribed', { recovered: ctx.recovered, wasRecovering: ctx.wasRecovering });
out('recovered', { pubs: (await nextPubs(4)).slice(1) });
client.disconnect();
process.exit(0);

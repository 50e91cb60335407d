// How long outcomes take to reach a consumer: for every outcome that arrives during the run,
// the time from the worker's decision (`decided_at`) to its arrival here, on an exclusive queue
// of its own (nothing is taken from anyone else's queue). The benchmark's independent check
// (docs/PERFORMANCE.md); a consuming team can use it to see its own lag. Clocks of the worker and
// of this machine must agree (same host, or NTP: a skew shows as lag).
//
//   AMQP_URL=amqp://user:password@host:5672/vhost node lag.mjs [--exchange NAME] [--seconds N]
//
// Prints one JSON line: outcomes, and p50, p90, p99 and max in milliseconds.

import { parseArgs } from 'node:util';
import amqp from 'amqplib';

const { values: args } = parseArgs({
  options: {
    exchange: { type: 'string', default: 'induction.outcomes' },
    seconds: { type: 'string', default: '10' },
  },
});
const connection = await amqp.connect(process.env.AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/%2f');
const channel = await connection.createChannel();
const { queue } = await channel.assertQueue('', { exclusive: true, autoDelete: true });
await channel.bindQueue(queue, args.exchange, 'outcome.#');
const lags = [];
await channel.consume(queue, (message) => {
  const decided = Date.parse(JSON.parse(message.content.toString()).decided_at);
  if (!Number.isNaN(decided)) lags.push(Date.now() - decided);
}, { noAck: true });
await new Promise((resolve) => setTimeout(resolve, Number(args.seconds) * 1000));
await connection.close();
lags.sort((a, b) => a - b);
const at = (p) => (lags.length ? lags[Math.min(lags.length - 1, Math.floor(lags.length * p))] : null);
console.log(JSON.stringify({ outcomes: lags.length, p50_ms: at(0.5), p90_ms: at(0.9), p99_ms: at(0.99), max_ms: lags.at(-1) ?? null }));

// A consumer of induction-reconciler's outcomes in Node.js with amqplib: declares its own
// durable queue, binds it to the outcome exchange, and applies each outcome by the consumer's
// rule (outcomes.mjs), writing its state to a file before it acknowledges.
//
//   AMQP_URL=amqp://user:password@host:5672/vhost node consumer.mjs --queue NAME [options]
//
//   --queue NAME        your own queue (required)
//   --exchange NAME     the outcome exchange (default induction.outcomes)
//   --binding KEY       binding key (default outcome.#; outcome.conflict for one status)
//   --state FILE        where the state is kept (default state.json); read at start
//   --declare-only      declare and bind the queue, then exit: do this before asking for a resync
//   --until-idle MS     exit 0 once the queue is empty and nothing arrived for MS milliseconds
//   --deadline MS       exit 2 if still running after MS milliseconds (default: no deadline)
//
// On exit it prints one JSON line of counts: applied, duplicate, stale, rejected, teachers.
// Without --until-idle it runs until SIGTERM or SIGINT. On losing the broker it exits 1: run it
// under a supervisor that restarts it. A restart is safe: the state is written before the ack,
// so a redelivered outcome is a duplicate or stale and is dropped.

import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import amqp from 'amqplib';
import { apply, invalid } from './outcomes.mjs';

const { values: args } = parseArgs({
  options: {
    queue: { type: 'string' },
    exchange: { type: 'string', default: 'induction.outcomes' },
    binding: { type: 'string', default: 'outcome.#' },
    state: { type: 'string', default: 'state.json' },
    'declare-only': { type: 'boolean', default: false },
    'until-idle': { type: 'string' },
    deadline: { type: 'string' },
  },
});

function fail(message, code = 1) {
  console.error(`consumer: ${message}`);
  process.exit(code);
}

function milliseconds(name) {
  const text = args[name];
  if (text === undefined) return undefined;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n <= 0) fail(`--${name} takes a positive number of milliseconds`);
  return n;
}

if (!args.queue) fail('--queue NAME is required');
const url = process.env.AMQP_URL;
if (!url) fail('set AMQP_URL (it is never printed)');
const idle = milliseconds('until-idle');
const deadline = milliseconds('deadline');
if (deadline !== undefined) {
  setTimeout(() => fail(`still running after the ${deadline} ms deadline`, 2), deadline).unref();
}

function load(path) {
  try {
    return JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    if (error.code === 'ENOENT') return { teachers: {} };
    fail(`cannot read the state file ${path}: ${error.message}`);
  }
}

// Written to a temporary file and renamed, so that a crash never leaves half a state.
function save(path, state) {
  writeFileSync(`${path}.tmp`, JSON.stringify(state));
  renameSync(`${path}.tmp`, path);
}

const connection = await amqp.connect(url, { clientProperties: { connection_name: 'node-client consumer' } });
let closing = false;
connection.on('error', (error) => console.error(`consumer: connection error: ${error.message}`));
connection.on('close', () => {
  if (!closing) fail('the broker connection closed');
});
const channel = await connection.createChannel();
channel.on('error', (error) => console.error(`consumer: channel error: ${error.message}`));

// A quorum queue: replicated, and it survives a broker restart.
await channel.assertQueue(args.queue, { durable: true, arguments: { 'x-queue-type': 'quorum' } });
await channel.bindQueue(args.queue, args.exchange, args.binding);
if (args['declare-only']) {
  closing = true;
  await connection.close();
  process.exit(0);
}

const state = load(args.state);
const counts = { applied: 0, duplicate: 0, stale: 0, rejected: 0 };
let lastDelivery = Date.now();

await channel.prefetch(100);
const { consumerTag } = await channel.consume(args.queue, (message) => {
  if (message === null) fail('the broker cancelled the consumer');
  lastDelivery = Date.now();
  let outcome;
  try {
    outcome = JSON.parse(message.content.toString('utf8'));
  } catch {
    outcome = undefined;
  }
  const why = outcome === undefined ? 'not JSON' : invalid(outcome);
  if (why !== null) {
    // Not requeued: with a dead-letter exchange on the queue, it goes there for a person.
    console.error(`consumer: rejected a delivery (message_id ${message.properties.messageId}): ${why}`);
    counts.rejected += 1;
    channel.nack(message, false, false);
    return;
  }
  const decision = apply(state.teachers, outcome);
  counts[decision] += 1;
  if (decision === 'applied') save(args.state, state);
  channel.ack(message);
});

async function stop(code) {
  closing = true;
  await channel.cancel(consumerTag);
  await channel.close();
  await connection.close();
  console.log(JSON.stringify({ ...counts, teachers: Object.keys(state.teachers).length }));
  process.exit(code);
}

process.on('SIGTERM', () => stop(0));
process.on('SIGINT', () => stop(0));

if (idle !== undefined) {
  const timer = setInterval(async () => {
    if (Date.now() - lastDelivery < idle) return;
    const { messageCount } = await channel.checkQueue(args.queue);
    if (messageCount === 0 && Date.now() - lastDelivery >= idle) {
      clearInterval(timer);
      await stop(0);
    }
  }, Math.min(idle, 200));
}

// A producer of induction-reconciler's input messages in Node.js with amqplib, with every
// property the contract requires (docs/contracts/asyncapi.yaml, CONTRACT.md section 2):
//
//   - the AMQP user_id is the connection's own user (RabbitMQ refuses any other), and that user
//     must be allowed for the message type, or the worker parks it as unauthorised_publisher;
//   - the routing key is the message type's own: school.registration or ab.claim;
//   - persistent (delivery mode 2), content type application/json, message_id the envelope's;
//   - mandatory, on a confirm channel: a message is sent only once the broker confirms it, and
//     one that no queue would take is reported, not lost in silence.
//
//   AMQP_URL=amqp://school-service:password@host:5672/vhost node producer.mjs [FILE|-] [--exchange NAME]
//
// FILE (or standard input) holds one JSON message per line. Every line is checked before
// anything is sent. Prints one JSON line: {"published": N}. Exits 1 on any error.

import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import amqp from 'amqplib';

const ROUTING_KEYS = { school_registration: 'school.registration', ab_claim: 'ab.claim' };

const { values: args, positionals } = parseArgs({
  options: { exchange: { type: 'string', default: 'induction.events' } },
  allowPositionals: true,
});

function fail(message) {
  console.error(`producer: ${message}`);
  process.exit(1);
}

const url = process.env.AMQP_URL;
if (!url) fail('set AMQP_URL (it is never printed)');
// RabbitMQ checks user_id against the connection's user; the URL names that user.
const user = decodeURIComponent(new URL(url).username || 'guest');
const source = positionals[0] ?? '-';
const text = readFileSync(source === '-' ? 0 : source, 'utf8');

const messages = [];
text.split('\n').forEach((line, index) => {
  if (line.trim() === '') return;
  let message;
  try {
    message = JSON.parse(line);
  } catch (error) {
    fail(`line ${index + 1} is not JSON: ${error.message}`);
  }
  const routingKey = ROUTING_KEYS[message?.message_type];
  if (routingKey === undefined) fail(`line ${index + 1} has no message_type this producer sends`);
  if (typeof message.message_id !== 'string') fail(`line ${index + 1} has no message_id`);
  messages.push({ body: Buffer.from(line, 'utf8'), routingKey, message });
});

const connection = await amqp.connect(url, { clientProperties: { connection_name: `node-client producer (${user})` } });
connection.on('error', (error) => console.error(`producer: connection error: ${error.message}`));
const channel = await connection.createConfirmChannel();
channel.on('error', (error) => console.error(`producer: channel error: ${error.message}`));
let returned = 0;
channel.on('return', (message) => {
  returned += 1;
  console.error(`producer: no queue took message ${message.properties.messageId} (${message.fields.routingKey})`);
});

for (const { body, routingKey, message } of messages) {
  const flowing = channel.publish(args.exchange, routingKey, body, {
    persistent: true,
    mandatory: true,
    contentType: 'application/json',
    contentEncoding: 'utf-8',
    messageId: message.message_id,
    type: message.message_type,
    userId: user,
    appId: 'node-client producer',
    ...(typeof message.correlation_id === 'string' ? { correlationId: message.correlation_id } : {}),
  });
  if (!flowing) await new Promise((resolve) => channel.once('drain', resolve));
}
try {
  await channel.waitForConfirms();
} catch (error) {
  fail(`the broker did not confirm every message: ${error.message}`);
}
await connection.close();
if (returned > 0) fail(`${returned} of ${messages.length} messages were returned unrouted`);
console.log(JSON.stringify({ published: messages.length }));

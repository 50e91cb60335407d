// Parse and validate an AsyncAPI document with the AsyncAPI project's own parser, resolving the
// payloads' relative $refs from the document's folder. Prints a JSON summary of what it names
// (channel addresses, exchange and queue names, header names) for tests/asyncapi.rs to compare
// with the worker; exits 1 with the diagnostics on any error.
//
//     node parse-asyncapi.mjs FILE
import { resolve } from "node:path";
import { Parser, fromFile } from "@asyncapi/parser";

const file = resolve(process.argv[2]);
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, file).parse();
const errors = diagnostics.filter((d) => d.severity === 0);
if (!document || errors.length > 0) {
  console.error(JSON.stringify(errors.map((d) => ({ message: d.message, path: d.path })), null, 2));
  process.exit(1);
}
const channels = document.channels().all().map((c) => {
  const amqp = c.bindings().get("amqp")?.value() ?? {};
  return {
    id: c.id(),
    address: c.address(),
    exchange: amqp.exchange?.name ?? null,
    exchange_type: amqp.exchange?.type ?? null,
    queue: amqp.queue?.name ?? null,
    messages: c.messages().all().map((m) => m.id()),
    headers: c.messages().all().flatMap((m) => (m.headers() ? Object.keys(m.headers().properties() ?? {}) : [])),
  };
});
const operations = document.operations().all().map((o) => ({
  id: o.id(),
  action: o.action(),
  amqp: o.bindings().get("amqp")?.value() ?? {},
}));
const warnings = diagnostics.filter((d) => d.severity === 1).map((d) => d.message);
process.stdout.write(JSON.stringify({ channels, operations, warnings }) + "\n");

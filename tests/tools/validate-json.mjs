// Validate JSON instances with ajv (draft 2020-12, ajv-formats), as a Node integrator would.
//
//     node validate-json.mjs SCHEMA_DIR CASES
//
// CASES holds one JSON object per line, {"schema": "<file name in SCHEMA_DIR>", "instance": ...}.
// Prints one line per case, in order: {"valid": true|false, "errors": ["..."]}. Strict mode and
// format checking are on; ajv's defaults otherwise (multipleOf in floating point, as shipped).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";

const [schemaDir, casesFile] = process.argv.slice(2);
const ajv = new Ajv2020({ strict: true, allErrors: true, validateFormats: true });
addFormats(ajv);
const validators = new Map();
const out = [];
for (const line of readFileSync(casesFile, "utf8").split("\n")) {
  if (line.trim() === "") continue;
  const { schema, instance } = JSON.parse(line);
  if (!validators.has(schema)) {
    validators.set(schema, ajv.compile(JSON.parse(readFileSync(join(schemaDir, schema), "utf8"))));
  }
  const validate = validators.get(schema);
  const valid = validate(instance);
  const errors = valid ? [] : validate.errors.map((e) => `${e.instancePath}: ${e.message}`);
  out.push(JSON.stringify({ valid, errors }));
}
process.stdout.write(out.join("\n") + (out.length ? "\n" : ""));

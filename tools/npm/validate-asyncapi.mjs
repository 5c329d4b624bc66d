// Validates an AsyncAPI document with the official parser: `node validate-asyncapi.mjs FILE`.
// Prints every diagnostic as one JSON line; exits 1 when there is any, 0 when the parser finds nothing.
// One is left out by name: the service documents AsyncAPI 3.0 on purpose (its contract names that version),
// and `asyncapi-latest-version` only says that a newer one exists.
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const [file] = process.argv.slice(2);
if (!file) {
  console.error("usage: node validate-asyncapi.mjs FILE");
  process.exit(2);
}
const parser = new Parser();
const IGNORED = new Set(["asyncapi-latest-version"]);
const parsed = await parser.parse(await readFile(file, "utf8"));
const { document } = parsed;
const diagnostics = parsed.diagnostics.filter(({ code }) => !IGNORED.has(code));
for (const { code, message, path, severity } of diagnostics) {
  console.log(JSON.stringify({ code, message, path, severity }));
}
if (!document) console.log(JSON.stringify({ code: "unparsed", message: "the parser returned no document" }));
process.exit(diagnostics.length === 0 && document ? 0 : 1);

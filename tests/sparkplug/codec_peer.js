// The independent implementation the Sparkplug tests check against: Eclipse Tahu's sparkplug-payload (npm).
// One JSON request per line on stdin, one JSON answer per line on stdout:
//   {"decode": "<base64 payload>"}  -> the payload as Tahu decodes it (64-bit integers as strings)
//   {"encode": {...payload...}}     -> {"bytes": "<base64>"} as Tahu encodes it (strings ending in "n" are 64-bit)
const readline = require("readline");
const Long = require("long");
const sparkplug = require("sparkplug-payload").get("spBv1.0");

function plain(value) {
  if (Long.isLong(value)) return value.toString();
  if (typeof value === "bigint") return value.toString();
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return {bytes: Buffer.from(value).toString("base64")};
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  if (typeof value === "number" && !Number.isFinite(value)) return {float: String(value)};
  return value;
}

function revive(value) {
  if (typeof value === "string" && /^-?\d+n$/.test(value)) return Long.fromString(value.slice(0, -1), value[0] !== "-");
  if (value && typeof value === "object" && "bytes" in value) return Buffer.from(value.bytes, "base64");
  if (Array.isArray(value)) return value.map(revive);
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = revive(v);
    return out;
  }
  return value;
}

const lines = readline.createInterface({input: process.stdin});
lines.on("line", (line) => {
  const request = JSON.parse(line);
  let answer;
  try {
    if ("decode" in request) {
      answer = {payload: plain(sparkplug.decodePayload(Buffer.from(request.decode, "base64")))};
    } else {
      answer = {bytes: Buffer.from(sparkplug.encodePayload(revive(request.encode))).toString("base64")};
    }
  } catch (err) {
    answer = {error: String(err)};
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
});

// A third-party Sparkplug B edge node: Eclipse Tahu's sparkplug-client (npm), over TLS with a client certificate.
// argv: url ca cert key servername group edgeNode count
// Publishes NBIRTH, a DBIRTH of device pump-1 (metrics with aliases), `count` DDATA by alias, prints "sent N",
// then dies without a clean disconnect (the broker delivers its NDEATH will).
const fs = require("fs");
const sparkplug = require("sparkplug-client");
const [url, ca, cert, key, servername, group, edge, count] = process.argv.slice(2);
const client = sparkplug.newClient({
  serverUrl: url, username: null, password: null, clientId: edge, groupId: group, edgeNode: edge, version: "spBv1.0",
  mqttOptions: {ca: fs.readFileSync(ca), cert: fs.readFileSync(cert), key: fs.readFileSync(key), servername,
                rejectUnauthorized: true, protocolVersion: 4, reconnectPeriod: 0},
});
const start = Date.now();
client.on("birth", () => {
  client.publishNodeBirth({timestamp: start, metrics: [
    {name: "Node Control/Rebirth", type: "Boolean", value: false},
    {name: "Supply Voltage", type: "Float", value: 24.5, timestamp: start}]});
  client.publishDeviceBirth("pump-1", {timestamp: start, metrics: [
    {name: "flow", alias: 1, type: "Double", value: 0.0, timestamp: start},
    {name: "running", alias: 2, type: "Boolean", value: true, timestamp: start},
    {name: "starts", alias: 3, type: "Int64", value: 7, timestamp: start}]});
  for (let i = 1; i <= Number(count); i++) {
    client.publishDeviceData("pump-1", {timestamp: start + i, metrics: [
      {alias: 1, type: "Double", value: i * 1.5, timestamp: start + i},
      {alias: 3, type: "Int64", value: 7 + i, timestamp: start + i}]});
  }
  process.stdout.write(`sent ${count}\n`);
  setTimeout(() => process.kill(process.pid, "SIGKILL"), 500);  // no clean goodbye: the will says NDEATH
});
client.on("error", (err) => { process.stderr.write(String(err) + "\n"); process.exit(2); });

// An edge node built on Eclipse Tahu's JavaScript client (sparkplug-client from npm), driven
// by the interop tests: one JSON command per line on stdin, one JSON event per line on
// stdout. It publishes what an application on the Tahu client publishes; the tests assert
// what edge-agent does with it, never what this client does beyond the specification.
//
//   node edge_node.cjs URL GROUP EDGE_NODE
//   {"cmd": "birth"}                      NBIRTH + DBIRTH "Filler" (metrics with aliases)
//   {"cmd": "ddata", "temp": 21.5, "count": 7, "running": true}   DDATA by alias only
//   {"cmd": "ndata", "uptime": 12}        NDATA by alias only
//   {"cmd": "skip_seq"}                   the next message skips one seq (a lost message)
//   {"cmd": "ddeath"}                     DDEATH "Filler"
//   {"cmd": "stop"}                       NDEATH (publishDeath) and disconnect
//   {"cmd": "auto_birth"}                 from now on, births again after every reconnect
// events: {"event": "connected"}, {"event": "ncmd", "rebirth": true}, {"event": "sent", ...}
"use strict";
const readline = require("readline");
const sparkplug = require("sparkplug-client");

const [url, groupId, edgeNode] = process.argv.slice(2);
const client = sparkplug.newClient({
  serverUrl: url,
  username: "",
  password: "",
  groupId,
  edgeNode,
  clientId: `tahu-${edgeNode}-${process.pid}`,
  publishDeath: true,
  version: "spBv1.0",
});

const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const now = () => Date.now();

function births() {
  client.publishNodeBirth({
    timestamp: now(),
    metrics: [
      { name: "Node Control/Rebirth", type: "Boolean", value: false },
      { name: "Uptime", alias: 1, type: "Int64", value: 0 },
      { name: "Site", alias: 2, type: "String", value: "Plant 1" },
    ],
  });
  client.publishDeviceBirth("Filler", {
    timestamp: now(),
    metrics: [
      {
        name: "Temperature", alias: 10, type: "Double", value: 20.0,
        properties: { engUnit: { type: "String", value: "°C" } },
      },
      { name: "Count", alias: 11, type: "Int32", value: 0 },
      { name: "Running", alias: 12, type: "Boolean", value: false },
      { name: "Offset", alias: 13, type: "Int16", value: -3 },
    ],
  });
  say({ event: "sent", what: "births" });
}

let autoBirth = false; // {"cmd": "auto_birth"}: births on every (re)connect, as a Tahu app does
client.on("connect", () => say({ event: "connected" }));
client.on("birth", () => { if (autoBirth) births(); });
client.on("ncmd", (payload) => {
  const rebirth = (payload.metrics || []).some(
    (m) => m.name === "Node Control/Rebirth" && m.value === true
  );
  say({ event: "ncmd", rebirth });
  if (rebirth) births();
});
client.on("error", (e) => say({ event: "error", text: String(e) }));

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const c = JSON.parse(line);
  if (c.cmd === "birth") births();
  else if (c.cmd === "auto_birth") autoBirth = true;
  else if (c.cmd === "ddata") {
    const metrics = [];
    if (c.temp !== undefined) metrics.push({ alias: 10, type: "Double", value: c.temp, timestamp: c.ts || now() });
    if (c.count !== undefined) metrics.push({ alias: 11, type: "Int32", value: c.count, timestamp: c.ts || now() });
    if (c.running !== undefined) metrics.push({ alias: 12, type: "Boolean", value: c.running, timestamp: c.ts || now() });
    client.publishDeviceData("Filler", { timestamp: now(), metrics });
    say({ event: "sent", what: "ddata", seq: client.seq - 1 });
  } else if (c.cmd === "ndata") {
    client.publishNodeData({ timestamp: now(), metrics: [{ alias: 1, type: "Int64", value: c.uptime }] });
    say({ event: "sent", what: "ndata" });
  } else if (c.cmd === "skip_seq") {
    client.seq = (client.seq + 1) % 256;
    say({ event: "sent", what: "skip_seq" });
  } else if (c.cmd === "ddeath") {
    client.publishDeviceDeath("Filler", { timestamp: now(), metrics: [] });
    say({ event: "sent", what: "ddeath" });
  } else if (c.cmd === "stop") {
    client.stop();
    say({ event: "sent", what: "stop" });
    setTimeout(() => process.exit(0), 300);
  }
});
rl.on("close", () => { client.stop(); setTimeout(() => process.exit(0), 300); });

// Publisher for bench/compare.py: emits events to a user's room through
// @socket.io/redis-emitter, one emit per line read on stdin.
//
//   node emit.js [REDIS_URL] [KEY_PREFIX]
//
// Prints "ready" once connected to Redis. Then each stdin line "USER SEQ" emits one
// "event" to the room user:USER with a payload shaped like Courier's event frame;
// data.t is the wall-clock time in microseconds just before the emit. After Redis has
// taken the PUBLISH (a PING sent after it on the same connection was answered), prints
// "sent SEQ". Exits when stdin closes.
"use strict";

const readline = require("node:readline");
const { performance } = require("node:perf_hooks");
const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

const redisUrl = process.argv[2] || process.env.SIO_REDIS_URL || "redis://127.0.0.1:6379/9";
const key = process.argv[3] || process.env.SIO_KEY || "courier-bench-sio";

function nowMicros() {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

async function main() {
  const client = createClient({ url: redisUrl });
  client.on("error", (err) => console.error("redis:", err.message));
  await client.connect();
  const emitter = new Emitter(client, { key });
  console.log("ready");

  const lines = readline.createInterface({ input: process.stdin, terminal: false });
  for await (const line of lines) {
    const [user, seqText] = line.trim().split(/\s+/);
    if (!user) continue;
    const seq = Number(seqText);
    const t = nowMicros();
    emitter.to(`user:${user}`).emit("event", {
      type: "event",
      id: `evt-${seq}`,
      seq,
      kind: "bench.fanout",
      data: { t, r: seq - 1 },
      created_at: new Date(t / 1000).toISOString(),
    });
    await client.ping();
    console.log(`sent ${seq}`);
  }
  await client.quit();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

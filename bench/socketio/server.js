// Socket.IO peer for bench/compare.py: one Node process, WebSocket transport only,
// the Redis adapter on its own Redis database and channel prefix. Each socket joins the
// room of its user (handshake auth {user}); events come from emit.js through Redis.
//
//   node server.js PORT [REDIS_URL] [KEY_PREFIX]
//
// Prints "ready PORT" once listening and subscribed; stops on SIGTERM or SIGINT.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const port = Number(process.argv[2] || process.env.SIO_PORT || 0);
const redisUrl = process.argv[3] || process.env.SIO_REDIS_URL || "redis://127.0.0.1:6379/9";
const key = process.argv[4] || process.env.SIO_KEY || "courier-bench-sio";

async function main() {
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  for (const c of [pubClient, subClient]) c.on("error", (err) => console.error("redis:", err.message));
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    adapter: createAdapter(pubClient, subClient, { key }),
  });
  io.on("connection", (socket) => {
    const user = socket.handshake.auth && socket.handshake.auth.user;
    if (typeof user !== "string" || user === "") {
      socket.disconnect(true);
      return;
    }
    socket.join(`user:${user}`);
  });

  const stop = () => {
    io.close();
    Promise.allSettled([pubClient.quit(), subClient.quit()]).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);

  httpServer.listen(port, "127.0.0.1", () => {
    console.log(`ready ${httpServer.address().port}`);
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

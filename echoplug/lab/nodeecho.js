// echoplug/lab/nodeecho.js - the Node.js peer of the reactor lab: a TCP echo
// on Node's own event loop (libuv), `node nodeecho.js PORT`, on 127.0.0.1.
// pipe() is Node's flow control: it pauses the read side while the write
// side's buffer is full. allowHalfOpen lets a client's FIN end the echo only
// after everything it sent has gone back.
"use strict";
const net = require("net");
const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port < 1 || port > 65535) {
  process.stderr.write("usage: node nodeecho.js PORT\n");
  process.exit(2);
}
const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (socket) => {
  socket.on("error", () => socket.destroy());
  socket.pipe(socket);
});
server.on("error", (e) => {
  process.stderr.write(`node echo: cannot listen on 127.0.0.1:${port}: ${e.code}\n`);
  process.exit(1);
});
server.listen(port, "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));

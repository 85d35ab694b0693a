# -*- test-case-name: tests.test_servers -*-
"""
The optional Python peers, each its library's own TCP echo in a few lines,
as a process: C{python -m echoplug.lab.peers KIND PORT}.

  - C{gevent}: C{gevent.server.StreamServer}, a greenlet per connection
    doing blocking-style C{recv} and C{sendall} on libev;
  - C{tornado}: C{tornado.tcpserver.TCPServer}, a coroutine per stream
    (C{read_bytes(partial=True)}, C{write}) on the asyncio loop;
  - C{trio}: C{trio.serve_tcp}, a task per connection iterating its stream.

Each sets C{TCP_NODELAY} (as Twisted's and asyncio's transports may), reads
up to 64 KiB at a time, and waits for a write to drain before the next read,
which is each library's flow control. None is a dependency of echoplug: the
C{bench} extra installs them, and L{echoplug.lab.servers.missing} says when
one is absent.
"""

from __future__ import annotations

import functools
import socket
import sys
from collections.abc import Callable

CHUNK = 65536


def gevent(port: int) -> None:
    from gevent.server import StreamServer

    def echo(sock: socket.socket, address: object) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := sock.recv(CHUNK):
            sock.sendall(data)

    StreamServer(("127.0.0.1", port), echo).serve_forever()


def tornado(port: int) -> None:
    import asyncio

    from tornado.iostream import IOStream, StreamClosedError
    from tornado.tcpserver import TCPServer

    class Echo(TCPServer):
        async def handle_stream(self, stream: IOStream, address: object) -> None:
            stream.set_nodelay(True)
            try:
                while True:
                    await stream.write(await stream.read_bytes(CHUNK, partial=True))
            except StreamClosedError:
                pass

    async def serve() -> None:
        Echo().listen(port, "127.0.0.1")
        await asyncio.Event().wait()

    asyncio.run(serve())


def trio(port: int) -> None:
    import trio

    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:  # trio streams set TCP_NODELAY themselves
            await stream.send_all(data)

    trio.run(functools.partial(trio.serve_tcp, echo, port, host="127.0.0.1"))


PEERS: dict[str, Callable[[int], None]] = {"gevent": gevent, "tornado": tornado, "trio": trio}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in PEERS or not args[1].isdigit():
        print(f"usage: python -m echoplug.lab.peers {{{','.join(PEERS)}}} PORT",
              file=sys.stderr)
        return 2
    try:
        PEERS[args[0]](int(args[1]))
    except ImportError as e:
        print(f"{args[0]} echo: {e.name} is not installed (pip install {e.name})",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{args[0]} echo: cannot listen on 127.0.0.1:{args[1]}: {e.strerror}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

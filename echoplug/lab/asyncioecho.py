# -*- test-case-name: tests.test_servers -*-
"""
The stdlib asyncio peer: the echo server from the asyncio documentation
(a C{Protocol} whose C{data_received} writes the data back), as a process.

It is the "no Twisted" baseline in C{echoplug-bench --peer asyncio}. It runs
on the stdlib event loop, whatever reactor the sweep is on, and like stock
C{wire.Echo} it has no flow control. With C{--uvloop} the same protocol runs
on uvloop's loop (C{--peer uvloop}), if uvloop is installed: it is not a
dependency of echoplug, only something to measure against.

With C{--udp} it serves UDP instead: the C{DatagramProtocol} echo of the
asyncio documentation (C{datagram_received} sends the datagram back with
C{transport.sendto}), the peer of C{echoplug-bench --workload udp}.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class EchoDatagramProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


async def serveUDP(port: int, name: str = "stdlib") -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(EchoDatagramProtocol,
                                                       local_addr=("127.0.0.1", port))
    host, bound = transport.get_extra_info("sockname")[:2]
    print(f"listening on {host}:{bound}, reactor={name} ({type(loop).__name__}), UDP",
          flush=True)
    await asyncio.Event().wait()  # until interrupted


async def serve(port: int, name: str = "stdlib") -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", port)
    host, bound = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{bound}, reactor={name} ({type(loop).__name__})", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    useUvloop = "--uvloop" in args
    if useUvloop:
        args.remove("--uvloop")
    udp = "--udp" in args
    if udp:
        args.remove("--udp")
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m echoplug.lab.asyncioecho [--uvloop] [--udp] PORT",
              file=sys.stderr)
        return 2
    loopFactory = None
    if useUvloop:
        try:
            import uvloop
        except ImportError:
            print("asyncio echo: uvloop is not installed (pip install uvloop)", file=sys.stderr)
            return 1
        loopFactory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loopFactory) as runner:
            run = serveUDP if udp else serve
            runner.run(run(int(args[0]), "uvloop" if useUvloop else "stdlib"))
    except OSError as e:
        print(f"asyncio echo: cannot listen on 127.0.0.1:{args[0]}: {e.strerror}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

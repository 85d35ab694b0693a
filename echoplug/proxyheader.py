# -*- test-case-name: tests.test_proxyheader -*-
"""
The PROXY protocol header (HAProxy's C{doc/proxy-protocol.txt}, v1 text and
v2 binary), parsed without I/O: feed it bytes as they arrive, in any split.

A balancer that speaks the PROXY protocol sends one header before the
client's first byte; it names the client's address (and the address the
client connected to). L{HeaderParser} assembles that header from any number
of reads and hands back the header and whatever followed it, which is the
client's data. It never reads more than L{V1_MAX} bytes of a v1 header or
C{16 + maxV2} of a v2 one, and every malformed input raises
L{ProxyHeaderError}, never anything else.

Twisted's own parser (C{twisted.protocols.haproxy}) sits behind a
C{ProtocolWrapper} and rejects a first read shorter than the signature
(Twisted issue #8287); this one only parses, so the protocol that uses it
keeps half-close, flow control and its own C{connectionMade}.

Accepted: v1 C{TCP4}, C{TCP6} and C{UNKNOWN}; v2 C{PROXY} over TCP4 or TCP6
and C{LOCAL} (what health checks send). v2 over UDP or UNIX sockets, and
UNSPEC, fall back to the connection's own addresses, as the spec allows.
v2 TLVs are skipped, within the length the header gives.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address

#: The v1 signature, and the longest v1 header (CRLF included) the spec allows.
V1_SIGNATURE = b"PROXY "
V1_MAX = 107
#: The v2 signature: 12 bytes, then version/command, family, length.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
#: The default bound on what follows v2's fixed part (addresses and TLVs).
#: Addresses take at most 216 bytes (UNIX); AWS and HAProxy's TLVs are tens
#: to a few hundred bytes. The spec's 16-bit length allows 65535.
V2_MAX = 2048

Address = IPv4Address | IPv6Address


class ProxyHeaderError(Exception):
    """
    A connection did not start with a valid PROXY header.

    @ivar reason: one word for the metrics and the log: C{malformed},
        C{oversized} (longer than the parser allows), C{incomplete} (the
        stream ended within it) or C{missing} (no signature, where one is
        required). The protocol adds C{timeout}.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """
    A complete PROXY header.

    @ivar version: 1 or 2.
    @ivar source: the client's address, or C{None} when the header gives
        none (v1 C{UNKNOWN}, v2 C{LOCAL}, UNSPEC, UDP or UNIX): then the
        connection's own peer is the client.
    @ivar destination: the address the client connected to, or C{None}.
    @ivar local: v2 C{LOCAL}: the balancer speaks for itself (health checks).
    """

    version: int
    source: Address | None
    destination: Address | None
    local: bool = False


@dataclass(frozen=True)
class Result:
    """
    What L{HeaderParser.feed} returns once it has decided.

    @ivar header: the header, or C{None}: the connection does not start with
        a signature (only in optional mode), so it is plain data.
    @ivar rest: the bytes after the header (or all of them, for plain data):
        the client's, to be served as if they had just arrived.
    """

    header: Header | None
    rest: bytes


def _signaturePrefix(data: bytes) -> bool:
    """C{data} is, so far, the start of a v1 or v2 signature."""
    return V1_SIGNATURE.startswith(data[:6]) or V2_SIGNATURE.startswith(data[:12])


class HeaderParser:
    """
    Assemble one PROXY header from reads of any size.

    @param optional: a connection that does not start with a signature is
        plain data (L{Result} with no header) instead of an error.
    @param maxV2: the most bytes accepted after v2's 16-byte fixed part.
    """

    def __init__(self, optional: bool = False, maxV2: int = V2_MAX) -> None:
        self.optional = optional
        self.maxV2 = maxV2
        self.buffer = b""

    def feed(self, data: bytes) -> Result | None:
        """
        Add C{data}; return the L{Result} once decided, C{None} while more
        bytes are needed.

        @raise ProxyHeaderError: the header is malformed or too long, or
            absent in required mode.
        """
        buf = self.buffer = self.buffer + data
        if buf.startswith(V2_SIGNATURE):
            return self._v2(buf)
        if buf.startswith(V1_SIGNATURE):
            return self._v1(buf)
        if _signaturePrefix(buf):
            return None  # "PRO", "\r\n\r": either a signature or plain, later
        if self.optional:
            self.buffer = b""
            return Result(None, buf)
        raise ProxyHeaderError("missing", "no PROXY protocol signature")

    def end(self) -> Result:
        """
        The connection sent EOF before the parser decided: in optional mode
        what it has is plain data (a prefix of a signature, never a header).

        @raise ProxyHeaderError: in required mode, or within a header.
        """
        buf, self.buffer = self.buffer, b""
        if self.optional and not buf.startswith((V1_SIGNATURE, V2_SIGNATURE)):
            return Result(None, buf)
        raise ProxyHeaderError("incomplete", "end of stream within the PROXY header")

    def _v1(self, buf: bytes) -> Result | None:
        end = buf.find(b"\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise ProxyHeaderError("oversized", f"PROXY v1 header over {V1_MAX} bytes")
            return None
        if buf[end - 1:end] != b"\r":
            raise ProxyHeaderError("malformed", "PROXY v1 header not ended by CRLF")
        self.buffer = b""
        return Result(parseV1(buf[:end - 1]), buf[end + 1:])

    def _v2(self, buf: bytes) -> Result | None:
        if len(buf) < V2_FIXED:
            return None
        verCmd, family, length = struct.unpack_from("!BBH", buf, 12)
        if verCmd >> 4 != 2:
            raise ProxyHeaderError("malformed", f"PROXY v2 version {verCmd >> 4}")
        command = verCmd & 0xF
        if command > 1:
            raise ProxyHeaderError("malformed", f"PROXY v2 command {command}")
        if length > self.maxV2:
            raise ProxyHeaderError(
                "oversized", f"PROXY v2 header of {V2_FIXED + length} bytes, "
                f"over {V2_FIXED + self.maxV2}")
        if family not in V2_FAMILIES:
            raise ProxyHeaderError("malformed", f"PROXY v2 family 0x{family:02x}")
        if len(buf) < V2_FIXED + length:
            return None
        self.buffer = b""
        block = buf[V2_FIXED:V2_FIXED + length]
        rest = buf[V2_FIXED + length:]
        if command == 0:
            # LOCAL: the balancer's own connection; addresses ignored.
            return Result(Header(2, None, None, local=True), rest)
        return Result(parseV2Addresses(family, block), rest)


#: v2 family/protocol bytes the spec defines: the address block size for the
#: ones whose addresses are used, C{None} for those that fall back to the
#: connection's own (UNSPEC, UDP, UNIX).
V2_FAMILIES: dict[int, int | None] = {
    0x00: None,  # UNSPEC
    0x11: 12, 0x12: None,  # TCP4, UDP4
    0x21: 36, 0x22: None,  # TCP6, UDP6
    0x31: None, 0x32: None,  # UNIX stream, datagram
}


def parseV2Addresses(family: int, block: bytes) -> Header:
    """
    The addresses of a v2 PROXY command; what follows them (TLVs) is skipped.

    @raise ProxyHeaderError: the block is shorter than the family needs.
    """
    need = V2_FAMILIES[family]
    if family == 0x31 or family == 0x32:
        need = 216  # checked for size, then ignored: fall back
    if need is not None and len(block) < need:
        raise ProxyHeaderError(
            "malformed", f"PROXY v2 address block of {len(block)} bytes, "
            f"family 0x{family:02x} needs {need}")
    if family == 0x11:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
        return Header(2, IPv4Address("TCP", str(ipaddress.IPv4Address(src)), sport),
                      IPv4Address("TCP", str(ipaddress.IPv4Address(dst)), dport))
    if family == 0x21:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
        return Header(2, IPv6Address("TCP", str(ipaddress.IPv6Address(src)), sport),
                      IPv6Address("TCP", str(ipaddress.IPv6Address(dst)), dport))
    return Header(2, None, None)


def parseV1(line: bytes) -> Header:
    """
    One v1 header line without its CRLF: C{PROXY TCP4 src dst sport dport}.

    @raise ProxyHeaderError: anything but what the spec allows (single
        spaces, literal addresses of the named family, decimal ports).
    """
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("malformed", "PROXY v1 header is not ASCII") from None
    if "\r" in text:
        raise ProxyHeaderError("malformed", "PROXY v1 header not ended by CRLF")
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # The spec: the receiver ignores everything after UNKNOWN.
        return Header(1, None, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed", f"PROXY v1 header {text[:40]!r}")
    _, proto, src, dst, sport, dport = parts
    cls: type[ipaddress.IPv4Address | ipaddress.IPv6Address]
    cls, kind = ((ipaddress.IPv4Address, IPv4Address) if proto == "TCP4"
                 else (ipaddress.IPv6Address, IPv6Address))
    return Header(1, kind("TCP", _ip(cls, src), _port(sport)),
                  kind("TCP", _ip(cls, dst), _port(dport)))


def _ip(cls: type[ipaddress.IPv4Address | ipaddress.IPv6Address], text: str) -> str:
    # No zone ("%eth0") and nothing but the address: ipaddress allows zones.
    if "%" in text:
        raise ProxyHeaderError("malformed", "PROXY v1 address with a zone")
    try:
        return str(cls(text))
    except ValueError:
        raise ProxyHeaderError("malformed", "PROXY v1 address is not an address") from None


def _port(text: str) -> int:
    # Decimal digits only (int() would take "+1", " 1", "1_0", Arabic-Indic digits), no
    # leading zero, at most 65535.
    if (not text or not text.isascii() or not text.isdigit()
            or (text[0] == "0" and text != "0") or int(text) > 65535):
        raise ProxyHeaderError("malformed", "PROXY v1 port is not 0 to 65535")
    return int(text)

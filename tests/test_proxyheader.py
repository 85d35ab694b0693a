"""
Tests of L{echoplug.proxyheader}: v1 and v2 headers from the spec's layouts,
assembled from any split of the bytes (hypothesis), and garbage that never
raises anything but L{ProxyHeaderError}.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address

from echoplug.proxyheader import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    Header,
    HeaderParser,
    ProxyHeaderError,
    Result,
)


def v1(src: str, dst: str, sport: int, dport: int, proto: str = "TCP4") -> bytes:
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str | None = None, dst: str | None = None, sport: int = 0, dport: int = 0,
       local: bool = False, tlvs: bytes = b"", family: int | None = None) -> bytes:
    block = b""
    if src is not None and dst is not None:
        a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        block = a.packed + b.packed + struct.pack("!HH", sport, dport)
        family = family if family is not None else (0x11 if a.version == 4 else 0x21)
    block += tlvs
    verCmd = 0x20 if local else 0x21
    return V2_SIGNATURE + struct.pack("!BBH", verCmd, family or 0, len(block)) + block


def parse(data: bytes, optional: bool = False) -> Result | None:
    return HeaderParser(optional=optional).feed(data)


def feedAll(chunks: list[bytes], optional: bool = False) -> Result | None:
    """Feed chunk by chunk, as reads arrive; once decided, later bytes are the rest."""
    parser = HeaderParser(optional=optional)
    result = None
    rest = b""
    for chunk in chunks:
        if result is None:
            result = parser.feed(chunk)
        else:
            rest += chunk
    return result if result is None else Result(result.header, result.rest + rest)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# The spec's examples.


def test_v1_tcp4() -> None:
    r = parse(v1("192.0.2.1", "198.51.100.2", 56324, 443) + b"hello")
    assert r == Result(Header(1, IPv4Address("TCP", "192.0.2.1", 56324),
                              IPv4Address("TCP", "198.51.100.2", 443)), b"hello")


def test_v1_tcp6() -> None:
    r = parse(v1("2001:db8::1", "2001:db8::2", 1, 65535, "TCP6"))
    assert r == Result(Header(1, IPv6Address("TCP", "2001:db8::1", 1),
                              IPv6Address("TCP", "2001:db8::2", 65535)), b"")


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    assert parse(b"PROXY UNKNOWN whatever it says\r\nX") == Result(Header(1, None, None), b"X")
    assert parse(b"PROXY UNKNOWN\r\n") == Result(Header(1, None, None), b"")


def test_v1_longest_header_is_accepted() -> None:
    line = v1("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
              65535, 65535, "TCP6")
    assert len(line) == 104
    assert parse(line) is not None
    unknown = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(unknown) == V1_MAX
    assert parse(unknown) == Result(Header(1, None, None), b"")


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",  # LF without CR
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",  # a field short
    b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",  # double space
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n",  # trailing space
    b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",  # v6 in TCP4
    b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",  # v4 in TCP6
    b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",  # zone
    b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",  # leading zero in the address
    b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",  # leading zero in the port
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1_0 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 \xd9\xa1 2\r\n",  # not ASCII
    b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\r\n",
    b"PROXY \r\n",
])
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError) as e:
        parse(line)
    assert e.value.reason == "malformed"


def test_v1_without_crlf_in_107_bytes_is_oversized() -> None:
    parser = HeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15)) is None  # 106 bytes
    with pytest.raises(ProxyHeaderError) as e:
        parser.feed(b"x")
    assert e.value.reason == "oversized"


def test_v2_tcp4_with_tlvs_skipped() -> None:
    tlvs = b"\x04\x00\x03abc" + b"\xea\x00\x05vpc-1"  # NOOP, AWS
    r = parse(v2("192.0.2.1", "198.51.100.2", 56324, 443, tlvs=tlvs) + b"data")
    assert r == Result(Header(2, IPv4Address("TCP", "192.0.2.1", 56324),
                              IPv4Address("TCP", "198.51.100.2", 443)), b"data")


def test_v2_tcp6() -> None:
    r = parse(v2("2001:db8::1", "::ffff:192.0.2.1", 7, 8))
    assert r == Result(Header(2, IPv6Address("TCP", "2001:db8::1", 7),
                              IPv6Address("TCP", "::ffff:c000:201", 8)), b"")


def test_v2_local_ignores_the_addresses() -> None:
    r = parse(v2("192.0.2.1", "198.51.100.2", 1, 2, local=True) + b"x")
    assert r == Result(Header(2, None, None, local=True), b"x")
    assert parse(v2(local=True)) == Result(Header(2, None, None, local=True), b"")


@pytest.mark.parametrize("family", [0x00, 0x12, 0x22, 0x31, 0x32])
def test_v2_unspec_udp_and_unix_fall_back(family: int) -> None:
    r = parse(V2_SIGNATURE + struct.pack("!BBH", 0x21, family, 216) + b"\0" * 216)
    assert r == Result(Header(2, None, None), b"")


@pytest.mark.parametrize("fixed, reason", [
    (struct.pack("!BBH", 0x11, 0x11, 12), "malformed"),  # version 1 in binary
    (struct.pack("!BBH", 0x22, 0x11, 12), "malformed"),  # command 2
    (struct.pack("!BBH", 0x21, 0x13, 12), "malformed"),  # no such protocol
    (struct.pack("!BBH", 0x21, 0x41, 12), "malformed"),  # no such family
    (struct.pack("!BBH", 0x21, 0x11, 11), "malformed"),  # too short for TCP4
    (struct.pack("!BBH", 0x21, 0x21, 35), "malformed"),  # too short for TCP6
    (struct.pack("!BBH", 0x21, 0x31, 215), "malformed"),  # too short for UNIX
    (struct.pack("!BBH", 0x21, 0x11, V2_MAX + 1), "oversized"),
    (struct.pack("!BBH", 0x21, 0x11, 65535), "oversized"),
])
def test_v2_bad_fixed_part(fixed: bytes, reason: str) -> None:
    # Decided from the fixed part and the block, never waiting for 64 KiB.
    length = struct.unpack("!H", fixed[2:])[0]
    block = b"\0" * length if length <= V2_MAX else b""
    with pytest.raises(ProxyHeaderError) as e:
        parse(V2_SIGNATURE + fixed + block)
    assert e.value.reason == reason


def test_v2_oversized_is_refused_before_its_body() -> None:
    with pytest.raises(ProxyHeaderError) as e:
        parse(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 65535))
    assert e.value.reason == "oversized"
    assert HeaderParser(maxV2=65535).feed(
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 65535)) is None


def test_required_mode_refuses_plain_data_at_the_first_byte() -> None:
    with pytest.raises(ProxyHeaderError) as e:
        parse(b"G")
    assert e.value.reason == "missing"


def test_optional_mode_plain_data_is_returned_whole() -> None:
    assert parse(b"hello", optional=True) == Result(None, b"hello")
    parser = HeaderParser(optional=True)
    # A prefix of a signature that then diverges: all of it is data.
    assert parser.feed(b"PROX") is None
    assert parser.feed(b"") is None
    assert parser.feed(b"IMA") == Result(None, b"PROXIMA")
    parser = HeaderParser(optional=True)
    assert parser.feed(b"\r\n\r\n") is None
    assert parser.feed(b"\r\n") == Result(None, b"\r\n\r\n\r\n")


def test_end_of_stream_before_a_decision() -> None:
    parser = HeaderParser(optional=True)
    assert parser.feed(b"PRO") is None
    assert parser.end() == Result(None, b"PRO")
    parser = HeaderParser(optional=True)
    parser.feed(b"PROXY TCP4 1.2.3.4")
    with pytest.raises(ProxyHeaderError) as e:
        parser.end()
    assert e.value.reason == "incomplete"
    parser = HeaderParser()
    parser.feed(b"PRO")
    with pytest.raises(ProxyHeaderError):
        parser.end()


# Properties.

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
tlv = st.builds(lambda t, v: bytes([t]) + struct.pack("!H", len(v)) + v,
                st.integers(0, 255), st.binary(max_size=40))


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    sport, dport = draw(ports), draw(ports)
    if kind == "v1-4":
        return v1(draw(ipv4), draw(ipv4), sport, dport)
    if kind == "v1-6":
        return v1(draw(ipv6), draw(ipv6), sport, dport, "TCP6")
    if kind == "v1-unknown":
        return b"PROXY UNKNOWN\r\n"
    tlvs = b"".join(draw(st.lists(tlv, max_size=4)))
    if kind == "v2-4":
        return v2(draw(ipv4), draw(ipv4), sport, dport, tlvs=tlvs)
    if kind == "v2-6":
        return v2(draw(ipv6), draw(ipv6), sport, dport, tlvs=tlvs)
    return v2(draw(ipv4), draw(ipv4), sport, dport, local=True, tlvs=tlvs)


@given(headers(), st.binary(max_size=200), st.lists(st.integers(0, 1 << 16), max_size=12),
       st.booleans())
def test_any_split_gives_the_same_header_and_rest(header: bytes, data: bytes,
                                                  cuts: list[int], optional: bool) -> None:
    whole = parse(header + data, optional)
    assert whole is not None and whole.header is not None
    assert whole.rest == data
    assert feedAll(splits(header + data, cuts), optional) == whole


@given(headers(), st.binary(max_size=20))
def test_one_byte_at_a_time(header: bytes, data: bytes) -> None:
    stream = header + data
    parser = HeaderParser()
    for i in range(len(header) - 1):
        assert parser.feed(stream[i:i + 1]) is None
    result = parser.feed(stream[len(header) - 1:])
    assert result == parse(stream)


@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(0, 400), max_size=8))
def test_optional_mode_never_loses_plain_bytes(data: bytes, cuts: list[int]) -> None:
    if data.startswith((b"PROXY ", V2_SIGNATURE)):
        return
    result = feedAll(splits(data, cuts), optional=True)
    if result is None:
        # Still a prefix of a signature: EOF gives it all back.
        parser = HeaderParser(optional=True)
        assert parser.feed(data) is None
        assert parser.end() == Result(None, data)
    else:
        assert result == Result(None, data)


def mutations() -> st.SearchStrategy[bytes]:
    def mutate(header: bytes, at: int, byte: int, cut: int) -> bytes:
        at %= len(header)
        b = bytearray(header)
        b[at] = byte
        return bytes(b[: max(1, cut % (len(b) + 1))])

    return st.builds(mutate, headers(), st.integers(0, 1000), st.integers(0, 255),
                     st.integers(0, 1000))


@given(st.one_of(st.binary(max_size=400), mutations(),
                 st.binary(max_size=300).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b)),
       st.lists(st.integers(0, 500), max_size=8), st.booleans())
def test_garbage_raises_only_proxy_header_error(data: bytes, cuts: list[int],
                                                optional: bool) -> None:
    parser = HeaderParser(optional=optional)
    try:
        for chunk in splits(data, cuts):
            result = parser.feed(chunk)
            if result is not None:
                assert len(parser.buffer) == 0
                break
        else:
            parser.end()
    except ProxyHeaderError as e:
        assert e.reason in ("malformed", "oversized", "missing", "incomplete")
    assert len(parser.buffer) <= max(V1_MAX, 16 + V2_MAX)

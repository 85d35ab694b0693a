"""
Unit tests of L{echoplug.protocol} against L{StringTransport}: fast and
deterministic, for the logic. Behaviour over real sockets is in test_echo.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from echoplug.factory import EchoFactory
from echoplug.protocol import Echo, TracingEcho


def connected(factory: EchoFactory | None = None) -> tuple[Echo, StringTransport]:
    factory = factory or EchoFactory()
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    assert proto is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5678))
    proto.makeConnection(transport)
    return proto, transport


def test_echoes_and_counts() -> None:
    proto, transport = connected()
    proto.dataReceived(b"hello ")
    proto.dataReceived(b"world")
    assert transport.value() == b"hello world"
    assert proto.bytesIn == 11


@given(st.lists(st.binary(max_size=512), max_size=20))
def test_any_bytes_any_chunking(chunks: list[bytes]) -> None:
    proto, transport = connected()
    for chunk in chunks:
        proto.dataReceived(chunk)
    assert transport.value() == b"".join(chunks)


def test_protocol_is_the_transports_streaming_producer() -> None:
    """
    Backpressure: the transport pauses the protocol when its buffer fills,
    and the protocol stops the transport reading; resumed, it reads again.
    """
    proto, transport = connected()
    assert transport.producer is proto
    assert transport.streaming is True
    proto.pauseProducing()
    assert transport.producerState == "paused"
    proto.resumeProducing()
    assert transport.producerState == "producing"
    proto.stopProducing()  # the connection is going: nothing to do
    assert not transport.disconnecting


def test_half_close_unregisters_then_closes() -> None:
    proto, transport = connected()
    assert IHalfCloseableProtocol.providedBy(proto)
    proto.dataReceived(b"tail")
    proto.readConnectionLost()
    assert transport.producer is None
    assert transport.disconnecting
    assert transport.value() == b"tail"


def test_factory_tracks_connections() -> None:
    factory = EchoFactory()
    proto, _ = connected(factory)
    assert factory.connections == {proto}
    assert factory.accepted == 1
    proto.dataReceived(b"12345")
    proto.connectionLost(Failure(ConnectionDone()))
    assert factory.connections == set()
    assert factory.bytesReceived == 5


def test_close_records_reason_and_aborts() -> None:
    proto, transport = connected()
    proto.close("idle timeout")
    proto.close("later reason is ignored")
    assert proto.closeReason == "idle timeout"
    assert transport.disconnecting


def test_trace_protocol_chosen_by_flag() -> None:
    assert EchoFactory(trace=True).protocol is TracingEcho
    assert EchoFactory().protocol is Echo
    proto, transport = connected(EchoFactory(trace=True))
    proto.dataReceived(b"x")
    assert transport.value() == b"x"

# -*- test-case-name: tests.test_servers -*-
"""
The stock Twisted peer: C{twisted.protocols.wire.Echo} as a C{.tac} file.

C{echoplug-bench --peer wire-echo} runs it as
C{twistd -r REACTOR -n --pidfile= -y wireecho.py}, under the same reactor as
echoplug, so the two differ only in the protocol and factory. The port comes
from C{ECHOPLUG_LAB_PORT} (a C{.tac} file takes no arguments).
"""

import os

from twisted.application import service, strports
from twisted.internet.protocol import Factory
from twisted.protocols.wire import Echo

factory = Factory.forProtocol(Echo)
factory.noisy = False

application = service.Application("wire-echo")
port = int(os.environ.get("ECHOPLUG_LAB_PORT", "10000"))
strports.service(f"tcp:{port}:interface=127.0.0.1", factory).setServiceParent(application)

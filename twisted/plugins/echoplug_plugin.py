"""
The twistd dropin for echoplug.

It imports nothing but L{ServiceMaker}: twistd scans every dropin before it
installs the reactor chosen with C{-r}, so importing echoplug's real code here
would load the reactor too early and slow down every C{twistd --help}.
"""

from twisted.application.service import ServiceMaker

echoplug = ServiceMaker(
    "echoplug",
    "echoplug.tap",
    "An echo service (RFC 862): TCP with flow control, half-close and limits; guarded UDP.",
    "echoplug",
)

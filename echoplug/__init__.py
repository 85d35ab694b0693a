"""
echoplug: a TCP echo service (RFC 862) shipped as a twistd plugin.

The modules each do one job:

  - L{echoplug.protocol}: the per-connection echo, with flow control and half-close;
  - L{echoplug.factory}: builds protocols and keeps the books on open connections;
  - L{echoplug.service}: listeners and the service's lifecycle (start-up line, shutdown);
  - L{echoplug.logs}: the access-log line and the log observers behind C{--log-format};
  - L{echoplug.tap}: the C{twistd echoplug} command line (C{Options}, C{makeService});
  - L{echoplug.client}: C{echoplug-client}, the original two-socket chunked client.
"""

__version__ = "0.1.0"

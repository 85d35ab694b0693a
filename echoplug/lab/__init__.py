"""
The reactor lab: everything that measures or stresses a server, laid out
like MagicStack's vmbench, with the servers, the load clients and the runner
as separate pieces.

  - L{echoplug.lab.servers}: start the servers under test as subprocesses:
    echoplug under C{twistd -r R} (one or more variants of its arguments),
    and the peers: stock C{wire.Echo} under the same reactor
    (L{echoplug.lab.wireecho}), stdlib asyncio and uvloop
    (L{echoplug.lab.asyncioecho}), a plain epoll echo in C (C{cecho.c}); for
    the C{udp} workload, the same kinds on UDP (the asyncio peer's
    C{DatagramProtocol} echo, C{cudpecho.c}: epoll, C{recvfrom}, C{sendto});
  - the load clients: C{cload.c} (the default) or L{echoplug.lab.load}
    (Twisted), closed loop, one process per share of the connections; the C
    one keeps a Python server busy where the Twisted one cannot;
  - L{echoplug.lab.cbuild}: builds C{cload.c}, C{cecho.c} and C{cudpecho.c}
    on first use;
  - L{echoplug.lab.runner}: the sweep: idle connections, warm-up, the
    measured window, interleaved repeats and their medians;
  - L{echoplug.lab.report}: C{results.csv}, C{results.md} and the plots
    (C{summary.png} among them), also redrawn from a C{results.csv};
  - L{echoplug.lab.bench}: the C{echoplug-bench} command line;
  - L{echoplug.lab.soak}: C{echoplug-soak}, every reactor under many clients
    for a set time: mismatches and RSS over time;
  - L{echoplug.lab.procs}: the process helpers shared by all of these and
    by the tests: a free port, the C{twistd} command and a child's
    environment, waiting for a port or a log line, CPU time and RSS.

The lab reads the service's own limits (L{echoplug.service.FD_SETSIZE},
L{echoplug.service.FD_HEADROOM}, L{echoplug.service.raiseNoFile}); the
service never imports the lab.
"""

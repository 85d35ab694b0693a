"""
The reactor lab behind C{echoplug-bench}, laid out like MagicStack's vmbench:
the servers, the load client and the runner are separate pieces.

  - L{echoplug.lab.servers}: start the servers under test as subprocesses
    (echoplug under C{twistd -r R}, and the peers: stock C{wire.Echo} under
    the same reactor, stdlib asyncio, uvloop, a plain epoll echo in C) and
    read their CPU time from C{/proc};
  - C{cload.c} (the default) or L{echoplug.lab.load}: the closed-loop load
    client, one process per share of the connections; the C one keeps a
    Python server busy where the Twisted one cannot;
  - L{echoplug.lab.cbuild}: builds C{cload.c} and C{cecho.c} on first use;
  - L{echoplug.lab.runner}: the sweep: idle connections, warm-up, the
    measured window, interleaved repeats and their medians;
  - L{echoplug.lab.report}: C{results.csv}, C{results.md} and the plots;
  - L{echoplug.lab.bench}: the C{echoplug-bench} command line.
"""

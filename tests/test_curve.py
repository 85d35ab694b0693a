"""
The dead-connection curve from synthetic runs with a known price per idle
descriptor: the fitted slopes, per wake-up and per message, the table and
the plot; select's capped points leave it fewer idle counts.
"""

from __future__ import annotations

import math

import pytest

from echoplug.lab import curve, report
from echoplug.lab.runner import CAPPED, Row


def runs(idle: int, nsPerIdle: float, wakeupsPerMsg: float) -> list[dict[str, float]]:
    out = []
    for jitter in (-0.3, 0.0, 0.3):
        perWakeup = 20 + nsPerIdle * idle / 1000 + jitter
        out.append({"cpu_us_per_wakeup": perWakeup,
                    "cpu_us_per_msg": perWakeup * wakeupsPerMsg})
    return out


def sweep() -> list[Row]:
    rows = []
    for reactor, price, idles in [("poll", 200.0, (0, 2000, 5000, 10000, 15000)),
                                  ("epoll", 0.0, (0, 2000, 5000, 10000, 15000)),
                                  ("select", 250.0, (0, 900))]:
        for idle in idles:
            rows.append(Row("echoplug", reactor, "load", 1, idle, 64, runs=3,
                            wakeups_per_msg=2.0, samples=runs(idle, price, 2.0)))
    rows.append(Row("echoplug", "select", "load", 1, 2000, 64, status=CAPPED))
    rows.append(Row("asyncio", "stdlib", "load", 1, 0, 64, runs=3))  # one idle count: no line
    return rows


def test_the_slopes_are_the_price_per_idle_descriptor() -> None:
    fits = {f.reactor: f for f in curve.fits(sweep())}
    assert sorted(fits) == ["epoll", "poll", "select"]
    poll, epoll, select = fits["poll"], fits["epoll"], fits["select"]
    assert poll.perWakeup.slope == pytest.approx(200, rel=1e-6)
    assert poll.perMessage.slope == pytest.approx(400, rel=1e-6)  # two wake-ups a message
    assert poll.perWakeup.lo < 200 < poll.perWakeup.hi
    assert abs(epoll.perWakeup.slope) < 1 and epoll.perWakeup.lo < 0 < epoll.perWakeup.hi
    assert select.idle == (0, 900)  # stopped at its wall
    assert poll.wakeupsPerMsg == 2.0 and poll.perMessage.n == 15


def test_the_table() -> None:
    text = "\n".join(curve.markdown(sweep()))
    assert "## Dead connections" in text
    assert "| echoplug | poll | load | 1 | 64 | 0 to 15000 (5) | 200.00 [" in text
    assert curve.markdown(sweep()[-1:]) == []
    assert "## Dead connections" in report.markdown(sweep())


def test_medians_alone_still_fit() -> None:
    rows = [Row("echoplug", "poll", "load", 1, i, 64, cpu_us_per_msg=10 + i / 100, runs=1)
            for i in (0, 100, 200)]
    [fit] = curve.fits(rows)
    assert fit.perMessage.slope == pytest.approx(10.0, rel=1e-6)  # 0.01 µs per idle
    assert math.isnan(fit.perWakeup.slope)


@pytest.mark.slow
def test_the_plot(tmp_path) -> None:
    made = report.plot(sweep(), tmp_path)
    assert tmp_path / "dead_connections.png" in made
    assert (tmp_path / "dead_connections.png").read_bytes()[:4] == b"\x89PNG"

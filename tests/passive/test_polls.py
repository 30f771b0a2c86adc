"""The SCADA's poll log: ranges, intervals, and the interval a draft may never go below."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.passive.observations import Peer, Request, Warnings
from broker.passive.polls import Polled, PollLog, envelopes

PLC = Peer("10.0.0.7", 502)
OTHER = Peer("10.0.0.8", 502)


def request(t: float, start: int, count: int = 10, *, client: str = "10.0.0.5", server: Peer = PLC,
            unit: int = 1, write: bool = False, function: str = "FC3") -> Request:  # fmt: skip
    return Request(
        "modbus", t, client, server, unit, "holding_register", start, count, function, write
    )


def poll(log: PollLog, interval: float, start: int, n: int, **how: object) -> None:
    for k in range(n):
        log.add(request(100.0 + k * interval, start, **how))  # type: ignore[arg-type]


def test_each_range_has_its_count_and_median_interval() -> None:
    log = PollLog()
    poll(log, 1.0, 0, 20)
    log.add(request(100.5, 0))  # a retried request off the beat does not move the median much
    poll(log, 0.5, 100, 10, count=2, function="FC4")
    first, second = log.polled()
    assert (first.start, first.count, first.requests, first.interval_s) == (0, 10, 21, 1.0)
    assert (second.start, second.function, second.requests, second.interval_s) == (
        100,
        "FC4",
        10,
        0.5,
    )
    assert first.client == "10.0.0.5" and first.server == PLC and not first.write


def test_the_device_interval_is_the_longest_range_interval_so_no_range_is_asked_faster() -> None:
    log = PollLog()
    poll(log, 1.0, 0, 10)
    poll(log, 5.0, 50, 5)
    assert log.interval_s(PLC, 1) == 5.0


def test_a_range_polled_by_two_clients_counts_at_its_fastest() -> None:
    log = PollLog()
    poll(log, 2.0, 0, 5, client="10.0.0.5")
    poll(log, 0.5, 0, 5, client="10.0.0.6")  # the HMI polls faster than the historian
    poll(log, 1.0, 20, 5)
    assert log.interval_s(PLC, 1) == 1.0
    assert [p.client for p in log.polled()] == ["10.0.0.5", "10.0.0.6", "10.0.0.5"]


def test_writes_and_single_requests_give_no_interval() -> None:
    log = PollLog()
    log.add(request(100.0, 0))
    poll(log, 0.1, 40, 10, write=True, function="FC6", count=1)
    assert log.interval_s(PLC, 1) is None
    assert log.interval_s(OTHER, 1) is None and log.interval_s(PLC, 2) is None
    once, written = log.polled()
    assert once.interval_s is None and once.requests == 1
    assert written.write and written.interval_s is not None


def test_devices_and_units_are_kept_apart_and_sorted() -> None:
    log = PollLog()
    poll(log, 3.0, 0, 3, server=OTHER)
    poll(log, 1.0, 5, 3, unit=2)
    poll(log, 2.0, 5, 3)
    assert [(p.server, p.unit) for p in log.polled()] == [(PLC, 1), (PLC, 2), (OTHER, 1)]
    assert (log.interval_s(PLC, 1), log.interval_s(PLC, 2), log.interval_s(OTHER, 1)) == (
        2.0,
        1.0,
        3.0,
    )


def test_a_range_read_rarely_is_set_apart_and_does_not_set_the_device_interval() -> None:
    log = PollLog()
    poll(log, 1.0, 0, 300, count=4)  # the SCADA, every second
    for t in (110.0, 350.0):  # an HMI's diagnostics screen, opened twice
        log.add(request(t, 100, count=2, client="10.0.0.6"))
    log.add(request(120.0, 200, count=2))  # read once: no interval at all
    (envelope,) = envelopes(log.polled()).values()
    assert [p.start for p in envelope.regular] == [0]
    assert [(p.start, p.interval_s) for p in envelope.rare] == [(100, 240.0)]
    assert [p.start for p in envelope.once] == [200] and envelope.most_requests == 300
    assert log.interval_s(PLC, 1) == 1.0  # not 240 s: the rare range does not count


def test_every_device_interval_comes_from_one_pass_over_the_log() -> None:
    log = PollLog()
    servers = [Peer(f"10.0.{n // 250}.{n % 250}", 502) for n in range(300)]
    for n, server in enumerate(servers):
        poll(log, 1.0 + n % 3, 0, 3, server=server)
    calls = []
    polled = log.polled

    def counted() -> list[Polled]:
        calls.append(1)
        return polled()

    log.polled = counted  # type: ignore[method-assign]
    assert [log.interval_s(s, 1) for s in servers] == [1.0 + n % 3 for n in range(300)]
    assert len(calls) == 1  # not once per device: quadratic in devices × ranges
    log.add(request(200.0, 0, server=servers[0]))  # a new request: computed again
    assert log.interval_s(servers[0], 1) is not None and len(calls) == 2


def test_a_clock_stepping_back_gives_no_negative_interval() -> None:
    log = PollLog()
    for t in (100.0, 101.0, 99.5, 102.0, 103.0):
        log.add(request(t, 0))
    (p,) = log.polled()
    assert p.interval_s is not None and p.interval_s > 0


def test_ranges_beyond_the_bound_are_a_warning() -> None:
    warnings = Warnings()
    log = PollLog(warnings, max_ranges=3)
    for start in range(5):
        log.add(request(100.0, start))
    log.add(request(101.0, 0))  # a known range still counts
    assert len(log.polled()) == 3 and log.polled()[0].requests == 2
    assert [n for _, n, _ in warnings.items()] == [2]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["a", "b"]), st.sampled_from([0.1, 0.5, 1.0, 2.5, 10.0])),
                min_size=1, max_size=8))  # fmt: skip
def test_the_draft_interval_is_never_below_any_range_scada_interval(
    polls: list[tuple[int, str, float]],
) -> None:
    log = PollLog()
    for start, client, interval in polls:
        poll(log, interval, 10 * start, 4, client=client)
    fastest: dict[int, float] = {}
    for p in log.polled():
        assert isinstance(p, Polled) and p.interval_s is not None
        fastest[p.start] = min(fastest.get(p.start, p.interval_s), p.interval_s)
    floor = log.interval_s(PLC, 1)
    assert floor is not None
    assert all(floor >= interval for interval in fastest.values())
    assert floor in fastest.values()

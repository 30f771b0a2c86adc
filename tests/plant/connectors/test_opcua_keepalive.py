"""The keep-alive period of a subscription, and the interval asked for again, computed from
CreateSubscription responses as servers revise them (a real server revising the count:
test_opcua_commissioning.py)."""

from __future__ import annotations

import math

import msgspec
import pytest
import structlog
from asyncua import ua

from broker.audit.catalogue import DEVICE_AGGREGATED, EVENTS
from broker.plant.connectors.opcua_keepalive import KeepAlive, keep_alive_s, publishing_interval
from broker.policy import OpcUaDevice


def _revised(interval_ms: float, count: int) -> ua.CreateSubscriptionResult:
    return ua.CreateSubscriptionResult(
        RevisedPublishingInterval=interval_ms, RevisedMaxKeepAliveCount=count
    )


@pytest.mark.parametrize(
    ("poll_s", "interval_ms", "count", "again_ms"),
    [
        (1.0, 1000.0, 1, None),  # as asked: a message every poll interval
        (1.0, 1000.0, 2, 500.0),  # node-opcua's minimum count of 2
        (0.5, 500.0, 4, 125.0),
        (1.0, 2000.0, 1, None),  # the server's own, longer interval: asking again cannot help
        (0.1, 100.0, 5000, None),  # a hostile count: 0.02 ms would flood; the silence limit holds
        (1.0, 1000.0, 4, 250.0),  # at most MAX_SPEEDUP messages per poll interval
        (1.0, 1000.0, 5, None),  # more: the revised period is kept (and logged)
        (60.0, 60000.0, 1200, None),  # 50 ms would be 1,200 messages per poll interval
        (0.1, 100.0, 4, None),  # 25 ms: below MIN_PUBLISHING_MS
    ],
)
def test_the_interval_asked_for_again_follows_the_revised_response(
    poll_s: float, interval_ms: float, count: int, again_ms: float | None
) -> None:
    revised = _revised(interval_ms, count)
    assert keep_alive_s(revised) == pytest.approx(interval_ms * count / 1000)
    assert publishing_interval(poll_s, revised) == again_ms
    if again_ms is not None:  # what the server then keeps: one message every poll interval
        assert keep_alive_s(_revised(again_ms, count)) == pytest.approx(poll_s)


@pytest.mark.parametrize("interval_ms", [math.nan, math.inf, -math.inf, 0.0, -1000.0])
@pytest.mark.parametrize("count", [0, 1, 2, 2**32 - 1])
def test_an_unusable_revised_interval_is_never_asked_again_and_never_confirms(
    interval_ms: float, count: int
) -> None:
    """No number of seconds: the subscription is not changed, and its period is infinite, so
    the connector warns (`subscription_revised`) and drops a silent session at its cap."""
    revised = _revised(interval_ms, count)
    assert keep_alive_s(revised) == math.inf
    assert publishing_interval(1.0, revised) is None


@pytest.mark.parametrize(
    ("interval_ms", "count", "shown_ms", "shown_s", "limit_s"),
    [
        (math.nan, 2, "nan", None, 60.0),  # no duration: waited for up to the cap
        (0.0, 1, 0.0, None, 60.0),
        (1000.0, 5, 1000.0, 5.0, 15.0),  # three of the server's own periods, not 3 × 1 s + 2 s
        (60_000.0, 10, 60_000.0, 600.0, 60.0),  # a period of 10 min: at most 1 min of silence
    ],
)
def test_a_period_that_cannot_be_brought_back_is_audited_once_with_advice_and_waited_for(
    interval_ms: float, count: int, shown_ms: object, shown_s: object, limit_s: float
) -> None:
    """What the connector does with what it kept: a warning naming the server's revision
    (a NaN as words, not an invalid JSON number) and what to change, once per connector, and
    a silence limit of three of the server's periods, within MAX_SILENCE_S. Dropping the
    session after 3 poll intervals instead would reconnect to a healthy server that simply
    keeps alive every 5 s over and over."""
    ua_plc = msgspec.convert(
        {"name": "ua-plc", "endpoint": "opc.tcp://127.0.0.1:4840", "poll_interval_s": 1.0,
         "timeout_s": 2.0},
        OpcUaDevice,
    )  # fmt: skip
    keep_alive = KeepAlive(ua_plc, structlog.get_logger("opcua"))
    with structlog.testing.capture_logs() as logs:
        limits = [keep_alive.silence_limit(_revised(interval_ms, count)) for _ in range(2)]
    assert limits == [limit_s, limit_s]
    assert [(e["event"], e["publishing_interval_ms"], e["keep_alive_s"]) for e in logs] == [
        ("subscription_revised", shown_ms, shown_s)
    ]
    advice = logs[0]["advice"]
    if shown_s is None:
        assert "unusable" in advice
    else:
        assert f"set the device's poll_interval_s to {shown_s:g} s in the policy" in advice
    assert "subscription_revised" in EVENTS  # audited, as a device event that is aggregated
    assert "subscription_revised" in DEVICE_AGGREGATED


def test_a_period_within_the_stale_limit_needs_no_change() -> None:
    ua_plc = msgspec.convert(
        {"name": "ua-plc", "endpoint": "opc.tcp://127.0.0.1:4840", "poll_interval_s": 1.0},
        OpcUaDevice,
    )
    keep_alive = KeepAlive(ua_plc, structlog.get_logger("opcua"))
    with structlog.testing.capture_logs() as logs:
        assert keep_alive.silence_limit(_revised(1000.0, 2)) == 6.0
    assert "nothing to do" in logs[0]["advice"]

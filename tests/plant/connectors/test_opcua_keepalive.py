"""The keep-alive period of a subscription, and the interval asked for again, computed from
CreateSubscription responses as servers revise them (a real server revising the count:
test_opcua_commissioning.py)."""

from __future__ import annotations

import pytest
from asyncua import ua

from broker.plant.connectors.opcua_keepalive import keep_alive_s, publishing_interval


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

"""The per-connection rate limiter (ratelimit.py), Sans-I/O: a clock the test moves."""

from __future__ import annotations

from kasagi_relay.ratelimit import QUIET_S, RateLimiter, TokenBucket, Verdict

ALLOW, REFUSE, CLOSE = Verdict.ALLOW, Verdict.REFUSE, Verdict.CLOSE


def limiter(**overrides: float) -> RateLimiter:
    settings: dict[str, float] = {
        "rate": 10.0,
        "burst": 5,
        "rate_bytes": 1000,
        "rate_bytes_burst": 2000,
        "close_after_s": 5.0,
    }
    settings.update(overrides)
    return RateLimiter(
        rate=settings["rate"],
        burst=int(settings["burst"]),
        rate_bytes=int(settings["rate_bytes"]),
        rate_bytes_burst=int(settings["rate_bytes_burst"]),
        close_after_s=settings["close_after_s"],
        now=0.0,
    )


def test_messages_burst_then_sustained_rate() -> None:
    lim = limiter()
    assert [lim.admit(1, 0.0) for _ in range(6)] == [ALLOW] * 5 + [REFUSE]
    assert lim.admit(1, 0.1) is ALLOW  # one token back after 1/rate
    assert lim.admit(1, 0.1) is REFUSE


def test_one_large_message_passes_then_its_debt_is_paid_back() -> None:
    lim = limiter()
    assert lim.admit(5000, 0.0) is ALLOW  # larger than the burst: admitted, bucket at -3000
    assert lim.admit(1, 0.0) is REFUSE
    assert lim.admit(1, 2.9) is REFUSE  # -3001 + 2900: still in debt
    assert lim.admit(1, 3.1) is ALLOW


def test_refused_messages_are_charged_too() -> None:
    lim = limiter()
    assert lim.admit(2001, 0.0) is ALLOW  # the bucket at -1
    assert lim.admit(1000, 0.0) is REFUSE
    assert lim.admit(1, 0.5) is REFUSE  # without the refused 1000 it would be at +499
    assert lim.admit(1, 1.1) is ALLOW


def test_a_flood_is_closed_after_close_after_s_even_as_tokens_trickle_in() -> None:
    lim = limiter(close_after_s=2.0)
    verdicts = []
    t = 0.0
    while t < 3.0:
        verdicts.append(lim.admit(1, t))
        t += 0.01  # 100 messages/s against 10/s
    assert ALLOW in verdicts[10:]  # the refill lets some through...
    assert verdicts[-1] is CLOSE  # ...and the flood is closed anyway
    first_close = verdicts.index(CLOSE)
    assert 1.9 <= first_close * 0.01 <= 2.1


def test_a_pause_ends_the_run_of_refusals() -> None:
    lim = limiter(close_after_s=2.0)
    for _ in range(6):
        lim.admit(1, 0.0)
    assert lim.refused_since == 0.0
    assert lim.admit(1, 1.5) is ALLOW
    assert lim.admit(1, 1.5 + QUIET_S + 0.5) is ALLOW
    for _ in range(20):
        verdict = lim.admit(1, 3.5)
    assert verdict is REFUSE and lim.refused_since == 3.5  # a new run, not closed


def test_zero_means_no_limit() -> None:
    lim = limiter(rate=0, rate_bytes=0)
    assert all(lim.admit(10**9, 0.0) is ALLOW for _ in range(10_000))
    never = limiter(close_after_s=0)
    assert {never.admit(1, t / 100) for t in range(2000)} <= {ALLOW, REFUSE}


def test_token_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(10.0, 3, 0.0)
    assert bucket.take(3, 1000.0)
    assert not bucket.take(1, 1000.0)

"""The run lease on S3 against a real S3 server on 127.0.0.1 (moto): the conditional PUT, not the
existence check, is what keeps a second writer out."""
import os

import pytest

from jobs.errors import UsageError
from jobs.store import LEASE, LEASE_STALE_S, Lease, Store
from tests.s3server import s3_server


@pytest.fixture
def s3(monkeypatch):
    with s3_server() as srv:
        for k, v in srv.env.items():
            monkeypatch.setenv(k, v)
        yield srv


def lease_token(s3, key: str) -> str | None:
    import json

    try:
        return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())["token"]
    except s3.client().exceptions.NoSuchKey:
        return None


def test_second_writer_is_refused_even_when_the_existence_check_misses_the_first(s3, monkeypatch):
    store = Store(s3.url("runs/r"))
    first = Lease(store)
    first.acquire()
    try:
        # The first lease was written after the second's existence check: that check saw nothing.
        monkeypatch.setattr(Store, "exists", lambda self, rel: False)
        with pytest.raises(UsageError, match=f"in use by another probe run .*pid {os.getpid()}"):
            Lease(store).acquire()
        assert lease_token(s3, "runs/r/" + LEASE) == first.token
        # The same race fools a check-write-read-back (what other object stores get): the test can tell.
        unsafe = Lease(store)
        unsafe._s3 = None
        assert unsafe._create() and lease_token(s3, "runs/r/" + LEASE) == unsafe.token
    finally:
        first.release()


def test_release_frees_the_folder_and_the_lease_lands_at_the_uri_endpoint(s3, monkeypatch):
    # Endpoint only in the URI's query, as pyarrow takes it: the lease must go to the same server.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    store = Store(s3.uri("runs/q"))
    with Lease(store) as held:
        assert lease_token(s3, "runs/q/" + LEASE) == held.token
    assert lease_token(s3, "runs/q/" + LEASE) is None
    with Lease(store) as again:
        assert lease_token(s3, "runs/q/" + LEASE) == again.token


def test_stale_lease_is_taken_over_by_exactly_one_of_two_runs(s3, monkeypatch):
    store = Store(s3.url("runs/s"))
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    dead = Lease(store, clock=clock)
    dead.acquire()
    dead._stop.set()  # its holder died: no more refreshes
    now[0] += LEASE_STALE_S + 1
    a, b = Lease(store, clock=clock), Lease(store, clock=clock)
    real_check = Lease.check_free
    calls = []

    def check_then_a_takes_over(self, held=None):
        # b has read the stale lease and judged it; a takes it over before b acts on that judgement.
        if self is b and not calls:
            calls.append(1)
            a.acquire()
        return real_check(self, held)

    monkeypatch.setattr(Lease, "check_free", check_then_a_takes_over)
    try:
        with pytest.raises(UsageError, match="in use by another probe run"):
            b.acquire()
        assert calls and lease_token(s3, "runs/s/" + LEASE) == a.token
        # a's holder stops refreshing; c takes over; a's next refresh must not overwrite c's lease.
        now[0] += LEASE_STALE_S + 1
        c = Lease(store, clock=clock)
        c.acquire()
        assert not a._refresh() and lease_token(s3, "runs/s/" + LEASE) == c.token
        c.release()
    finally:
        a._stop.set()

"""The agent's learned-name table: TTLs with a minimum, the per-name cap, expiry kept alive by
live connections, per-endpoint forgetting, and the state that survives a restart."""

from l7proxy.agent.fqdn_cache import FqdnCache


def test_ttl_and_minimum_ttl():
    c = FqdnCache(min_ttl=10)
    assert c.learn("ep", ["a.example."], [("192.0.2.1", 2)], now=100.0)
    assert not c.learn("ep", ["a.example."], [("192.0.2.1", 2)], now=101.0)  # known: no recompile
    assert not c.gc(now=109.0)
    assert c.learned() == {"a.example.": {"192.0.2.1"}}
    assert c.gc(now=112.0) and c.learned() == {}


def test_expired_ip_with_a_live_connection_stays():
    c = FqdnCache()
    c.learn("ep", ["a.example."], [("192.0.2.1", 1), ("192.0.2.2", 1)], now=0.0)
    assert c.gc(now=5.0, alive=lambda: {"192.0.2.1"})
    assert c.learned() == {"a.example.": {"192.0.2.1"}}
    assert c.gc(now=6.0) and c.learned() == {}


def test_cap_per_name_per_endpoint_drops_the_soonest_to_expire():
    c = FqdnCache(max_ips=3)
    for i in range(10):
        c.learn("ep", ["s3.example."], [(f"192.0.2.{i}", 100 + i)], now=0.0)
    # over the cap the soonest to expire are expired at once; the GC round forgets them,
    # except one a live connection still uses
    assert c.gc(now=0.0, alive=lambda: {"192.0.2.0"})
    assert c.learned()["s3.example."] == {"192.0.2.0", "192.0.2.7", "192.0.2.8", "192.0.2.9"}
    assert c.gc(now=0.0) and c.learned()["s3.example."] == {"192.0.2.7", "192.0.2.8", "192.0.2.9"}
    c.learn("other", ["s3.example."], [("198.51.100.1", 5)], now=0.0)
    assert len(c.learned()["s3.example."]) == 4  # the cap is per endpoint
    assert c.size() == 4


def test_rotating_ips_stay_bounded_by_the_cap_and_the_ttl():
    c = FqdnCache(max_ips=5)
    for i in range(1000):  # a new IP on every answer, TTL 1 s, 100 answers per second
        now = i / 100
        c.learn("ep", ["s3.example."], [(f"10.0.{i // 250}.{i % 250}", 1)], now=now)
        assert f"10.0.{i // 250}.{i % 250}" in c.learned()["s3.example."]  # the newest stays
        if i % 100 == 99:
            c.gc(now)
            assert c.size() <= 5
    c.gc(now=20.0)
    assert c.size() == 0


def test_deleting_an_endpoint_keeps_what_others_learned():
    c = FqdnCache()
    c.learn("a", ["x.example."], [("192.0.2.1", 60)], now=0.0)
    c.learn("b", ["x.example."], [("192.0.2.2", 60)], now=0.0)
    c.to_state()
    assert c.forget_endpoint("a") and c.dirty  # persisted at the next save
    assert c.learned() == {"x.example.": {"192.0.2.2"}}
    assert not c.forget_endpoint("a")


def test_cname_names_all_learn_the_ips_and_state_round_trips():
    c = FqdnCache()
    c.learn("ep", ["www.example.", "edge.example."], [("192.0.2.5", 60)], now=0.0)
    restored = FqdnCache(state=c.to_state())
    assert restored.learned() == {"www.example.": {"192.0.2.5"}, "edge.example.": {"192.0.2.5"}}
    assert restored.forget_endpoint("ep") and restored.learned() == {}


def test_names_of_index_follows_learn_gc_forget_and_restart():
    """names_of() is an index kept with the table; it must equal a scan of the table after
    every kind of change (learn, expiry with and without live connections, endpoint delete, a
    state round trip)."""

    def scan(c: FqdnCache, ip: str) -> set[str]:
        return {e["name"] for e in c.entries() if e["ip"] == ip}

    c = FqdnCache(max_ips=2)
    c.learn("a", ["x.example.", "cdn.example."], [("192.0.2.1", 10), ("192.0.2.2", 1)], now=0.0)
    c.learn("b", ["y.example."], [("192.0.2.1", 10)], now=0.0)
    c.learn("b", ["x.example."], [("192.0.2.3", 1), ("192.0.2.4", 50), ("192.0.2.5", 60)], now=0)
    ips = [f"192.0.2.{i}" for i in range(1, 7)]
    steps = [
        lambda: None,
        lambda: c.gc(now=5.0, alive=lambda: {"192.0.2.2"}),
        lambda: c.gc(now=6.0),
        lambda: c.forget_endpoint("a"),
        lambda: c.learn("a", ["x.example."], [("192.0.2.6", 5)], now=7.0),
    ]
    for step in steps:
        step()
        assert {ip: c.names_of(ip) for ip in ips} == {ip: scan(c, ip) for ip in ips}
    assert c.names_of("192.0.2.1") == {"y.example."}  # "a" went; "b" still has it for y
    restored = FqdnCache(state=c.to_state())
    assert {ip: restored.names_of(ip) for ip in ips} == {ip: scan(c, ip) for ip in ips}
    assert restored.names_of("192.0.2.6") == {"x.example."}

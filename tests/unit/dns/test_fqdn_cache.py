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
    assert c.gc(now=5.0, alive={"192.0.2.1"})
    assert c.learned() == {"a.example.": {"192.0.2.1"}}
    assert c.gc(now=6.0) and c.learned() == {}


def test_cap_per_name_per_endpoint_drops_the_soonest_to_expire():
    c = FqdnCache(max_ips=3)
    for i in range(10):
        c.learn("ep", ["s3.example."], [(f"192.0.2.{i}", 100 + i)], now=0.0)
    assert c.learned()["s3.example."] == {"192.0.2.7", "192.0.2.8", "192.0.2.9"}
    c.learn("other", ["s3.example."], [("198.51.100.1", 5)], now=0.0)
    assert len(c.learned()["s3.example."]) == 4  # the cap is per endpoint
    assert c.size() == 4


def test_cname_names_all_learn_the_ips_and_state_round_trips():
    c = FqdnCache()
    c.learn("ep", ["www.example.", "edge.example."], [("192.0.2.5", 60)], now=0.0)
    restored = FqdnCache(state=c.to_state())
    assert restored.learned() == {"www.example.": {"192.0.2.5"}, "edge.example.": {"192.0.2.5"}}
    assert restored.forget_endpoint("ep") and restored.learned() == {}

"""HTTP and Kafka rule sets: the proxy's hot path."""

from policies.kafka_keys import API_KEYS, ROLES, api_key_number
from policies.l7 import HttpRuleSet, KafkaRuleSet
from policies.model import HeaderMatch, HttpRule, KafkaRule


def http(*rules, allow_all=False):
    return HttpRuleSet(rules, allow_all=allow_all)


def test_method_path_host_are_full_re2_matches_and_path_includes_query():
    rs = http(HttpRule(method="GET", path="/public", host="api\\.example\\.com"))
    assert rs.check("GET", "/public", "api.example.com", []).allowed
    assert not rs.check("GET", "/public/x", "api.example.com", []).allowed  # full match
    assert not rs.check(
        "GET", "/public?x=1", "api.example.com", []
    ).allowed  # query is part of path
    assert not rs.check("GETX", "/public", "api.example.com", []).allowed
    assert not rs.check("GET", "/public", "api.example.com.evil", []).allowed
    q = http(HttpRule(path="/search\\?q=.*"))
    assert q.check("GET", "/search?q=x", "", []).allowed


def test_user_anchors_mean_their_own_field():
    rs = http(HttpRule(method="^PUT$", path="^/troop_logs/log/.*$"))
    assert rs.check("PUT", "/troop_logs/log/1", "h", []).allowed
    assert not rs.check("GET", "/troop_logs/log/1", "h", []).allowed
    es = http(HttpRule(method="^GET$", path="^/spaceship_diagnostics/_search/??.*$"))
    assert es.check("GET", "/spaceship_diagnostics/_search?q=1", "", []).allowed


def test_negated_class_cannot_swallow_field_separators():
    rs = http(HttpRule(method="[^X]*", host="h", path="/p"))
    assert not rs.check("GET", "/p\nh\n/p", "x", []).allowed
    assert rs.check("GET", "/p", "h", []).allowed


def test_inputs_with_newlines_and_rules_with_text_anchors_take_the_exact_slow_path():
    rs = http(HttpRule(path="\\A/a\\z"), HttpRule(method="GET", path="/b"))
    assert rs.check("POST", "/a", "", []).allowed
    assert rs.check("GET", "/b", "", []).matched == (1,)
    assert not rs.check("GET", "/b\n", "", []).allowed


def test_headers_presence_and_exact_value_case_insensitive_names():
    rs = http(
        HttpRule(
            method="GET", path="/private", headers=(HeaderMatch("X-Very-Secret-Token", "42"),)
        ),
        HttpRule(method="GET", path="/presence", headers=(HeaderMatch("X-Flag", None),)),
    )
    assert rs.check("GET", "/private", "", [("x-very-secret-token", "42")]).allowed
    assert not rs.check("GET", "/private", "", [("X-Very-Secret-Token", "41")]).allowed
    assert not rs.check("GET", "/private", "", []).allowed
    assert rs.check("GET", "/presence", "", [("x-flag", "")]).allowed
    assert not rs.check("GET", "/presence", "", [("x-other", "1")]).allowed


def test_header_matches_mismatch_actions():
    rs = http(
        HttpRule(
            path="/a",
            headers=(
                HeaderMatch("X-Add", "v", "ADD"),
                HeaderMatch("X-Del", "ok", "DELETE"),
                HeaderMatch("X-Rep", "r", "REPLACE"),
                HeaderMatch("X-Log", "l", "LOG"),
            ),
        )
    )
    v = rs.check("GET", "/a", "", [("X-Del", "bad"), ("X-Rep", "r"), ("x-log", "nope")])
    assert v.allowed
    assert set(v.header_actions) == {
        ("ADD", "X-Add", "v"),
        ("DELETE", "X-Del", "ok"),
        ("LOG", "X-Log", "l"),
    }
    required = http(HttpRule(path="/a", headers=(HeaderMatch("X-Need", "1"),)))
    assert not required.check("GET", "/a", "", []).allowed


def test_rules_are_ored_and_all_matching_rules_are_reported():
    rs = http(HttpRule(method="GET"), HttpRule(path="/x"), HttpRule(method="POST"))
    assert rs.check("GET", "/x", "", []).matched == (0, 1)
    assert rs.check("POST", "/y", "", []).matched == (2,)
    assert not rs.check("PUT", "/y", "", []).allowed


def test_empty_http_rule_and_allow_all():
    assert http(HttpRule()).allow_all
    assert http(allow_all=True).check("X", "/", "", []).allowed
    assert not http().check("GET", "/", "", []).allowed  # an empty list denies everything


def test_kafka_roles_and_api_key_names():
    assert ROLES["produce"] == (0, 3, 18)
    assert ROLES["consume"] == (1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18)
    assert (
        API_KEYS["offsets"] == 2
        and API_KEYS["apiversions"] == 18
        and API_KEYS["deletetopics"] == 20
    )
    assert (
        api_key_number("Produce") == 0
        and api_key_number("9") == 9
        and api_key_number("nope") is None
    )


def kafka(*rules):
    return KafkaRuleSet(rules)


def test_kafka_every_topic_must_be_allowed():
    rs = kafka(KafkaRule(ROLES["produce"], topic="a"), KafkaRule(ROLES["produce"], topic="b"))
    assert rs.check(0, 9, "c", ["a"]).allowed
    assert rs.check(0, 9, "c", ["a", "b"]).allowed
    v = rs.check(0, 9, "c", ["a", "secret"])
    assert not v.allowed and v.denied_topics == ("secret",)
    assert not rs.check(1, 11, "c", ["a"]).allowed  # fetch is not produce
    assert rs.check(18, 3, "c", []).allowed  # apiversions names no topic


def test_kafka_api_version_and_client_id_match_exactly():
    rs = kafka(KafkaRule((0,), api_version=9, client_id="hq", topic="t"))
    assert rs.check(0, 9, "hq", ["t"]).allowed
    assert not rs.check(0, 8, "hq", ["t"]).allowed
    assert not rs.check(0, 9, "hq2", ["t"]).allowed
    assert not rs.check(0, 9, None, ["t"]).allowed


def test_kafka_empty_list_denies_and_empty_rule_allows_everything():
    assert not kafka().check(0, 1, "c", ["t"]).allowed
    assert not kafka().check(18, 0, "c", []).allowed
    everything = kafka(KafkaRule())
    assert everything.allow_all and everything.check(20, 1, None, ["x"]).allowed


def test_kafka_metadata_for_all_topics_is_allowed_and_filtered():
    rs = kafka(KafkaRule(ROLES["consume"], topic="empire-announce"))
    assert rs.check(3, 9, "c", []).allowed  # all-topics metadata (extension: filtered)
    assert rs.topic_visible("empire-announce")
    assert not rs.topic_visible("deathstar-plans")
    assert kafka(KafkaRule((3,))).topic_visible("anything")
    assert not kafka(KafkaRule((0,), topic="t")).topic_visible("t")  # produce-only key 0


def cilium_matches(rules, api_key, version, client, topics):
    """Cilium's reading: every topic needs a rule that matches key, version and client."""

    def rule_ok(r):
        return (
            (not r.api_keys or api_key in r.api_keys)
            and (r.api_version is None or r.api_version == version)
            and (not r.client_id or r.client_id == client)
        )

    if not topics:
        return any(rule_ok(r) for r in rules)
    return all(any(rule_ok(r) and (not r.topic or r.topic == t) for r in rules) for t in topics)


def test_kafka_index_agrees_with_the_plain_reading():
    import random

    rng = random.Random(7)
    for _ in range(400):
        rules = [
            KafkaRule(
                rng.choice([(), ROLES["produce"], ROLES["consume"], (18,), (0,)]),
                rng.choice([None, None, 3, 9]),
                rng.choice(["", "", "hq"]),
                rng.choice(["", "a", "b", "c"]),
            )
            for _ in range(rng.randrange(0, 5))
        ]
        rules = [
            r for r in rules if r.api_keys or r.api_version is not None or r.client_id or r.topic
        ]
        rs = kafka(*rules)
        for _ in range(30):
            key, ver = rng.choice([0, 1, 3, 18, 19]), rng.choice([3, 9])
            client = rng.choice([None, "hq", "x"])
            topics = rng.sample(["a", "b", "c", "d"], rng.randrange(0, 3))
            v = rs.check(key, ver, client, topics)
            assert v.allowed == cilium_matches(rules, key, ver, client, topics), (
                rules,
                key,
                ver,
                client,
                topics,
            )
            if not v.allowed:
                assert set(v.denied_topics) <= set(topics)


def test_rule_set_too_big_for_one_automaton_falls_back_to_exact_matching(monkeypatch):
    import re2

    import policies.l7 as l7

    tiny = re2.Options()
    tiny.max_mem = 1 << 10
    tiny.log_errors = False
    monkeypatch.setattr(l7, "_SET_OPTIONS", tiny)
    rules = [HttpRule(method="GET", path=f"/v{i}/[a-z]+/[0-9]{{1,8}}") for i in range(50)]
    rs = http(*rules)
    assert rs._set is None and len(rs._slow) == 50
    assert rs.check("GET", "/v49/abc/12", "", []).matched == (49,)
    assert not rs.check("GET", "/v50/abc/12", "", []).allowed

from l7proxy.http1 import verdicts
from parsers.http1 import RequestParser
from tests.unit.http1.playbook import PathRules


class Counting(PathRules):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def check(self, method, path, host, headers):
        self.calls += 1
        return super().check(method, path, host, headers)


def request(raw: bytes):
    return RequestParser().receive_data(raw)[0]


def test_verdicts_are_memoised_per_rule_set_and_small_requests_only():
    rules = Counting()
    small = request(b"GET /public/a HTTP/1.1\r\nHost: w\r\n\r\n")
    assert verdicts.decide(rules, small).allowed
    assert verdicts.decide(rules, small).allowed
    assert rules.calls == 1
    big = request(b"GET /public/a HTTP/1.1\r\nHost: w\r\nX-Big: " + b"x" * 4000 + b"\r\n\r\n")
    verdicts.decide(rules, big)
    verdicts.decide(rules, big)
    assert rules.calls == 3  # never cached
    reloaded = Counting()  # a reload is a new rule-set object: a fresh cache
    assert verdicts.decide(reloaded, small).allowed and reloaded.calls == 1
    assert verdicts.decide(rules, small).allowed and rules.calls == 3  # both sets stay cached
    assert verdicts.decide(None, small) is verdicts.ALLOW_ALL


def test_header_actions_and_log_names_only():
    rules = PathRules(actions=(("REPLACE", "X-T", "right"), ("LOG", "X-S", "secret")))
    d = verdicts.decide(rules, request(b"GET /public/h HTTP/1.1\r\nHost: w\r\nX-T: wrong\r\n\r\n"))
    assert d.raw == b"GET /public/h HTTP/1.1\r\nHost: w\r\nX-T: right\r\n\r\n"
    assert d.logged == ("X-S",)
    denied = verdicts.decide(rules, request(b"GET /x HTTP/1.1\r\nHost: w\r\n\r\n"))
    assert not denied.allowed and denied.raw is None

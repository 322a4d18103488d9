"""Service records: what `service create` accepts, what it refuses (one line each), and the
stored form round-tripping."""

from __future__ import annotations

import pytest

from l7proxy.services.model import Service, ServiceError, build


def test_selector_service_defaults():
    svc = build(name="web", vip="10.96.0.10:80/tcp", selector="app=web", target_port=8080)
    assert (svc.vip, svc.port, svc.protocol, svc.target_port) == ("10.96.0.10", 80, "TCP", 8080)
    assert svc.selector == (("app", "web"),)
    assert svc.affinity_timeout == 0 and svc.algorithm == "random"
    # Kubernetes: targetPort defaults to port
    assert build(name="w", vip="10.96.0.10:80", selector="app=web").target_port == 80


def test_static_backends_and_affinity():
    svc = build(
        name="dns",
        vip="10.96.0.53:53/UDP",
        backends=["10.0.0.2:5353", "10.0.0.1:5353"],
        affinity="client-ip",
        algorithm="maglev",
    )
    assert [b.key for b in svc.backends] == ["10.0.0.1:5353", "10.0.0.2:5353"]
    assert svc.affinity_timeout == 10800 and svc.protocol == "UDP"


def test_round_trip_through_json():
    svc = build(
        name="web",
        vip="10.96.0.10:80/TCP",
        selector="app=web,tier=front",
        target_port=8080,
        node_port=30080,
        affinity="client-ip",
        affinity_timeout=30,
        dsr=True,
        algorithm="maglev",
    )
    assert Service.loads(svc.dumps()) == svc


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vip": "10.96.0.10"}, "IPv4:PORT"),
        ({"vip": "10.96.0.10:80/SCTP"}, "TCP or UDP"),
        ({"vip": "10.96.0.10:70000"}, "outside 1-65535"),
        ({"vip": "127.0.0.1:80"}, "routable"),
        ({"vip": "web:80"}, "not an IPv4 address"),
        ({"selector": "", "backends": []}, "needs --selector"),
        ({"backends": ["10.0.0.1:80"]}, "not both"),
        ({"selector": "app"}, "key=value"),
        ({"node_port": 80}, "30000-32767"),
        ({"affinity": "cookie"}, "client-ip or none"),
        ({"affinity_timeout": 5}, "needs --affinity client-ip"),
        ({"affinity": "client-ip", "affinity_timeout": 0}, "1-86400"),
        ({"algorithm": "roundrobin"}, "maglev or random"),
        ({"name": "Web_1"}, "lower-case"),
    ],
)
def test_bad_input_is_one_line(fields, message):
    base = {"name": "web", "vip": "10.96.0.10:80/TCP", "selector": "app=web"}
    with pytest.raises(ServiceError) as err:
        build(**{**base, **fields})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_static_backends_without_target_port():
    with pytest.raises(ServiceError, match="goes with --selector"):
        build(name="w", vip="10.96.0.1:80", backends=["10.0.0.1:80"], target_port=81)
    with pytest.raises(ServiceError, match="twice"):
        build(name="w", vip="10.96.0.1:80", backends=["10.0.0.1:80", "10.0.0.1:80"])


def test_a_foreign_record_is_rejected_not_crashing():
    with pytest.raises(ServiceError):
        Service.loads('{"name": "x"}')
    with pytest.raises(ServiceError):
        Service.loads("not json")

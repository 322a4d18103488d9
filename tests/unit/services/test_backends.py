"""Selector services follow their endpoints: namespace, every selector label, sorted order."""

from __future__ import annotations

from l7proxy.services.backends import KnownEndpoint, resolve
from l7proxy.services.model import build

NS = "k8s:io.kubernetes.pod.namespace=default"


def ep(name, ip, *labels, ns=NS):
    return KnownEndpoint(name, ip, (*labels, ns))


def test_selector_picks_matching_endpoints_in_address_order():
    svc = build(name="web", vip="10.96.0.10:80", selector="app=web", target_port=8080)
    eps = [
        ep("b", "10.200.0.10", "k8s:app=web"),
        ep("a", "10.200.0.9", "k8s:app=web", "k8s:tier=x"),
        ep("c", "10.200.0.3", "k8s:app=db"),
        ep("d", "10.200.0.4", "k8s:app=web", ns="k8s:io.kubernetes.pod.namespace=other"),
        ep("", "10.201.0.5", "k8s:app=web"),  # another node's pod, from the ipcache
    ]
    got = resolve(svc, eps)
    assert [(b.ip, b.port, b.endpoint) for b in got] == [
        ("10.200.0.9", 8080, "a"),
        ("10.200.0.10", 8080, "b"),
        ("10.201.0.5", 8080, ""),
    ]


def test_all_selector_labels_must_match():
    svc = build(name="web", vip="10.96.0.10:80", selector="app=web,tier=x", target_port=80)
    eps = [ep("a", "10.0.0.1", "k8s:app=web", "k8s:tier=x"), ep("b", "10.0.0.2", "k8s:app=web")]
    assert [b.endpoint for b in resolve(svc, eps)] == ["a"]


def test_static_backends_ignore_endpoints():
    svc = build(name="ext", vip="10.96.0.11:443", backends=["192.0.2.1:443"])
    assert [b.key for b in resolve(svc, [ep("a", "10.0.0.1", "k8s:app=web")])] == ["192.0.2.1:443"]


def test_terminating_endpoints_take_no_new_flow_unless_none_serves():
    from l7proxy.services.backends import serving

    svc = build(name="web", vip="10.96.0.10:80", selector="app=web", target_port=8080)
    eps = [
        KnownEndpoint("a", "10.200.0.1", ("k8s:app=web", NS)),
        KnownEndpoint("b", "10.200.0.2", ("k8s:app=web", NS), terminating=True),
    ]
    got = resolve(svc, eps)
    assert [(b.endpoint, b.terminating) for b in got] == [("a", False), ("b", True)]
    assert [b.endpoint for b in serving(got)] == ["a"]
    # all terminating: Kubernetes' fallback keeps them serving rather than failing the service
    assert serving(got[1:]) == got[1:]


def test_backends_that_left_a_frontend_are_the_ones_to_reset():
    from l7proxy.services.ops import _gone

    web, dns = ("10.96.0.10", 80, "TCP"), ("10.96.0.53", 53, "UDP")
    before = {web: {("10.200.0.1", 8080), ("10.200.0.2", 8080)}, dns: {("10.200.0.1", 53)}}
    after = {web: {("10.200.0.1", 8080)}}  # one web backend gone, the dns service deleted
    assert _gone(before, after) == {
        ("TCP", "10.200.0.2", 8080): {("10.96.0.10", 80)},
        ("UDP", "10.200.0.1", 53): {("10.96.0.53", 53)},
    }
    assert _gone(after, after) == {}

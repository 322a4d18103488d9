"""What the fuzzing campaign found in others' code, as plain tests next to the saved inputs in
tests/fuzz/regressions/ (which test_replay runs through the fuzz checks)."""

from __future__ import annotations

import time

import policies as P

FQDN_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fqdn}}
spec:
  endpointSelector: {{matchLabels: {{app: crawler}}}}
  egress:
  - toFQDNs:
    - {key}: "{value}"
"""


def test_fqdn_checks_do_not_backtrack():
    """toFQDNs names were checked with Cilium's CRD pattern ^([-a-zA-Z0-9_]+[.]?)+$ in Python's
    backtracking re: 22 letters and a '/' took 0.5 s, every further letter doubled it (policy
    fuzz finding redos-fqdn-matchname, 613 bytes: 0.5 s)."""
    for key in ("matchName", "matchPattern"):
        for value in ("a" * 60 + "/", "api.example.c" + "n" * 200 + "/v1", "*." + "x" * 240 + "!"):
            started = time.thread_time()
            result = P.load_text(FQDN_POLICY.format(key=key, value=value), "fqdn.yaml")
            assert time.thread_time() - started < 0.05, (key, value)
            assert any(f"invalid DNS {key}" in d.reason for d in result.diagnostics)
        ok = P.load_text(FQDN_POLICY.format(key=key, value="api.example.com."), "fqdn.yaml")
        assert not any("invalid DNS" in d.reason for d in ok.diagnostics)

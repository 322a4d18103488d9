"""`l7proxy-cni`: a CNI 1.0.0 plugin that asks the node agent to adopt a container's namespace.

The runtime runs the plugin with CNI_COMMAND (ADD, DEL, CHECK, VERSION) and the CNI_* variables in
the environment and the network configuration on stdin. ADD asks the agent (`endpoint.adopt`) for
a veth into CNI_NETNS named CNI_IFNAME, an address from the node's pool, labels and the datapath,
and prints the CNI result; DEL (`endpoint.release`) succeeds for a container the agent does not
know; CHECK (`endpoint.check`) verifies the plumbing against the previous result. Every failure is
a CNI error object on stdout (`code`, `msg`, `details`) and exit status 1.

Labels (docs/cni.md has the table): the container's podman labels become `container:KEY=VALUE`,
the network's `labels` too, `K8S_POD_NAMESPACE` becomes the namespace label
`k8s:io.kubernetes.pod.namespace` (`default` without it), and `K8S_POD_NAME` names the endpoint.

This module imports only the standard library and the agent's client, so the runtime's call costs
one interpreter start and one round trip to the agent.
"""

from __future__ import annotations

import json
import os
import sys

from l7proxy.agent.client import AgentError, AgentUnavailable, Client
from l7proxy.cni.podman_state import podman_labels

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
CHECK_VERSIONS = ("0.4.0", "1.0.0")  # CHECK appeared in 0.4.0
DEFAULT_SOCKET = "/var/run/l7proxy/agent.sock"
DEFAULT_TIMEOUT = 10.0  # seconds; an ADD recompiles the node's policy (tens of ms when idle)
MAX_LABELS = 64

# CNI's well-known error codes (SPEC.md, "Error"); 100 and up are the plugin's own.
INCOMPATIBLE_VERSION = 1
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
AGENT_REFUSED = 100


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str) -> dict:
        out = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def parse_config(raw: bytes) -> dict:
    try:
        conf = json.loads(raw or b"null")
    except ValueError as exc:
        raise CniError(DECODE_FAILURE, "network configuration is not JSON", str(exc)) from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "network configuration is not a JSON object")
    for key in ("cniVersion", "name", "type"):
        if not isinstance(conf.get(key), str) or not conf[key]:
            raise CniError(INVALID_CONFIG, f"network configuration has no {key!r}")
    if conf["cniVersion"] not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {conf['cniVersion']} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    timeout = conf.get("agentTimeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        raise CniError(INVALID_CONFIG, "agentTimeout must be a number of seconds in (0, 300]")
    if not isinstance(conf.get("labels", {}), dict):
        raise CniError(INVALID_CONFIG, "labels must be an object of KEY: VALUE")
    return conf


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K1=V1;K2=V2` (keys are case-sensitive; a pair without '=' is an error)."""
    out = {}
    for pair in filter(None, (text or "").split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def endpoint_labels(
    container_labels: dict[str, str], network_labels: dict, cni_args: dict[str, str]
) -> list[str]:
    """The labels the agent gets, in `source:key=value` form (see the module docstring)."""
    out = []
    for mapping in (network_labels, container_labels):
        for key, value in mapping.items():
            key, value = str(key), str(value)
            if not key or any(c in key for c in ",=: ") or "," in value or len(out) >= MAX_LABELS:
                continue  # not expressible as a selector label; left out, never half-parsed
            out.append(f"container:{key}={value}" if value else f"container:{key}")
    namespace = cni_args.get("K8S_POD_NAMESPACE")
    if namespace:
        out.append(f"k8s:io.kubernetes.pod.namespace={namespace}")
    return out


def build_result(version: str, ep: dict) -> dict:
    """The CNI result: the host veth, the container's interface, its /32 and the default route;
    a dual-stack endpoint's /128 and IPv6 default route too."""
    ip = {"address": f"{ep['ip']}/{ep['prefixlen']}", "gateway": ep["router"], "interface": 1}
    ips, routes = [ip], [{"dst": "0.0.0.0/0", "gw": ep["router"]}]
    if ep.get("ip6") and ep.get("router6"):
        ips.append({"address": f"{ep['ip6']}/128", "gateway": ep["router6"], "interface": 1})
        routes.append({"dst": "::/0", "gw": ep["router6"]})
    if version != "1.0.0":
        for entry in ips:  # 0.x results name the IP version
            entry["version"] = "6" if ":" in entry["address"] else "4"
    return {
        "cniVersion": version,
        "interfaces": [
            {"name": ep["host_if"]},
            {"name": ep["ifname"], "mac": ep.get("mac") or "", "sandbox": ep["netns"]},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    }


def _env(name: str, required: bool = True) -> str:
    value = os.environ.get(name, "")
    if required and not value:
        raise CniError(INVALID_ENV, f"{name} is not set")
    return value


def _call(conf: dict, op: str, **args) -> dict:
    sock = str(conf.get("agentSocket") or DEFAULT_SOCKET)
    client = Client(sock, timeout=float(conf.get("agentTimeout", DEFAULT_TIMEOUT)))
    try:
        return client.call(op, **args)
    except AgentUnavailable as exc:
        raise CniError(
            TRY_AGAIN_LATER,
            f"l7proxy agent not reachable at {sock}",
            f"{exc} (is `l7proxy agent` running?)",
        ) from None
    except AgentError as exc:
        raise CniError(AGENT_REFUSED, f"l7proxy agent: {exc}", "; ".join(exc.details)) from None
    except TimeoutError:
        raise CniError(
            TRY_AGAIN_LATER, f"l7proxy agent at {sock} did not answer within {client.timeout}s"
        ) from None
    except OSError as exc:
        raise CniError(TRY_AGAIN_LATER, f"l7proxy agent at {sock}: {exc}") from None


def cmd_add(conf: dict) -> dict:
    container_id, ifname, netns = _env("CNI_CONTAINERID"), _env("CNI_IFNAME"), _env("CNI_NETNS")
    cni_args = parse_cni_args(_env("CNI_ARGS", required=False))
    runtime = str(conf.get("runtime") or "cni")
    found = (
        podman_labels(conf.get("podmanState") or [], container_id) if runtime == "podman" else {}
    )
    ep = _call(
        conf,
        "endpoint.adopt",
        container_id=container_id,
        ifname=ifname,
        netns=netns,
        runtime=runtime,
        pod_name=cni_args.get("K8S_POD_NAME", ""),
        labels=endpoint_labels(found, conf.get("labels") or {}, cni_args),
    )
    return build_result(conf["cniVersion"], ep)


def cmd_del(conf: dict) -> None:
    _call(
        conf,
        "endpoint.release",
        container_id=_env("CNI_CONTAINERID"),
        ifname=_env("CNI_IFNAME"),
    )


def cmd_check(conf: dict) -> None:
    if conf["cniVersion"] not in CHECK_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK is not defined for {conf['cniVersion']}")
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult in the configuration")
    container_id, ifname = _env("CNI_CONTAINERID"), _env("CNI_IFNAME")
    try:
        ep = _call(conf, "endpoint.check", container_id=container_id, ifname=ifname)
    except CniError as exc:
        if exc.code == AGENT_REFUSED and "has no endpoint" in exc.msg:
            raise CniError(UNKNOWN_CONTAINER, exc.msg) from None
        raise
    want = f"{ep['ip']}/{ep['prefixlen']}"
    had = [ip.get("address") for ip in prev.get("ips") or [] if isinstance(ip, dict)]
    if want not in had:
        raise CniError(AGENT_REFUSED, f"prevResult has {had}, the agent has {want}")


def main(stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout
    command = os.environ.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command == "VERSION":
            # The runtime's own version in the request is not needed to answer.
            result = {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
        else:
            if command not in ("ADD", "DEL", "CHECK"):
                raise CniError(INVALID_ENV, f"CNI_COMMAND {command!r} is not ADD/DEL/CHECK/VERSION")
            conf = parse_config(stdin.read())
            version = conf["cniVersion"]
            if command == "ADD":
                result = cmd_add(conf)
            elif command == "DEL":
                result = cmd_del(conf)
            else:
                result = cmd_check(conf)
    except CniError as exc:
        json.dump(exc.to_json(version), stdout)
        stdout.write("\n")
        return 1
    if result is not None:
        json.dump(result, stdout)
        stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The services benchmark's lab: a client namespace and a backend namespace on one veth, nginx
on three ports of the backend (three backends per service), and two ways to reach N service
VIPs from the client: kube-proxy's (iptables DNAT chains with statistic-mode random selection,
loaded with iptables-restore) or the socket LB (redirect_bpf.sock_lb on a cgroup of its own).
Everything is named with a random prefix and removed by close()."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

CLIENT_IP, BACKEND_IP = "10.97.255.1", "10.97.255.2"
BACKEND_PORTS = (8080, 8081, 8082)
VIP_NET = ipaddress.IPv4Network("10.98.0.0/16")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


def vip(i: int) -> str:
    return str(VIP_NET.network_address + 1 + i)


def sh(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def iptables_rules(count: int, changed: int | None = None) -> str:
    """kube-proxy's shape (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* DNAT) for `count` services;
    `changed` gives that service a different third backend port (one service change)."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]"]
    body = []
    for i in range(count):
        lines += [f":KUBE-SVC-{i} - [0:0]"] + [f":KUBE-SEP-{i}-{k} - [0:0]" for k in range(3)]
        body.append(f"-A KUBE-SERVICES -d {vip(i)}/32 -p tcp --dport 80 -j KUBE-SVC-{i}")
        body.append(
            f"-A KUBE-SVC-{i} -m statistic --mode random --probability 0.33333 -j KUBE-SEP-{i}-0"
        )
        body.append(
            f"-A KUBE-SVC-{i} -m statistic --mode random --probability 0.5 -j KUBE-SEP-{i}-1"
        )
        body.append(f"-A KUBE-SVC-{i} -j KUBE-SEP-{i}-2")
        for k, port in enumerate(BACKEND_PORTS):
            if i == changed and k == 2:
                port = BACKEND_PORTS[0]
            body.append(f"-A KUBE-SEP-{i}-{k} -p tcp -j DNAT --to-destination {BACKEND_IP}:{port}")
    lines += body
    lines += ["-A OUTPUT -j KUBE-SERVICES", "COMMIT", ""]
    return "\n".join(lines)


def lb_services(count: int, changed: int | None = None):
    from redirect_bpf.sock_lb import LbService

    out = []
    for i in range(count):
        ports = list(BACKEND_PORTS)
        if i == changed:
            ports[2] = BACKEND_PORTS[0]
            ports = sorted(set(ports))
        out.append(LbService(vip(i), 80, "TCP", tuple((BACKEND_IP, p) for p in ports)))
    return out


class ServicesLab:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.client_ns, self.backend_ns = f"l7sb{tag}-c", f"l7sb{tag}-b"
        self.workdir = Path(tempfile.mkdtemp(prefix="l7svc-bench-"))
        self.cgroup = CGROUP_ROOT / f"l7sb{tag}"
        self.pin_dir = Path(f"/sys/fs/bpf/l7sb{tag}-lb")
        self.nginx: subprocess.Popen | None = None
        self.lb = None
        self.np_pin_dir = Path(f"/sys/fs/bpf/l7sb{tag}-np")
        self.nodeport = None
        self._np_objects: list = []

    def start(self) -> ServicesLab:
        c, b = self.client_ns, self.backend_ns
        sh("ip", "netns", "add", c)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", "sbc0", "netns", c, "type", "veth", "peer", "sbb0", "netns", b)
        for ns, dev, ip in ((c, "sbc0", CLIENT_IP), (b, "sbb0", BACKEND_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", c, "route", "add", str(VIP_NET), "dev", "sbc0")
        listen = "\n".join(f"listen {BACKEND_IP}:{p} reuseport;" for p in BACKEND_PORTS)
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            # one process: killing it leaves no orphaned worker holding the test's stdout
            f"daemon off; master_process off; pid {self.workdir}/nginx.pid;\n"
            f"error_log {self.workdir}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http { access_log off; keepalive_requests 1000000; keepalive_timeout 600s;\n"
            f"server {{ {listen} location / {{ return 200 'ok\\n'; }} }} }}\n"
        )
        self.nginx = subprocess.Popen(
            ["ip", "netns", "exec", b, "nginx", "-c", str(conf), "-p", str(self.workdir)],
            stderr=subprocess.DEVNULL,
        )
        self.cgroup.mkdir()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["ip", "netns", "exec", c, "curl", "-s", f"http://{BACKEND_IP}:8082/"],
                capture_output=True,
                text=True,
            )
            if r.stdout.strip() == "ok":
                return self
            time.sleep(0.1)
        raise RuntimeError("nginx did not answer in the backend namespace")

    # -- the two ways -------------------------------------------------------------------------

    def use_iptables(self, count: int, changed: int | None = None) -> float:
        """Load the rules for `count` services; returns iptables-restore's wall time (s)."""
        self.clear_lb()
        text = iptables_rules(count, changed)
        t0 = time.perf_counter()
        sh("ip", "netns", "exec", self.client_ns, "iptables-restore", input=text)
        return time.perf_counter() - t0

    def clear_iptables(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "netns", "exec", self.client_ns, "iptables", "-t", "nat", "-F")
            sh("ip", "netns", "exec", self.client_ns, "iptables", "-t", "nat", "-X")

    def use_lb(self, count: int, changed: int | None = None) -> float:
        """Write `count` services into the socket LB's maps; returns the sync's wall time (s)."""
        self.clear_iptables()
        if self.lb is None:
            from redirect_bpf.sock_lb import SockLB

            self.lb = SockLB(self.pin_dir)
            self.lb.attach(self.cgroup)
        services = lb_services(count, changed)
        t0 = time.perf_counter()
        self.lb.sync(services)
        return time.perf_counter() - t0

    def clear_lb(self) -> None:
        if self.lb is not None:
            self.lb.sync([])

    def use_nodeport(self, node_port: int) -> dict[str, int]:
        """NodePort on the backend's veth (tc ingress and egress, as on a node's underlay
        device): BACKEND_IP:node_port balances over the three nginx ports, which the datapath's
        endpoint map calls local (DNAT only). Its own pin directory (datapath, socket LB maps,
        NodePort). Returns the programs' fds for their bpf_stats."""
        from redirect_bpf import loader, structs
        from redirect_bpf.ipcache import be32
        from redirect_bpf.nodeport import NodePort, NpFrontend
        from redirect_bpf.sock_lb import LbService, SockLB

        dp = loader.load(self.np_pin_dir)
        lb = SockLB(self.np_pin_dir)
        self._np_objects = [dp, lb]
        self.nodeport = NodePort(self.np_pin_dir)
        lb.sync([LbService(vip(0), 80, "TCP", tuple((BACKEND_IP, p) for p in BACKEND_PORTS))])
        self.nodeport.sync([NpFrontend(vip(0), 80, "TCP", node_port=node_port)])
        key_type, value_type, _ = structs.MAPS["ep_by_ip"]
        info = value_type(endpoint_id=1, identity=1000, ipv4=be32(BACKEND_IP))
        dp.maps["ep_by_ip"].put(key_type(be32(BACKEND_IP)), info)
        self.nodeport.set_node_ip(BACKEND_IP)
        # nsenter, not `ip netns exec`: that remounts /sys and hides the pins
        enter = ("nsenter", f"--net=/var/run/netns/{self.backend_ns}")
        sh(*enter, "tc", "qdisc", "add", "dev", "sbb0", "clsact")
        for hook, prog in (("ingress", "np_from_netdev"), ("egress", "np_to_netdev")):
            pin = self.np_pin_dir / f"prog_{prog}"
            sh(*enter, "tc", "filter", "add", "dev", "sbb0", hook, "prio", "1", "bpf", "da",
               "pinned", str(pin))  # fmt: skip
        return dict(self.nodeport.progs)

    # -- load ---------------------------------------------------------------------------------

    def wrk(self, url: str, seconds: float, new_connections: bool) -> float:
        """Requests per second of wrk -t1 -c50 from the client namespace (and the LB cgroup)."""
        join = str(self.cgroup / "cgroup.procs")
        args = ["ip", "netns", "exec", self.client_ns, "wrk", "-t1", "-c50", f"-d{int(seconds)}s"]
        if new_connections:
            args += ["-H", "Connection: close"]
        r = subprocess.run(
            [*args, url],
            capture_output=True,
            text=True,
            preexec_fn=lambda: Path(join).write_text(str(os.getpid())),
            timeout=seconds + 60,
        )
        for line in r.stdout.splitlines():
            if line.startswith("Requests/sec:"):
                return float(line.split()[1])
        raise RuntimeError(f"wrk gave no rate: {r.stdout}{r.stderr}")

    def close(self) -> None:
        if self.nginx is not None:
            self.nginx.kill()
            self.nginx.wait()
        if self.lb is not None:
            self.lb.destroy()
            with contextlib.suppress(OSError):
                self.pin_dir.rmdir()
        if self.nodeport is not None:
            from redirect_bpf import loader

            self.nodeport.close()
            for obj in self._np_objects:
                obj.close()
            loader.unpin(self.np_pin_dir)  # the filters go with the backend's namespace
        for ns in (self.client_ns, self.backend_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for _ in range(50):
            try:
                self.cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(self.workdir, ignore_errors=True)

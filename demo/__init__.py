"""`make demo` (`python -m demo`): Cilium's Star Wars getting-started on real namespaces.

With root and BPF: an agent (node mode) makes the endpoints deathstar, tiefighter and xwing as
network namespaces; the L3/L4 policy drops the xwing in the kernel, the L7 policy lets the
tiefighter request landing and answers its PUT /v1/exhaust-port with 403 Access denied; then
Kafka (roles per topic) and gRPC (one rule per method) on endpoints of the same agent; last, the
Star Wars story across the nodes of a local lab (`l7proxy lab up --nodes 2`: etcd, two node
namespaces, an agent each), the deathstar on node1 and the ships on node2. Without root or BPF it
says so and runs the same stories through `l7proxy gateway` on loopback.

Every step prints the command it runs and the verdict it actually saw; a verdict that differs
from what the policy promises is marked and makes the demo exit 1. Everything it made is removed
at the end, also on Ctrl-C or SIGTERM.

The product never imports this package; it drives the product through its CLI and the agent's
socket, as a user would. The policies it imports are the YAML files next to this module.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
L3L4 = HERE / "sw_l3_l4_policy.yaml"
L7 = HERE / "sw_l3_l4_l7_policy.yaml"
GATEWAY_L7 = HERE / "gateway_sw_policy.yaml"  # the L7 policy on port 8080, for non-root gateways
KAFKA_POLICY = HERE / "kafka_policy.yaml"
GRPC_POLICY = HERE / "grpc_policy.yaml"

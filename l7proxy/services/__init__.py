"""Services (issue 16): a virtual IP:port that load-balances to backends.

model (the Service record and its validation), backends (selector -> endpoints), maglev (pure
consistent hashing), ops (the agent's service.* operations), cluster_sync (services in etcd),
lb_adapter (the kernel side through redirect_bpf.sock_lb), sock_terminate (resetting sockets to
deleted backends). docs/services.md has the whole story.
"""

"""Cluster mode: identities, the ipcache, nodes, pod CIDRs and the policy repository in etcd.

The agent uses this package only when it runs with `--kvstore`; without it nothing here is
imported. `link.ClusterLink` ties the parts together for one agent; the datapath is driven only
through `sink.ClusterSink`.
"""

"""Kernel datapath: BPF C programs, the bcc loader, pyroute2 attach, and map sync from MapState."""

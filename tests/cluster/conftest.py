"""Cluster tests run against a real etcd started here, on loopback, one per module."""

from __future__ import annotations

import asyncio

import pytest

from tests.cluster.etcd_process import EtcdProcess
from tests.conftest import need_binary


@pytest.fixture(scope="module")
def etcd():
    server = EtcdProcess(need_binary("etcd")).start()
    yield server
    server.close()


def run(coro):
    return asyncio.run(coro)


async def wipe(url: str) -> None:
    """Remove every key the cluster layer writes (tests in a module share one etcd)."""
    from l7proxy.cluster.kvstore import EtcdKV

    kv = EtcdKV(url)
    try:
        for prefix in ("cilium/", "l7proxy/"):
            items, _ = await kv.list(prefix)
            for item in items:
                await kv.delete(item.key)
    finally:
        await kv.close()

"""A prefix watch that survives disconnects: it resumes from the revision after the last event
it handled, and lists again only when etcd compacted past that revision. A handler that raises
is logged and counted, and the watch goes on with the next event: an exception escaping here
would end the watch's task without a word, and the node would stop hearing about that prefix
for the rest of its life (what once kept a removed node's tunnel in every other node's maps)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from l7proxy.cluster.kvstore import Item, KVStore, KVStoreDown, WatchCompacted, WatchEvent

log = logging.getLogger("l7proxy.cluster")

RETRY_S = 0.5  # between attempts while etcd is unreachable


class ResumableWatch:
    def __init__(
        self,
        kv: KVStore,
        prefix: str,
        on_event: Callable[[WatchEvent], Awaitable[None]],
        on_relist: Callable[[list[Item]], Awaitable[None]],
    ) -> None:
        self.kv = kv
        self.prefix = prefix
        self.on_event = on_event
        self.on_relist = on_relist
        self.next_revision = 0
        self.resumes = 0  # watch restarted from next_revision after a disconnect
        self.relists = 0  # full re-lists after a compaction
        self.handler_errors = 0  # events whose handler raised (logged with the traceback)

    async def run(self, start_revision: int) -> None:
        self.next_revision = start_revision
        first = True
        while True:
            try:
                if not first:
                    self.resumes += 1
                first = False
                async for event in self.kv.watch(self.prefix, self.next_revision):
                    await self._handle(event)
                    self.next_revision = event.revision + 1
            except WatchCompacted as exc:
                log.warning("watch %s: %s; listing again", self.prefix, exc)
                try:
                    items, head = await self.kv.list(self.prefix)
                except KVStoreDown:
                    await asyncio.sleep(RETRY_S)
                    continue
                await self.on_relist(items)
                self.relists += 1
                self.next_revision = head + 1
            except KVStoreDown as exc:
                log.debug("watch %s: %s", self.prefix, exc)
            await asyncio.sleep(RETRY_S)

    async def _handle(self, event: WatchEvent) -> None:
        try:
            await self.on_event(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.handler_errors += 1
            log.exception("watch %s: handling %s %s failed", self.prefix, event.kind, event.key)

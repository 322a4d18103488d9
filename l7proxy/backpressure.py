"""Client-side read pausing shared by the protocol sessions.

A session stops reading its client for several independent reasons (upstream buffer full, too
many requests queued, still connecting...). Each reason is a bit in `self.paused`; reading
resumes only when the last reason is released.
"""

from __future__ import annotations

import asyncio


class PausableClient(asyncio.Protocol):
    """Mixin for sessions with `transport`, `paused` (int) and `closed` attributes."""

    __slots__ = ()

    def pause_client_reading(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_client_reading(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

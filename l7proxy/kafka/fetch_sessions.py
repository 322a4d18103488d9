"""The fetch sessions of one Kafka connection (docs/kafka.md, "Fetch sessions").

An incremental Fetch (v7+, epoch > 0) names only what changed; the broker serves the rest of the
session unnamed. So the connection keeps the session ids the broker gave it (learned from the
answers, by the response side) and the topics its sessions may hold (named by the Fetches it
forwarded), and the request side checks incremental Fetches and policy changes against them.
"""

from __future__ import annotations

from parsers.kafka.keys import FETCH

MAX_SESSIONS = 64  # per connection (a client keeps one per broker connection)


class FetchSessions:
    __slots__ = ("ids", "topics", "_checked_against")

    def __init__(self) -> None:
        self.ids: set[int] = set()  # session ids the broker gave this connection
        self.topics: set[str] = set()  # topics this connection's sessions may hold
        self._checked_against = None  # the rule set the last Fetch was checked against

    def opened_here(self, session_id) -> bool:
        return session_id in self.ids

    def learn(self, session_id: int) -> None:
        """The broker opened session `session_id` for this connection (bounded)."""
        if len(self.ids) >= MAX_SESSIONS:
            self.ids.clear()
        self.ids.add(session_id)

    def hold(self, names) -> None:
        """A forwarded Fetch named these topics: the sessions may serve them from now on."""
        self.topics.update(names)

    def revoked_topic(self, rules, version: int, client_id) -> str | None:
        """When the policy changed since this connection's last Fetch: a topic the sessions may
        hold that it now denies (the caller closes; the client starts a new session), else
        None. Cheap when the rule set is the one checked last."""
        if rules is self._checked_against:
            return None
        self._checked_against = rules
        for topic in self.topics:
            if not rules.check(FETCH, version, client_id, [topic]).allowed:
                self.topics.clear()
                return topic
        return None

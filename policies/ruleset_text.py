"""What every L7 rule set (HTTP, Kafka, DNS) shares: its text for `policy trace` and the CLI, and
the key that says two rule sets are the same. Its own module so that l7.py and fqdn.py can both
use it without importing each other."""

from __future__ import annotations


class RuleSetText:
    """Mixed into a rule set with `parser`, `rules` and `allow_all` attributes."""

    __slots__ = ()

    def describe(self) -> list[str]:
        if self.allow_all and not self.rules:
            return ["allow-all"]
        return [str(r) for r in self.rules] + (["allow-all"] if self.allow_all else [])

    def key(self) -> tuple:
        return (self.parser, self.rules, self.allow_all)

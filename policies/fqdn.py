"""DNS names in policy: `matchName`/`matchPattern` selectors (toFQDNs peers and `rules.dns`), the
DNS rule set the DNS proxy asks, and the identities of the IPs learned from DNS answers.

Names compare case-insensitively with a trailing dot (Cilium's form). In a pattern `*` stands for
any run of DNS characters within one label (`[-a-zA-Z0-9_]*`), so `*.example.com` matches
`a.example.com` but neither `example.com` nor `a.b.example.com`; `*` alone matches every name.

Learned IPs (Cilium >= 1.16): every IP gets the identity of the *set* of FQDN selectors that
select it (and of the policy CIDRs that contain it), so IPs selected alike share one identity and
a selector resolves to a handful of identities, not to one per IP. Pure: the caller hands in the
learned table {name: IPs}; the allocator and the IPCache are the compiler's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from policies.labels import Label, LabelSet
from policies.ruleset_text import RuleSetText

DNS_CHARS = "[-a-zA-Z0-9_]"
# Cilium's CRD patterns ^([-a-zA-Z0-9_]+[.]?)+$ (and with *), rewritten without the nested
# quantifier: Go's regexp does not backtrack, Python's re did for seconds on ~25 characters.
NAME_RE = re.compile(r"^[-a-zA-Z0-9_]+(?:\.[-a-zA-Z0-9_]+)*\.?$")
PATTERN_RE = re.compile(r"^[-a-zA-Z0-9_*]+(?:\.[-a-zA-Z0-9_*]+)*\.?$")
MAX_NAME = 255
FQDN_SOURCE = "fqdn"  # label source of a learned-IP identity: one label per selecting selector
FQDN_CIDR_SOURCE = "fqdn-cidr"  # a policy CIDR that contains the IP (CIDR rules still apply)
FQDN_FAMILY_SOURCE = "fqdn-family"  # "4" or "6" (world-ipv4 / world-ipv6 select it)


def normalize(name: str) -> str:
    """Lower case with one trailing dot: `API.Example.com` -> `api.example.com.`."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def check_selector(key: str, value) -> str | None:
    """Why a matchName/matchPattern value is invalid (None when it is fine)."""
    if not isinstance(value, str) or not value:
        return f"{key} must be a non-empty string"
    if len(value) > MAX_NAME:
        return f"{key} {value!r} is longer than {MAX_NAME} characters"
    if key == "matchPattern" and "**" in value:
        return (
            f"invalid matchPattern {value!r}: '**' is not a pattern; '*' matches within one label"
        )
    if not (NAME_RE if key == "matchName" else PATTERN_RE).match(value):
        return f"invalid DNS {key} {value!r}"
    return None


@dataclass(frozen=True, slots=True)
class FQDNSelector:
    """One toFQDNs entry or one `rules.dns` entry: exactly one of the two fields is set."""

    match_name: str = ""
    match_pattern: str = ""
    _regex: object = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.match_name:
            object.__setattr__(self, "match_name", normalize(self.match_name))
            return
        pattern = normalize(self.match_pattern)
        object.__setattr__(self, "match_pattern", pattern)
        if pattern != "*.":
            parts = (re.escape(p) for p in pattern.split("*"))
            regex = re.compile((DNS_CHARS + "*").join(parts).join(("^", "$")))
            object.__setattr__(self, "_regex", regex)

    @property
    def matches_all(self) -> bool:
        return self.match_pattern == "*."

    def matches(self, name: str) -> bool:
        """`name` must already be normalized (normalize())."""
        if self.match_name:
            return name == self.match_name
        return self.matches_all or self._regex.match(name) is not None

    def __str__(self) -> str:
        if self.match_name:
            return f"matchName:{self.match_name}"
        return f"matchPattern:{self.match_pattern}"


@dataclass(frozen=True, slots=True)
class DnsVerdict:
    allowed: bool
    matched: tuple[int, ...]  # indexes of the rules that allow the name


class DnsRuleSet(RuleSetText):
    """The DNS proxy's rules for one redirected port: a query is forwarded when a rule matches
    its name, else answered REFUSED."""

    parser = "dns"
    __slots__ = ("rules", "sources", "allow_all", "_memo")

    def __init__(self, rules: Iterable[FQDNSelector], allow_all: bool = False, sources=()):
        self.rules = tuple(rules)
        self.sources = tuple(sources) or ("",) * len(self.rules)
        self.allow_all = allow_all or any(r.matches_all for r in self.rules)
        self._memo: dict[str, DnsVerdict] = {}

    def check(self, name: str) -> DnsVerdict:
        name = normalize(name)
        verdict = self._memo.get(name)
        if verdict is None:
            hits = tuple(i for i, r in enumerate(self.rules) if r.matches(name))
            verdict = DnsVerdict(self.allow_all or bool(hits), hits)
            if len(self._memo) < 4096:  # a bounded cache of names this rule set has judged
                self._memo[name] = verdict
        return verdict

    def explain(self, name: str) -> list[tuple[int, bool, str]]:
        """(rule index, matched, why) per rule, for `policy trace --dns`; -1 is allow-all."""
        name = normalize(name)
        out = []
        for i, r in enumerate(self.rules):
            hit = r.matches(name)
            out.append((i, hit, f"{name} {'matches' if hit else 'does not match'} {r}"))
        if self.allow_all and not any(ok for _, ok, _ in out):
            out.append((-1, True, "a plain L4 allow covers this port: every name is forwarded"))
        return out


def selector_labels(
    selectors: Iterable[FQDNSelector], nets: Iterable[str], family: int
) -> LabelSet:
    """The label set of the identity shared by IPs that these selectors select and these policy
    CIDRs contain."""
    labels = [Label(FQDN_SOURCE, str(s), "") for s in selectors]
    labels += [Label(FQDN_CIDR_SOURCE, n, "") for n in nets]
    labels.append(Label(FQDN_FAMILY_SOURCE, str(family), ""))
    return LabelSet(labels)


def is_fqdn_identity(labels: LabelSet) -> bool:
    return any(lab.source == FQDN_SOURCE for lab in labels)


def learned_ips(
    selectors: Iterable[FQDNSelector], learned: Mapping[str, Iterable[str]]
) -> dict[str, frozenset[FQDNSelector]]:
    """{ip: the selectors that select it}: an IP is selected by every selector that matches a
    name that resolved to it. IPs no selector selects are left out (nothing in policy needs them)."""
    selectors = tuple(dict.fromkeys(selectors))
    out: dict[str, set[FQDNSelector]] = {}
    for name, ips in learned.items():
        name = normalize(name)
        hits = [s for s in selectors if s.matches(name)]
        if not hits:
            continue
        for ip in ips:
            out.setdefault(str(ipaddress.ip_address(ip)), set()).update(hits)
    return {ip: frozenset(sels) for ip, sels in out.items()}


def ip_labels(
    selected: Mapping[str, frozenset[FQDNSelector]], nets: Iterable
) -> dict[str, LabelSet]:
    """{ip: label set of its identity}; `nets` are the policy's CIDRs (ip_network objects)."""
    nets = list(nets)
    out = {}
    for ip, sels in selected.items():
        addr = ipaddress.ip_address(ip)
        inside = sorted(str(n) for n in nets if n.version == addr.version and addr in n)
        out[ip] = selector_labels(sorted(sels, key=str), inside, addr.version)
    return out

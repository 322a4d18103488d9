"""HPACK for a relay: decode what the policy needs, re-encode without shared state.

Design (see docs/http2.md): the proxy keeps ONE hpack `Decoder` per direction, fed with every
header block of that direction in order, so it stays in lockstep with the peer's encoder.

* Towards the server, request blocks are re-encoded by `encode_fields`, which never touches a
  dynamic table (static-table indexed fields, literals without indexing, no Huffman). The proxy may
  therefore drop a denied block, or rewrite headers, without any HPACK state to keep in sync with
  the server.
* Towards the client, server blocks are forwarded raw (the client's decoder sees exactly what the
  server's encoder produced). Responses the proxy synthesizes use `encode_fields` too, so they never
  touch the client's decoder table either.

Decoding is the expensive part (pure-Python hpack). Clients re-send the same request for the same
route as a block of indexed fields that leaves the table unchanged; `CachingDecoder` memoizes such
blocks, keyed by their raw bytes, until a block that mutates the table arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hpack import Decoder, HPACKError, OversizedHeaderListError
from hpack.table import HeaderTable

STATIC_EXACT: dict[tuple[bytes, bytes], int] = {}
STATIC_NAME: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    STATIC_EXACT.setdefault((_name, _value), _index)
    STATIC_NAME.setdefault(_name, _index)

NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
CONNECTION_SPECIFIC = frozenset(
    {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade"}
)
REQUEST_PSEUDO = frozenset({":method", ":scheme", ":authority", ":path", ":protocol"})
ENTRY_OVERHEAD = 32  # RFC 7541 section 4.1
CACHE_ENTRIES = 512


class HeaderBlockError(Exception):
    """A header block that cannot be decoded: the HPACK state is lost, a connection error.
    `too_large` marks a block that inflated past the decoder's hard limit (an HPACK bomb)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _integer(len(data), 7, 0) + data


def encode_fields(headers: Sequence[tuple[str, str]]) -> bytes:
    """An HPACK block that uses only the static table: decodable by any decoder, whatever its
    dynamic table holds, and leaving that table unchanged."""
    out = []
    for name, value in headers:
        bname = name.encode("latin-1")
        bvalue = value.encode("latin-1")
        index = STATIC_EXACT.get((bname, bvalue))
        if index:
            out.append(_integer(index, 7, 0x80))
            continue
        first = 0x10 if bname in NEVER_INDEXED else 0x00
        index = STATIC_NAME.get(bname)
        if index:
            out.append(_integer(index, 4, first))
        else:
            out.append(bytes((first,)) + _string(bname))
        out.append(_string(bvalue))
    return b"".join(out)


def _skip_integer(block: bytes, pos: int, prefix_bits: int) -> int:
    if block[pos] & ((1 << prefix_bits) - 1) != (1 << prefix_bits) - 1:
        return pos + 1
    pos += 1
    while block[pos] & 0x80:
        pos += 1
    return pos + 1


def _integer_at(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def block_mutates_table(block: bytes) -> bool:
    """True when decoding `block` changes the decoder's dynamic table (a literal with incremental
    indexing or a table size update). Only called on blocks that decoded successfully."""
    pos = 0
    end = len(block)
    while pos < end:
        byte = block[pos]
        if byte & 0x80:
            pos = _skip_integer(block, pos, 7)
            continue
        if byte & 0x60:
            return True
        literal_name = not byte & 0x0F
        pos = _skip_integer(block, pos, 4)
        for _ in range(2 if literal_name else 1):
            length, pos = _integer_at(block, pos, 7)
            pos += length
    return False


def header_list_size(headers: Sequence[tuple[str, str]]) -> int:
    """SETTINGS_MAX_HEADER_LIST_SIZE accounting (RFC 9113 section 6.5.2)."""
    return sum(len(n) + len(v) + ENTRY_OVERHEAD for n, v in headers)


class CachingDecoder:
    """An hpack Decoder for one direction, memoizing blocks that leave its table unchanged.

    `hard_limit` bounds what one block may inflate to (an HPACK bomb beyond it is a connection
    error, the decoder state being lost mid-block); callers apply their softer per-stream limit to
    the decoded list."""

    __slots__ = ("_decoder", "_cache", "hard_limit", "generation")

    def __init__(self, hard_limit: int, max_table_size: int = 4096) -> None:
        self._decoder = Decoder(max_header_list_size=hard_limit)
        self._decoder.max_allowed_table_size = max_table_size
        self._cache: dict[bytes, tuple[tuple[str, str], ...]] = {}
        self.hard_limit = hard_limit
        self.generation = 0  # bumped whenever a block changed the dynamic table

    def allow_table_size(self, size: int) -> None:
        """The peer was told (SETTINGS_HEADER_TABLE_SIZE) it may use a table this large."""
        if size > self._decoder.max_allowed_table_size:
            self._decoder.max_allowed_table_size = size

    def decode(self, block: bytes) -> tuple[tuple[str, str], ...]:
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        try:
            raw = self._decoder.decode(block, raw=True)
        except OversizedHeaderListError as exc:
            raise HeaderBlockError(str(exc), too_large=True) from exc
        except (HPACKError, IndexError, ValueError) as exc:
            raise HeaderBlockError(f"{type(exc).__name__}: {exc}") from exc
        headers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in raw)
        # With a zero-size table (the relay asks the server for one) literals with incremental
        # indexing are evicted at once: the block is still a pure function of its bytes.
        if self._decoder.header_table_size and block_mutates_table(block):
            self._cache.clear()
            self.generation += 1
        else:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[block] = headers
        return headers


@dataclass(frozen=True, slots=True)
class Request:
    """A validated HTTP/2 request head (RFC 9113 section 8.3.1)."""

    method: str
    scheme: str
    authority: str
    path: str
    headers: tuple[tuple[str, str], ...]  # everything, pseudo-headers first, as received
    content_type: str
    content_length: int = -1  # -1: no content-length field

    @property
    def is_grpc(self) -> bool:
        return self.content_type.startswith("application/grpc")


class MalformedRequest(Exception):
    """A request head RFC 9113 section 8.1.1 calls malformed: a stream error PROTOCOL_ERROR."""


def parse_request(headers: tuple[tuple[str, str], ...]) -> Request:
    pseudo: dict[str, str] = {}
    regular_seen = False
    host = ""
    content_type = ""
    content_length = -1
    for name, value in headers:
        if name[:1] == ":":
            if regular_seen or name not in REQUEST_PSEUDO or name in pseudo:
                raise MalformedRequest(f"bad pseudo-header {name}")
            pseudo[name] = value
            continue
        regular_seen = True
        if name != name.lower():
            raise MalformedRequest(f"uppercase header name {name}")
        if name in CONNECTION_SPECIFIC:
            raise MalformedRequest(f"connection-specific header {name}")
        if name == "te" and value.lower() != "trailers":
            raise MalformedRequest("te other than trailers")
        if name == "host":
            host = value
        elif name == "content-type":
            content_type = value
        elif name == "content-length":
            # 1*DIGIT (RFC 9110 8.6), bounded; repeated fields must agree.
            if not (0 < len(value) <= 18 and value.isascii() and value.isdigit()):
                raise MalformedRequest("bad content-length")
            if content_length >= 0 and int(value) != content_length:
                raise MalformedRequest("conflicting content-length")
            content_length = int(value)
    method = pseudo.get(":method")
    if not method:
        raise MalformedRequest("no :method")
    path = pseudo.get(":path", "")
    scheme = pseudo.get(":scheme", "")
    if method != "CONNECT" or ":protocol" in pseudo:
        if not path or not scheme:
            raise MalformedRequest("no :path or :scheme")
    return Request(
        method=method,
        scheme=scheme,
        authority=pseudo.get(":authority") or host,
        path=path,
        headers=headers,
        content_type=content_type,
        content_length=content_length,
    )


def check_trailers(headers: tuple[tuple[str, str], ...]) -> None:
    for name, _ in headers:
        if name[:1] == ":" or name != name.lower() or name in CONNECTION_SPECIFIC:
            raise MalformedRequest(f"bad trailer field {name}")


HOP_BY_HOP_UPGRADE = CONNECTION_SPECIFIC | {"http2-settings", "host", "te"}


def upgrade_request_headers(
    method: str, target: str, headers: Sequence[tuple[str, str]], scheme: str = "http"
) -> tuple[tuple[str, str], ...]:
    """The HTTP/2 header list of an HTTP/1.1 request that asked for `Upgrade: h2c`: pseudo-headers
    from the request line and Host, names lowercased, hop-by-hop fields dropped (RFC 9113 8.2.2)."""
    host = ""
    connection_tokens: set[str] = set()
    for name, value in headers:
        lname = name.lower()
        if lname == "host":
            host = value
        elif lname == "connection":
            connection_tokens |= {t.strip().lower() for t in value.split(",")}
    out = [(":method", method), (":scheme", scheme), (":authority", host), (":path", target)]
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP_UPGRADE or lname in connection_tokens:
            if lname == "te" and value.strip().lower() == "trailers":
                out.append(("te", "trailers"))
            continue
        out.append((lname, value))
    return tuple(out)

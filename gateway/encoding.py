"""Request bodies as they arrive (``Content-Encoding``) and as the gateway keeps them.

The gateway reads a batch's bytes as they came over the wire (aiohttp's own decompression
is off) and undoes the encoding here, in one call, bounded by ``--max-body``. A gzip body
is then stored exactly as received: an agent batch of 1000 events is ~474 KB of JSON and
~11 KiB of gzip, and writing the JSON into the WAL (and checkpointing it into the file)
was a fifth of the gateway's time per batch (docs/performance.md, "Reference gateway").
Readers tell the two kinds apart by the first two bytes: a gzip member starts with
``1f 8b``, which no JSON text can (JSON may only start with whitespace, ``[`` and friends).
"""

from __future__ import annotations

import zlib

GZIP_MAGIC = b"\x1f\x8b"
_GZIP = {"gzip", "x-gzip"}


class BodyTooLarge(Exception):
    """The decoded body exceeds the limit (HTTP 413)."""


class BodyUndecodable(Exception):
    """The body is not what its Content-Encoding says (HTTP 400)."""


def _inflate(raw: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise BodyUndecodable(str(exc)) from exc
    if len(out) > limit:
        raise BodyTooLarge(len(out))
    if not d.eof:
        raise BodyUndecodable("truncated")
    return out


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """The JSON bytes of a body sent with ``encoding`` ('' / identity, gzip, x-gzip or
    deflate, already lower-cased); raise BodyTooLarge or BodyUndecodable.

    Like aiohttp's decoder: ``deflate`` may be zlib-wrapped (RFC 1950) or, as some clients
    send it, raw; only the first gzip member counts; an empty body stays empty."""
    if not raw or encoding in ("", "identity"):
        if len(raw) > limit:
            raise BodyTooLarge(len(raw))
        return raw
    if encoding in _GZIP:
        return _inflate(raw, 16 + zlib.MAX_WBITS, limit)
    wbits = zlib.MAX_WBITS if raw[0] & 0xF == 8 else -zlib.MAX_WBITS
    return _inflate(raw, wbits, limit)


def kept_body(raw: bytes, encoding: str, decoded: bytes) -> bytes:
    """What the store keeps of a body: the gzip bytes as received, else the JSON."""
    return raw if encoding in _GZIP and raw[:2] == GZIP_MAGIC else decoded


def stored_json(blob: bytes) -> bytes:
    """The JSON of a body the store kept (see kept_body)."""
    if blob[:2] == GZIP_MAGIC:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
    return blob

"""Weak ETags for rate answers, and matching them against `If-None-Match`."""

import hashlib


def etag(*parts: object) -> str:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=12).hexdigest()
    return f'W/"{digest}"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2): the opaque part decides, `W/` aside; `*` matches anything."""
    if not if_none_match:
        return False
    tags = {candidate.strip().removeprefix("W/") for candidate in if_none_match.split(",")}
    return "*" in tags or tag.removeprefix("W/") in tags

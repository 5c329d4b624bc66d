"""Rates served: the store (the one writer), the cache, lookup, quoting and the wire format."""

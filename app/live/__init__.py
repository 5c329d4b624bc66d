"""Rates in motion: publishing, the Redis fan-out backend, the WebSocket hub, frames and the server protocol.

It imports from `app.rates` (rates served), never the other way round.
"""

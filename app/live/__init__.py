"""Rates in motion: the poller and its schedule, publishing, the Redis fan-out backend and the WebSocket hub.

It imports from `app.rates` (rates at rest), never the other way round.
"""

"""Rates coming in: the poller and its schedule (one poller across replicas). `python -m app.poller` runs it."""

"""Rates at rest and in motion: models, repository, cache, store, poller and fan-out."""

"""Rates at rest: models, repository (SQL only), cache, the store (the one writer), lookup and wire format."""

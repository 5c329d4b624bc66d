"""Rates at rest in the database: engine, health, models, repository (SQL only) and the batch writers."""

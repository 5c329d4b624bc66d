"""What every floor uses: background tasks, logging and metrics."""

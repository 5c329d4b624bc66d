"""Every limit on what one client can cause: moving windows, the per-client REST limit, WebSocket admission and
the on-demand budget (docs/limits.md)."""

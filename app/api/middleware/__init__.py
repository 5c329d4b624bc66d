"""ASGI middleware: request metrics, security headers and the answer cache."""

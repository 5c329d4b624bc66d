"""`--ws app.ws_protocol:WebSocketProtocol`: the name operators type (Dockerfile, deploy/, docs/deployment.md).

The protocol itself lives in `app.live.protocol`.
"""

from app.live.protocol import WebSocketProtocol

__all__ = ["WebSocketProtocol"]

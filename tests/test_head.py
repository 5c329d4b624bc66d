"""HEAD answers wherever GET does (RFC 9110 §9.3.2), on a real uvicorn: same status and headers, no body.

Every other method keeps the 405 envelope, and the OpenAPI document lists only GETs outside `/api/admin`.
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

PATHS = [
    "/",
    "/static/board.js",
    "/static/board.css",
    "/api/rates?source_currency=USD&destination_currency=NGN",
    "/api/rates/?source_currency=USD&destination_currency=NGN&amount=50",
    "/api/rates/all?base_currency=GBP",
    "/api/rates/all/",
    "/api/rates/history?source_currency=USD&destination_currency=NGN",
    "/api/rates/history/?source_currency=USD&destination_currency=NGN",
    "/healthz",
    "/healthz/",
    "/readyz",
    "/metrics",
    "/static/history.js",
    "/static/favicon.svg",
    "/openapi.json",
    "/docs",
    "/redoc",
    "/asyncapi.json",
    "/docs/websocket",
    # An error answers HEAD just as it answers GET: same status, no body.
    "/api/rates?source_currency=USD&destination_currency=USD",
    "/no/such/page",
]
# Differ between any two answers: times, sizes, the rate limit's count, and each request's own id.
VARYING = {
    "date",
    "content-length",
    "etag",
    "cache-control",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-request-id",
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    with FakeFlutterwave() as fake, replica_on_sqlite(Path(tmp_path_factory.mktemp("head")), fake) as replica:
        yield replica


@pytest.mark.parametrize("path", PATHS)
def test_head_answers_like_get_without_a_body(service: Replica, path: str) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        get = client.get(path)
        head = client.head(path)
    assert head.status_code == get.status_code
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    same = {name for name in get.headers if name not in VARYING}
    assert {name: head.headers.get(name) for name in same} == {name: get.headers[name] for name in same}
    if "content-length" in head.headers and path.startswith(("/static", "/healthz")):
        # Fixed bytes: HEAD announces exactly the length GET sends.
        assert int(head.headers["content-length"]) == len(get.content)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/", "/api/rates", "/api/rates/all/", "/healthz"])
def test_other_methods_keep_the_405_envelope(service: Replica, method: str, path: str) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        answer = client.request(method, path)
    assert answer.status_code == 405
    if path.startswith("/api"):
        assert answer.json() == {
            "status": "error",
            "message": "Method not allowed; this API answers GET.",
            "data": None,
        }


def test_every_documented_get_answers_head_and_only_admin_paths_take_other_methods(service: Replica) -> None:
    """A GET route added later without HEAD fails here, before a user's uptime check finds it."""
    with httpx.Client(base_url=service.url, timeout=10) as client:
        paths = client.get("/openapi.json").json()["paths"]
        public = [item for path, item in paths.items() if not path.startswith("/api/admin/")]
        assert {method for item in public for method in item} == {"get"}
        refused = [path for path, item in paths.items() if "get" in item and client.head(path).status_code == 405]
    assert refused == []

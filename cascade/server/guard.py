"""ASGI middleware in front of every route: the API key and the request-body limit, both answered with the
same JSON error shape as the routes (errors.ApiError)."""
from __future__ import annotations

import base64
import hmac
import ipaddress
import json

from .errors import ApiError

# The page's own files hold no data and start no work; a browser cannot send a header when it opens a URL,
# so they are served without the key and the page sends it with every API call.
PUBLIC = ("/", "/static/", "/favicon.ico")


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def reply(send, error: ApiError, headers=()) -> None:
    body = json.dumps(error.body()).encode()
    fixed = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": [*fixed, *headers]})
    await send({"type": "http.response.body", "body": body})


def presented_key(headers: dict) -> str | None:
    """`Authorization: Bearer KEY`, or HTTP Basic with KEY as the password (what AUTOMATIC1111 clients such as
    Open WebUI and SillyTavern send when given "user:KEY")."""
    scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip()).decode().partition(":")[2]
        except ValueError:
            return None
    return None


class Guard:
    """401 without the key (when there is one), 413 for a body over `limit` bytes, whether it says its length
    up front or streams it."""

    def __init__(self, app, api_key: str | None, limit: int):
        self.app, self.key, self.limit = app, api_key, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        public = path == "/" or path.startswith(PUBLIC[1:])
        if self.key and not public:
            given = presented_key(headers)
            if given is None or not hmac.compare_digest(given.encode(), self.key.encode()):
                return await reply(send, ApiError(401, "Authorization", "expected the header "
                                                  "'Authorization: Bearer KEY' with the server's API key"),
                                   [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await reply(send, self.too_large())
        return await self.app(scope, self.counted(receive), send)

    def too_large(self) -> ApiError:
        return ApiError(413, "body", f"the request body is over {self.limit >> 20} MiB")

    def counted(self, receive):
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self.too_large()
            return message

        return wrapped

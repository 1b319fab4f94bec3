"""The one error a request can get back: a status, the field at fault and what was expected."""
from __future__ import annotations


class ApiError(Exception):
    """A request the server will not run; `field` names the part of the request at fault (None: the whole)."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        """Both shapes clients read: OpenAI's `error` object and FastAPI's (and AUTOMATIC1111's) `detail`."""
        kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
                500: "server_error"}.get(self.status, "invalid_request_error")
        error = {"message": str(self), "type": kind, "param": self.field, "field": self.field}
        return {"error": error, "detail": str(self)}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, field, message)

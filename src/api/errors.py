"""The API's errors: :class:`APIError` and the OpenAI-shaped JSON error body.

Every error is ``{"error": {"message", "type", "param", "code"}}``. Routes raise
:class:`APIError`; the application (:mod:`src.api.app`) turns it into the response.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered as ``status`` with the JSON error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def error_body(status: int, message: str, type: str, param: str | None = None) -> dict[str, Any]:
    """The JSON error body for ``status``."""
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def error_response(status: int, message: str, type: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The JSON error response for ``status``."""
    return JSONResponse(error_body(status, message, type, param), status_code=status, headers=headers)

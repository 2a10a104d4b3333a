"""The error a moderated request is answered with."""

from __future__ import annotations


class RequestRefused(Exception):
    """
    The proxy refuses the request before (or instead of) sending it upstream.

    The relay answers with an OpenAI-style error body:
    C{{"error": {"message": message, "type": type, "code": code}}} and the
    given HTTP C{status}.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type

    def __repr__(self) -> str:
        return f"RequestRefused({self.status}, {self.message!r}, {self.code!r})"

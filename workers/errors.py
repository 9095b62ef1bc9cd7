"""The one exception a job raises for a client-caused failure, in OpenAI's error shape."""

from __future__ import annotations


class JobError(Exception):
    """A failure the client caused; the task layer answers it with `status` and this body.

    Anything else a job raises is the server's fault and becomes a 500.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        """The `error` object of an OpenAI error response."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def __repr__(self) -> str:
        return (
            f"JobError({self.status}, {self.message!r}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )

"""One error vocabulary for API, tasks and workers: OpenAI's error object and its standard outcomes.

A failure anywhere (a request the API refuses, a job a worker cannot run, a job the task layer
gives up on) is one `OpenAIError` carrying the HTTP status and the `{message, type, param, code}`
a client sees. It lives here, in the lowest layer, because api, tasks and workers all import
`schemas` and workers may import nothing above them. The builders below name the outcomes that
several places report, so the same outcome always reads the same on the wire.

A job's event log carries an error as its `payload()`, `{"status", "error"}`; `from_payload`
reads it back (the shape stays as it is so queued and running jobs keep working across upgrades).
"""

from __future__ import annotations

from typing import Any

# The `type` OpenAI uses for each status we answer with.
TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    417: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def type_for(status: int) -> str:
    return TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


class OpenAIError(Exception):
    """A failure with the status to answer it with and the error object a client sees.

    `type` defaults to the one OpenAI uses for `status`; `headers` go on an HTTP answer only.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or type_for(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        """The `error` object of an OpenAI error response."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict:
        """An OpenAI error response body: `{"error": {...}}`."""
        return {"error": self.to_dict()}

    def payload(self) -> dict:
        """The error as a job's event log and job record carry it: `{"status", "error"}`."""
        return {"status": self.status, "error": self.to_dict()}

    @classmethod
    def from_payload(cls, payload: dict, *, headers: dict | None = None) -> OpenAIError:
        """The error a `payload()` (read back from a job's event log) describes."""
        error = payload.get("error") or {}
        status = payload.get("status", 500)
        return cls(status, error.get("message") or "", type=error.get("type") or type_for(status),
                   param=error.get("param"), code=error.get("code"), headers=headers)

    def with_headers(self, headers: dict) -> OpenAIError:
        """A copy of this error with more HTTP headers to answer it with."""
        return OpenAIError(self.status, self.message, type=self.type, param=self.param, code=self.code,
                           headers={**self.headers, **headers})

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, OpenAIError):
            return NotImplemented
        return (self.status, self.to_dict(), self.headers) == (other.status, other.to_dict(), other.headers)

    __hash__ = Exception.__hash__

    def __reduce__(self):  # pickled as what it is (billiard carries exceptions between processes)
        return _restore, (type(self), self.__dict__)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.status}, {self.message!r}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )


def _restore(cls: type[OpenAIError], state: dict) -> OpenAIError:
    error = cls.__new__(cls)
    Exception.__init__(error, state["message"])
    error.__dict__.update(state)
    return error


# --- the standard outcomes ----------------------------------------------------------------------
# `subject` is what the client sent, in its own words: "job" for a job, "request" for a batch line.


class Invalid(OpenAIError):
    """A request value that failed validation (400): `param` is its path, as OpenAI writes it."""

    def __init__(self, param: str | None, message: str, code: str | None = "invalid_value"):
        super().__init__(400, message, param=param, code=code)


def invalid(param: str | None, message: str, code: str | None = "invalid_value") -> Invalid:
    """A request value the client must change (400)."""
    return Invalid(param, message, code)


def unsupported_parameter(param: str | None, message: str) -> OpenAIError:
    """A request the model cannot honour as asked (400)."""
    return OpenAIError(400, message, param=param, code="unsupported_parameter")


def context_length_exceeded(param: str | None, message: str) -> OpenAIError:
    """Input longer than the model can read (400)."""
    return OpenAIError(400, message, param=param, code="context_length_exceeded")


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


def worker_lost(stops: int, subject: str = "job") -> OpenAIError:
    """Given up after stopping its worker `stops` times (a crash, an out-of-memory kill)."""
    return OpenAIError(500, f"The {subject} stopped its worker {stops} times and was given up.", code="worker_lost")


def job_timeout(subject: str = "job") -> OpenAIError:
    """Ran past its time limit on the worker."""
    return OpenAIError(504, f"The {subject} ran longer than its timeout.", code="job_timeout")


def queue_timeout() -> OpenAIError:
    """Its deadline passed while it waited in the queue."""
    return OpenAIError(504, "The job timed out while waiting in the queue.", code="job_timeout")


def deadline_passed() -> OpenAIError:
    """The client's wait for the job's end outlasted the job's timeout."""
    return OpenAIError(504, "The job did not finish within its timeout.", code="job_timeout")


def cancelled() -> OpenAIError:
    """A non-streaming caller's job was cancelled (by another client) before its result."""
    return OpenAIError(409, "The job was cancelled before it finished.", code="job_cancelled")


def expired() -> OpenAIError:
    """A batch line not run before the batch's completion window closed."""
    return OpenAIError(400, "This request could not be executed before the completion window expired.",
                       code="batch_expired")


def upload_expired(reason: str) -> OpenAIError:
    """An upload the job refers to is gone from the blob store before the job ran."""
    return OpenAIError(400, f"{reason}; send the request again.", code="upload_expired")


def server_error(subject: str = "job") -> OpenAIError:
    """A worker's own fault; the message names no internals."""
    return OpenAIError(500, f"The worker had an error while running the {subject}.", type="server_error")


def internal_error() -> OpenAIError:
    """The API's own fault while answering a request; the message names no internals."""
    return OpenAIError(500, "The server had an error while processing your request.", type="server_error")


def output_lost() -> OpenAIError:
    return OpenAIError(500, "The worker could not publish the job's output; send the request again.",
                       code="output_lost")


def no_result() -> OpenAIError:
    return OpenAIError(500, "The worker finished the job without a result.", code="no_result")


def request_too_deep() -> OpenAIError:
    """A message too deeply nested to be handed to a worker process."""
    return OpenAIError(400, "The request is nested too deeply to be processed; send it again with less nesting.",
                       code="request_too_deep")


def job_undeliverable() -> OpenAIError:
    return OpenAIError(500, "The service could not hand this job to a worker; it was set aside for the operator.",
                       code="job_undeliverable")


def queue_unavailable(message: str = "The job queue is unavailable; retry later.") -> OpenAIError:
    return OpenAIError(503, message, code="queue_unavailable")


def events_lost(job_id: str) -> OpenAIError:
    """A Redis failover took back events of this job that the client had not read yet."""
    return OpenAIError(
        500, f"Part of job '{job_id}''s output stream was lost in a failover of the job queue's Redis; the job "
             f"itself goes on. Read its result with GET /v1/jobs/{job_id}.", code="events_lost")


def queue_lost(job_id: str) -> OpenAIError:
    """Redis stopped answering while the API followed a job; the job itself may still finish."""
    return queue_unavailable(
        f"The job queue stopped answering while following job '{job_id}'; the job may still finish. "
        f"Follow it with GET /v1/jobs/{job_id}/events (Last-Event-ID: the last event id you got).")

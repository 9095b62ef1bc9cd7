"""The one error vocabulary (`schemas.openai_errors`): its shape, its builders, and validation codes as data.

Pure logic, no service: the wire shapes pinned here are the ones clients saw before the
vocabulary existed (the integration tests check them end to end).
"""

from __future__ import annotations

import copy
import pickle

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from marshmallow import ValidationError

from schemas import openai_errors as errors
from schemas import runtime
from schemas.errors import first_error, unknown_field_paths
from schemas.openai_errors import Invalid, OpenAIError
from schemas.requests import validate

# builder -> (status, type, code, message) as the wire carried them before
STANDARD = [
    (lambda: errors.worker_lost(3), 500, "server_error", "worker_lost",
     "The job stopped its worker 3 times and was given up."),
    (lambda: errors.worker_lost(2, "request"), 500, "server_error", "worker_lost",
     "The request stopped its worker 2 times and was given up."),
    (errors.job_timeout, 504, "timeout_error", "job_timeout", "The job ran longer than its timeout."),
    (lambda: errors.job_timeout("request"), 504, "timeout_error", "job_timeout",
     "The request ran longer than its timeout."),
    (errors.queue_timeout, 504, "timeout_error", "job_timeout", "The job timed out while waiting in the queue."),
    (errors.deadline_passed, 504, "timeout_error", "job_timeout", "The job did not finish within its timeout."),
    (errors.cancelled, 409, "invalid_request_error", "job_cancelled", "The job was cancelled before it finished."),
    (errors.expired, 400, "invalid_request_error", "batch_expired",
     "This request could not be executed before the completion window expired."),
    (lambda: errors.upload_expired("The upload 'file' has expired"), 400, "invalid_request_error", "upload_expired",
     "The upload 'file' has expired; send the request again."),
    (errors.server_error, 500, "server_error", None, "The worker had an error while running the job."),
    (lambda: errors.server_error("request"), 500, "server_error", None,
     "The worker had an error while running the request."),
    (errors.output_lost, 500, "server_error", "output_lost",
     "The worker could not publish the job's output; send the request again."),
    (errors.no_result, 500, "server_error", "no_result", "The worker finished the job without a result."),
    (errors.request_too_deep, 400, "invalid_request_error", "request_too_deep",
     "The request is nested too deeply to be processed; send it again with less nesting."),
    (errors.job_undeliverable, 500, "server_error", "job_undeliverable",
     "The service could not hand this job to a worker; it was set aside for the operator."),
    (errors.internal_error, 500, "server_error", None, "The server had an error while processing your request."),
    (errors.queue_unavailable, 503, "service_unavailable_error", "queue_unavailable",
     "The job queue is unavailable; retry later."),
]


@pytest.mark.parametrize(("build", "status", "type_", "code", "message"), STANDARD)
def test_standard_outcomes_keep_their_wire_shape(build, status, type_, code, message):
    error = build()
    assert isinstance(error, OpenAIError)
    assert error.status == status
    assert error.body() == {"error": {"message": message, "type": type_, "param": None, "code": code}}


def test_parameter_builders_name_the_parameter():
    assert errors.unsupported_parameter("n", "one image").body()["error"] == {
        "message": "one image", "type": "invalid_request_error", "param": "n", "code": "unsupported_parameter"}
    assert errors.model_not_found("m").payload() == {"status": 404, "error": {
        "message": "The model 'm' does not exist", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}}
    too_long = errors.context_length_exceeded("input", "too long")
    assert (too_long.status, too_long.param, too_long.code) == (400, "input", "context_length_exceeded")
    bad = errors.invalid("messages[0].role", "no such role", "invalid_value")
    assert isinstance(bad, Invalid) and (bad.status, bad.param, bad.code) == (400, "messages[0].role", "invalid_value")


def test_queue_lost_names_the_job():
    error = errors.queue_lost("job_1")
    assert (error.status, error.type, error.code) == (503, "service_unavailable_error", "queue_unavailable")
    assert "job_1" in error.message and "/v1/jobs/job_1/events" in error.message


def test_type_follows_the_status_unless_given():
    assert OpenAIError(429, "slow down").type == "rate_limit_error"
    assert OpenAIError(502, "upstream").type == "server_error"
    assert OpenAIError(418, "teapot").type == "invalid_request_error"
    assert OpenAIError(500, "x", type="timeout_error").type == "timeout_error"


def test_payload_is_the_event_log_shape_and_reads_back():
    error = OpenAIError(400, "bad", param="model", code="invalid_value")
    payload = error.payload()
    assert payload == {"status": 400, "error": {"message": "bad", "type": "invalid_request_error",
                                                "param": "model", "code": "invalid_value"}}
    back = OpenAIError.from_payload(payload, headers={"x-localq-job-id": "job_1"})
    assert back.payload() == payload and back.headers == {"x-localq-job-id": "job_1"}
    # a record written by an older worker: no param or code keys
    old = OpenAIError.from_payload({"status": 504, "error": {"message": "late", "type": "timeout_error"}})
    assert (old.status, old.type, old.param, old.code) == (504, "timeout_error", None, None)


def test_with_headers_copies():
    plain = errors.cancelled()
    headed = plain.with_headers({"Retry-After": "5"})
    assert headed.headers == {"Retry-After": "5"} and plain.headers == {}
    assert headed.to_dict() == plain.to_dict() and headed.status == plain.status


def test_every_layer_raises_the_same_type():
    from api.errors import APIError
    from workers.errors import JobError

    assert APIError is OpenAIError and JobError is OpenAIError
    job_error = JobError(404, "gone", param="model", code="model_not_found")
    assert job_error.type == "invalid_request_error" and str(job_error) == "gone"


@pytest.mark.parametrize("error", [errors.worker_lost(1), Invalid("model", "bad", "invalid_type"),
                                   errors.cancelled().with_headers({"a": "b"})])
def test_errors_survive_pickling(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and back == error and str(back) == str(error)


# --- the task layer's outcomes, built from the vocabulary -------------------------------------------


def test_handoff_tells_the_client_with_the_builders():
    from tasks.handoff import client_error

    assert client_error(RecursionError()) == errors.request_too_deep().payload()
    assert client_error(OSError("pipe closed")) == errors.job_undeliverable().payload()


def test_a_batch_line_failure_carries_the_error_object():
    from tasks.batch_run import _expired, _line_failure

    def body(err):
        outcome = _line_failure("batch_1", 0, "c0", "batch_1-0", err)
        return outcome["response"]["status_code"], outcome["response"]["body"]

    assert body(errors.unsupported_parameter("n", "one")) == (400, errors.unsupported_parameter("n", "one").body())
    assert body(SoftTimeLimitExceeded()) == (504, errors.job_timeout("request").body())
    assert body(RuntimeError("internal detail")) == (500, errors.server_error("request").body())
    assert _expired("c0")["error"] == {"code": "batch_expired", "message": errors.expired().message}


# --- validation: the code is data, not read from the wording ----------------------------------------


def test_a_message_keeps_its_code_through_format_copy_and_pickle():
    message = runtime.Message("Invalid value for $param: {input!r}.", runtime.INVALID_VALUE)
    formatted = message.format(input=3)
    assert formatted == "Invalid value for $param: 3." and formatted.code == "invalid_value"
    for twin in (copy.deepcopy(message), pickle.loads(pickle.dumps(message))):
        assert twin == message and twin.code == message.code


def test_first_error_reads_the_code_from_the_message_not_its_wording():
    # worded like a missing parameter, but carrying another code: the code wins
    error = first_error({"model": [runtime.Message("Missing required parameter: $param.", runtime.INVALID_TYPE)]})
    assert (error.param, error.code, error.message) == ("model", "invalid_type", "Missing required parameter: 'model'.")
    # a message without a code (marshmallow's own) is about the value, whatever it says
    assert first_error({"n": ["Invalid type, unrecognised"]}).code == "invalid_value"
    assert not hasattr(__import__("schemas.errors").errors, "code_for")


def test_unknown_fields_are_found_by_their_code():
    messages = {"a": [runtime.Message("Unrecognized request argument supplied: $param", runtime.UNKNOWN)],
                "b": ["Unrecognized request argument supplied: $param"]}
    assert unknown_field_paths(messages) == [("a",)]


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model", "missing_required_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "colour": 1}, "colour", "unknown_parameter"),
    ({"model": 3, "messages": [{"role": "user", "content": "hi"}]}, "model", "invalid_type"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature", "invalid_value"),
    ({"model": "m", "messages": [{"role": "nobody", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": None}, None, None),
])
def test_the_generated_schemas_give_each_error_its_code(body, param, code):
    if code is None:
        validate("CreateChatCompletionRequest", body)
        return
    with pytest.raises(Invalid) as raised:
        validate("CreateChatCompletionRequest", body)
    assert (raised.value.param, raised.value.code, raised.value.status) == (param, code, 400)


def test_marshmallow_errors_keep_message_objects():
    with pytest.raises(ValidationError) as raised:
        runtime.Int(required=True).deserialize("3")
    assert raised.value.messages[0].code == "invalid_type"

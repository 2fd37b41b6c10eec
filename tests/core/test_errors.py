"""The one parser of a backend's error body (core.errors.error_message_from), shared by the router and the checks."""

from __future__ import annotations

import pytest

from core.errors import ERROR_MESSAGE_MAX, error_message_from, strip_addresses


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error":{"message":"boom","type":"X","code":500}}', "boom"),  # vLLM / OpenAI
        (b'{"object":"error","message":"bad model","type":"NotFoundError","code":404}', "bad model"),  # older vLLM
        (b'{"detail":"Not Found"}', "Not Found"),  # FastAPI
        (b'{"error":"overloaded"}', "overloaded"),
        ('{"error":{"message":"as text"}}', "as text"),  # a str (an SSE data line) as well as bytes
        (b"Internal Server Error\n", "Internal Server Error"),
        (b"upstream 10.0.0.7:8000 refused (http://gpu-3.internal:8000/v1)", "upstream <address> refused (<address>"),
    ],
)
def test_the_message_of_each_error_body_shape(body: bytes | str, message: str) -> None:
    assert error_message_from(body, 500) == message


def test_an_empty_body_names_the_status_when_known() -> None:
    assert error_message_from(b"", 503) == "HTTP 503 with an empty body"
    assert error_message_from(b"  ") == ""  # the checks fall back to the reason phrase


def test_messages_and_text_bodies_are_bounded() -> None:
    assert len(error_message_from(b'{"error":{"message":"' + b"x" * 50_000 + b'"}}', 400)) == ERROR_MESSAGE_MAX
    assert len(error_message_from(b"y" * 50_000, 500)) <= ERROR_MESSAGE_MAX


def test_router_and_checks_use_the_same_parser() -> None:
    from backends.checks import runner
    from routing import errors

    assert errors.error_message_from is error_message_from
    assert runner.error_message_from is error_message_from
    assert errors.strip_addresses is strip_addresses
    assert not hasattr(runner, "error_message_from_body")

"""The Batch API's HTTP contract in-process (DRF test client): validation naming the line, ownership, errors."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from batches.models import Batch, BatchLine
from batches.services import batch_storage
from governance.services import api_key_create
from tests.batches.conftest import chat_line, jsonl
from tests.conftest import MASTER_KEY

pytestmark = pytest.mark.django_db


def _client(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture
def owner(batch_files_dir: Any) -> APIClient:
    return _client(api_key_create(name="owner")[1])


@pytest.fixture
def stranger(batch_files_dir: Any) -> APIClient:
    return _client(api_key_create(name="stranger")[1])


def upload(client: APIClient, content: bytes, purpose: str = "batch") -> Any:
    return client.post(
        "/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": purpose}, format="multipart"
    )


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        (jsonl([chat_line("a")]) + b"{not json\n", 2, "not valid JSON"),
        (jsonl([chat_line("a"), {**chat_line("b"), "custom_id": None}]), 2, "custom_id"),
        (jsonl([chat_line("a"), chat_line("b"), chat_line("a")]), 3, "earlier line"),
        (jsonl([{**chat_line("a"), "method": "GET"}]), 1, "method"),
        (jsonl([{**chat_line("a"), "url": "/v1/models"}]), 1, "url"),
        (jsonl([chat_line("a"), {**chat_line("b"), "url": "/v1/embeddings"}]), 2, "differs"),
        (jsonl([chat_line("a"), {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}]), 2, "body"),
        (jsonl([chat_line("a", stream=True)]), 1, "stream"),
        (b"\n" + jsonl([chat_line("a")]) + b"[1, 2]\n", 3, "JSON object"),
    ],
)
def test_upload_rejects_a_bad_line_naming_it(owner: APIClient, content: bytes, line: int, fragment: str) -> None:
    # when a file with one bad line is uploaded
    response = upload(owner, content)
    # then 400 names that line and the problem, and nothing is stored
    assert response.status_code == 400
    error = _error(response)
    assert error["message"].startswith(f"Line {line}: ") and fragment in error["message"], error
    assert (error["param"], error["code"]) == ("file", "invalid_jsonl")
    assert owner.get("/v1/files").json()["data"] == []


def test_upload_limits_size_lines_purpose_and_emptiness(owner: APIClient, settings: Any) -> None:
    settings.BATCH_MAX_LINES = 2
    assert _error(upload(owner, jsonl([chat_line(str(i)) for i in range(3)])))["code"] == "too_many_lines"
    assert _error(upload(owner, b"\n\n"))["code"] == "empty_file"
    assert _error(upload(owner, jsonl([chat_line("a")]), purpose="fine-tune"))["param"] == "purpose"
    missing = owner.post("/v1/files", {"purpose": "batch"}, format="multipart")
    assert missing.status_code == 400 and _error(missing)["param"] == "file"
    settings.BATCH_MAX_FILE_BYTES = 100
    too_big = upload(owner, jsonl([chat_line("a")]))
    assert too_big.status_code == 413 and _error(too_big)["code"] == "file_too_large"


def test_keys_are_required_and_checked(batch_files_dir: Any) -> None:
    anonymous = APIClient().get("/v1/files")
    assert anonymous.status_code == 401 and _error(anonymous)["type"] == "authentication_error"
    wrong = _client("sk-llm-wrong").get("/v1/batches")
    assert wrong.status_code == 401 and _error(wrong)["message"] == "Invalid API key."


def test_files_belong_to_the_key_that_uploaded_them(
    owner: APIClient, stranger: APIClient, django_capture_on_commit_callbacks: Any
) -> None:
    # given a file uploaded by one key
    content = jsonl([chat_line("a"), chat_line("b")])
    file = upload(owner, content).json()
    assert (file["object"], file["purpose"], file["bytes"], file["status"]) == (
        "file",
        "batch",
        len(content),
        "processed",
    )
    # then its owner retrieves, reads and lists it
    assert owner.get(f"/v1/files/{file['id']}").json()["id"] == file["id"]
    assert owner.get(f"/v1/files/{file['id']}/content").content == content
    assert [f["id"] for f in owner.get("/v1/files").json()["data"]] == [file["id"]]
    # and another key gets 404 everywhere, as if it did not exist; the master key does not see it either
    for method, url in [("get", ""), ("get", "/content"), ("delete", "")]:
        response = getattr(stranger, method)(f"/v1/files/{file['id']}{url}")
        assert response.status_code == 404 and _error(response)["code"] == "file_not_found"
    assert stranger.get("/v1/files").json()["data"] == []
    assert _client(MASTER_KEY).get(f"/v1/files/{file['id']}").status_code == 404
    created = stranger.post(
        "/v1/batches",
        {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        format="json",
    )
    assert created.status_code == 404
    # and deleting removes the row and the stored content
    assert len(batch_storage().listdir("batches")[1]) == 1
    with django_capture_on_commit_callbacks(execute=True):
        deleted = owner.delete(f"/v1/files/{file['id']}").json()
    assert deleted == {"id": file["id"], "object": "file", "deleted": True}
    assert owner.get(f"/v1/files/{file['id']}").status_code == 404
    assert batch_storage().listdir("batches")[1] == []


def test_batch_create_validates_and_expands_lines(owner: APIClient, stranger: APIClient) -> None:
    file = upload(owner, jsonl([chat_line("a"), chat_line("b")])).json()

    def create(**fields: Any) -> Any:
        body = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
        return owner.post("/v1/batches", body, format="json")

    assert _error(create(completion_window="1h"))["param"] == "completion_window"
    assert _error(create(endpoint="/v1/embeddings"))["param"] == "endpoint"
    assert _error(create(endpoint="/v1/models"))["param"] == "endpoint"
    assert _error(create(metadata={str(i): "v" for i in range(17)}))["param"] == "metadata"
    assert _error(create(input_file_id=None))["param"] == "input_file_id"
    assert create(input_file_id="file-nope").status_code == 404
    # when valid: in_progress with its lines, OpenAI's batch object
    batch = create(metadata={"team": "a"}).json()
    assert (batch["object"], batch["status"], batch["request_counts"]) == (
        "batch",
        "in_progress",
        {"total": 2, "completed": 0, "failed": 0},
    )
    assert batch["metadata"] == {"team": "a"} and batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert list(BatchLine.objects.filter(batch_id=batch["id"]).values_list("index", "custom_id")) == [
        (1, "a"),
        (2, "b"),
    ]
    # and its input file cannot be deleted while it is used
    assert owner.delete(f"/v1/files/{file['id']}").status_code == 409
    # and only its key sees or cancels it
    assert stranger.get(f"/v1/batches/{batch['id']}").status_code == 404
    assert stranger.post(f"/v1/batches/{batch['id']}/cancel").status_code == 404
    assert stranger.get("/v1/batches").json()["data"] == []
    cancelled = owner.post(f"/v1/batches/{batch['id']}/cancel").json()
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"] is not None
    assert owner.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] == "cancelling"


def test_batch_list_pages_newest_first(owner: APIClient) -> None:
    file = upload(owner, jsonl([chat_line("a")])).json()
    body = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    ids = [owner.post("/v1/batches", body, format="json").json()["id"] for _ in range(3)]
    Batch.objects.filter(pk=ids[0]).update(created_at="2026-01-01T00:00:00Z")
    Batch.objects.filter(pk=ids[1]).update(created_at="2026-01-02T00:00:00Z")
    Batch.objects.filter(pk=ids[2]).update(created_at="2026-01-03T00:00:00Z")
    first = owner.get("/v1/batches", {"limit": 2}).json()
    assert [b["id"] for b in first["data"]] == [ids[2], ids[1]] and first["has_more"] is True
    rest = owner.get("/v1/batches", {"limit": 2, "after": first["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert _error(owner.get("/v1/batches", {"limit": 0}))["param"] == "limit"
    wrong_method = owner.put("/v1/batches")
    assert wrong_method.status_code == 405 and _error(wrong_method)["code"] == "method_not_allowed"

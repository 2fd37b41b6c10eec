"""The Batch API on /v1/files and /v1/batches, in OpenAI's shapes (the official SDK works unchanged).

A key sees only its own files and batches (another key's id answers 404, as if it did not exist); the master key
sees those it created. Every error is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from batches import selectors, services
from batches.auth import BearerKeyAuthentication, HasKey
from batches.models import Batch, BatchFile
from core.errors import APIError
from governance.auth import Principal

logger = logging.getLogger(__name__)

TAG = "Batch API (/v1/files, /v1/batches)"
FILE_ID = OpenApiParameter("file_id", str, OpenApiParameter.PATH)
BATCH_ID = OpenApiParameter("batch_id", str, OpenApiParameter.PATH)
UPLOAD = inline_serializer(
    "BatchFileUpload",
    {"file": serializers.FileField(), "purpose": serializers.ChoiceField(choices=["batch"])},
)
BATCH_CREATE = inline_serializer(
    "BatchCreate",
    {
        "input_file_id": serializers.CharField(),
        "endpoint": serializers.ChoiceField(choices=["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
        "completion_window": serializers.ChoiceField(choices=["24h"]),
        "metadata": serializers.DictField(child=serializers.CharField(), required=False),
    },
)


def _doc(summary: str, **kwargs: Any) -> Any:
    kwargs.setdefault("responses", {200: OpenApiTypes.OBJECT})
    kwargs.setdefault("request", None)
    return extend_schema(summary=summary, tags=[TAG], **kwargs)


def _epoch(moment: Any) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def file_object(file: BatchFile) -> dict[str, Any]:
    """OpenAI's file object."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": _epoch(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def batch_object(batch: Batch) -> dict[str, Any]:
    """OpenAI's batch object (plus `usage`: the tokens its lines used)."""
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": _epoch(batch.created_at),
        "in_progress_at": _epoch(batch.in_progress_at),
        "expires_at": _epoch(batch.expires_at),
        "finalizing_at": _epoch(batch.finalizing_at),
        "completed_at": _epoch(batch.completed_at),
        "failed_at": _epoch(batch.failed_at),
        "expired_at": _epoch(batch.expired_at),
        "cancelling_at": _epoch(batch.cancelling_at),
        "cancelled_at": _epoch(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata,
        "usage": {
            "input_tokens": batch.prompt_tokens,
            "output_tokens": batch.completion_tokens,
            "total_tokens": batch.prompt_tokens + batch.completion_tokens,
        },
    }


def _error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = Response(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status=status, headers=headers
    )
    return response


class OpenAIView(APIView):
    """Bearer keys, and every error in OpenAI's shape."""

    authentication_classes = [BearerKeyAuthentication]
    permission_classes = [HasKey]
    parser_classes = [JSONParser]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> tuple[Any, str]:
        """JSON whatever `Accept` says (the SDK asks `application/binary` for file content)."""
        renderer = self.get_renderers()[0]
        return renderer, renderer.media_type

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, APIError):
            return _error(
                exc.status,
                exc.message,
                type_=exc.type,
                code=None if exc.code is None else str(exc.code),
                param=exc.param,
            )
        if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
            message = (
                "Missing API key: send 'Authorization: Bearer <key>'."
                if isinstance(exc, exceptions.NotAuthenticated)
                else str(exc.detail)
            )
            return _error(
                401,
                message,
                type_="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if isinstance(exc, exceptions.MethodNotAllowed):
            return _error(
                405, str(exc.detail), code="method_not_allowed", headers={"Allow": ", ".join(self.allowed_methods)}
            )
        if isinstance(exc, exceptions.APIException):
            return _error(
                exc.status_code,
                str(exc.detail) if not isinstance(exc.detail, dict | list) else "Invalid request.",
                code=exc.default_code,
            )
        logger.exception("internal error on %s", self.request.path if self.request else "?")
        return _error(500, "Internal error.", type_="server_error", code="internal_error")

    @property
    def principal(self) -> Principal:
        return self.request.auth  # type: ignore[return-value]


class _LimitedUpload(TemporaryFileUploadHandler):
    """Spools the upload to a temporary file and stops reading past the size limit."""

    def __init__(self, request: Any, limit: int) -> None:
        super().__init__(request)
        self.limit = limit
        self.seen = 0
        self.exceeded = False

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        self.seen += len(raw_data)
        if self.seen > self.limit:
            self.exceeded = True
            raise StopUpload(connection_reset=True)
        return super().receive_data_chunk(raw_data, start)


def _too_large() -> APIError:
    limit = settings.BATCH_MAX_FILE_BYTES
    return APIError(413, f"The file is larger than {limit} bytes.", param="file", code="file_too_large")


class FilesView(OpenAIView):
    parser_classes = [MultiPartParser, FormParser]

    @_doc("List the key's files", operation_id="files_list", parameters=[OpenApiParameter("purpose", str)])
    def get(self, request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        files = selectors.file_list_for(principal=self.principal, purpose=purpose, limit=_limit(request, 10_000))
        return Response({"object": "list", "data": [file_object(f) for f in files], "has_more": False})

    @_doc(
        "Upload a batch file (JSONL, validated line by line)",
        operation_id="files_create",
        request={"multipart/form-data": UPLOAD},
    )
    def post(self, request: Request) -> Response:
        limit = settings.BATCH_MAX_FILE_BYTES
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > limit + 64 * 1024:
            raise _too_large()
        handler = _LimitedUpload(request._request, limit)
        request._request.upload_handlers = [handler]
        try:
            upload = request.FILES.get("file")
            purpose = request.POST.get("purpose")
        except exceptions.ParseError as exc:
            raise APIError(400, f"Could not read the upload: {exc.detail}", code="invalid_body") from None
        if handler.exceeded:
            raise _too_large()
        if upload is None:
            raise APIError(400, "Send the file as the multipart field `file`.", param="file", code="missing_file")
        if not purpose:
            raise APIError(400, "`purpose` is required.", param="purpose", code="missing_purpose")
        content = upload.read()
        file = services.file_create(
            principal=self.principal, filename=upload.name or "file.jsonl", purpose=purpose, content=content
        )
        return Response(file_object(file))


def _not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No such {kind}: '{object_id[:100]}'.", code=f"{kind}_not_found")


def _limit(request: Request, maximum: int, default: int | None = None) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default or maximum
    try:
        value = int(raw)
    except ValueError:
        raise APIError(400, "`limit` must be an integer.", param="limit") from None
    if not 1 <= value <= maximum:
        raise APIError(400, f"`limit` must be between 1 and {maximum}.", param="limit")
    return value


class FileView(OpenAIView):
    @_doc("Retrieve a file", operation_id="files_retrieve", parameters=[FILE_ID])
    def get(self, request: Request, file_id: str) -> Response:
        file = selectors.file_get_for(principal=self.principal, file_id=file_id)
        if file is None:
            raise _not_found("file", file_id)
        return Response(file_object(file))

    @_doc("Delete a file", operation_id="files_delete", parameters=[FILE_ID])
    def delete(self, request: Request, file_id: str) -> Response:
        file = selectors.file_get_for(principal=self.principal, file_id=file_id)
        if file is None:
            raise _not_found("file", file_id)
        services.file_delete(file=file)
        return Response({"id": file_id, "object": "file", "deleted": True})


class FileContentView(OpenAIView):
    @_doc("A file's content", operation_id="files_content", parameters=[FILE_ID], responses={200: OpenApiTypes.BINARY})
    def get(self, request: Request, file_id: str) -> HttpResponse:
        file = selectors.file_get_for(principal=self.principal, file_id=file_id)
        if file is None:
            raise _not_found("file", file_id)
        return HttpResponse(services.file_read(file=file), content_type="application/octet-stream")


class BatchesView(OpenAIView):
    @_doc(
        "List the key's batches",
        operation_id="batches_list",
        parameters=[OpenApiParameter("after", str), OpenApiParameter("limit", int)],
    )
    def get(self, request: Request) -> Response:
        limit = _limit(request, 100, default=20)
        batches = selectors.batch_list_for(
            principal=self.principal, after=request.query_params.get("after"), limit=limit + 1
        )
        data = [batch_object(b) for b in batches[:limit]]
        return Response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(batches) > limit,
            }
        )

    @_doc("Create a batch", operation_id="batches_create", request=BATCH_CREATE)
    def post(self, request: Request) -> Response:
        data = request.data
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
        for field in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(data.get(field), str):
                raise APIError(400, f"`{field}` is required (a string).", param=field)
        input_file = selectors.file_get_for(principal=self.principal, file_id=data["input_file_id"])
        if input_file is None:
            raise _not_found("file", data["input_file_id"])
        batch = services.batch_create(
            principal=self.principal,
            input_file=input_file,
            endpoint=data["endpoint"],
            completion_window=data["completion_window"],
            metadata=data.get("metadata"),
        )
        return Response(batch_object(batch))


class BatchView(OpenAIView):
    @_doc("Retrieve a batch", operation_id="batches_retrieve", parameters=[BATCH_ID])
    def get(self, request: Request, batch_id: str) -> Response:
        batch = selectors.batch_get_for(principal=self.principal, batch_id=batch_id)
        if batch is None:
            raise _not_found("batch", batch_id)
        return Response(batch_object(batch))


class BatchCancelView(OpenAIView):
    @_doc("Cancel a batch", operation_id="batches_cancel", parameters=[BATCH_ID])
    def post(self, request: Request, batch_id: str) -> Response:
        batch = selectors.batch_get_for(principal=self.principal, batch_id=batch_id)
        if batch is None:
            raise _not_found("batch", batch_id)
        return Response(batch_object(services.batch_cancel(batch=batch)))

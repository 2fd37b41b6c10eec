"""Usage reporting API (DRF, master key or staff with `governance.view_usagerecord`): GET /api/usage/."""

from __future__ import annotations

from datetime import UTC

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from governance.models import UsageRecord
from governance.serializers import UsageQuerySerializer, UsageReportSerializer
from governance.usage import usage_report, usage_totals


class UsageView(APIView):
    """Usage per hour or day, key and model; filters by key, model and time range."""

    permission_model = UsageRecord  # staff sessions need governance.view_usagerecord (llm_platform/api.py)

    @extend_schema(
        operation_id="usage_report",
        tags=["usage"],
        parameters=[UsageQuerySerializer],
        responses=UsageReportSerializer,
        description=(
            "Requests, errors (status >= 400), prompt and completion tokens and mean latency per period (UTC "
            "hour or day), key and model. Hours already rolled up are read from the hourly rollup; the latest "
            "ones from the raw records, so the answer includes requests up to the last flush (about 1 s ago)."
        ),
    )
    def get(self, request: Request) -> Response:
        """The report for the query's range, filters and grouping."""
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        start, end, group_by = params["from"].astimezone(UTC), params["to"].astimezone(UTC), params["group_by"]
        start = start.replace(minute=0, second=0, microsecond=0)
        if group_by == "day":
            start = start.replace(hour=0)
        rows = usage_report(start=start, end=end, group_by=group_by, key=params.get("key"), model=params.get("model"))
        report = {"from": start, "to": end, "group_by": group_by, "results": rows, "totals": usage_totals(rows)}
        return Response(UsageReportSerializer(report).data)

"""ASGI entry point: Channels' ProtocolTypeRouter with the /v1 gateway in front of Django.

HTTP requests to /v1, /healthz and /readyz are served by `routing.gateway.Gateway` (async, no Django view, no
database query per request); every other HTTP path goes to Django (admin, management API). WebSockets go
through Channels' URL router.
"""

import gc
import os
from typing import cast

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")

# Django must be set up before importing anything that touches models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from core import telemetry  # noqa: E402
from routing.gateway import ASGIApp, Gateway  # noqa: E402
from routing.ws import websocket_application  # noqa: E402

telemetry.configure()  # OpenTelemetry tracing, when the OTEL_* variables ask for it (docs/operations.md)
gateway = Gateway.from_settings(cast(ASGIApp, django_asgi_app))  # Django's handler is an ASGI app

application = ProtocolTypeRouter(
    {
        "http": gateway,
        "lifespan": gateway,
        # No AuthMiddlewareStack: it would look up sessions in the database; the socket authenticates by key.
        "websocket": websocket_application(gateway),
    }
)

# Everything built so far lives as long as the process: keep it out of the garbage collector's generations, so a
# full collection does not walk it (~60 ms in a worker otherwise; see docs/security.md "Client limits").
gc.freeze()

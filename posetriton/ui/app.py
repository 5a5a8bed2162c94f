"""The ASGI app behind ``posetriton ui``: the page, a photo endpoint, a camera WebSocket, all through the SDK.

Routes:

* ``GET /`` the page, ``GET /static/...`` its script and style (package data, no build step);
* ``GET /api/config`` where Triton is, the default model, the upload limit and the request parameters
  (each one's ``describe()``, from posetriton.core.contract: the page builds its controls from them);
* ``GET /api/models`` the pose ensembles the server has ready, with skeleton, keypoint names and
  each one's request-parameter defaults and limits (what the page draws with and sets its controls to);
* ``POST /api/predict?model=&NAME=VALUE...`` (a request parameter per NAME) the body is one image file as it is; the
  answer is the SDK's JSON result (``ImagePoses.to_dict``) plus ``latency_ms``, or
  ``{"error": message}`` with a status that says why (400 refused by the server, 413 too large,
  415 not an image, 404 no such model, 503 Triton unreachable, 504 deadline);
* ``WS /api/camera?model=&NAME=VALUE...&mode=`` binary messages are encoded frames, text
  messages a JSON object of request parameters; each finished frame is answered with a JSON message (see
  :mod:`posetriton.ui.camera`). ``mode=frames`` asks for one request per frame even when the
  model has a tracker; ``keypoints=raw`` asks the tracker for the raw keypoints instead of the
  track-smoothed ones.

Uploads are held in memory only, limited in size before they are read and in type before they are
decoded. Every request must name this app in its Host header and, when it carries an Origin (a
browser's WebSocket or POST always does), there too (:mod:`posetriton.ui.origins`): a page elsewhere,
rebound to 127.0.0.1 or not, can drive neither the photo endpoint nor the camera through the
user's browser. What one app holds is bounded: ``max_cameras`` camera connections (each one tracking
sequence on the server), ``max_uploads`` photos being analysed, ``max_queued_frames`` frames
buffered per connection (docs/reliability.md, "Web page").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from posetriton.client import (
    DEFAULT_MODEL,
    DEFAULT_URL,
    AsyncPoseClient,
    DeadlineExceededError,
    InvalidInputError,
    ModelMetadata,
    ModelNotReadyError,
    PoseClientError,
    ServerUnavailableError,
)
from posetriton.client.inputs import sdk_arguments
from posetriton.core.contract import IMAGE, TRACK_SUFFIX, ContractError, parameter_groups

from .camera import (
    CameraEngine,
    CameraFrame,
    LatestFrame,
    Message,
    Parameters,
    PerFrameEngine,
    TrackingEngine,
    error_message,
)
from .limits import (
    ACCEPTED_TYPES,
    DEFAULT_MAX_UPLOAD_BYTES,
    UploadRefused,
    check_image,
    checked_parameters,
    parameters_from_query,
    read_limited,
)
from .origins import HostPolicy, is_loopback

# A large photo on a busy CPU server takes seconds; a page should not hang for the SDK's default (minutes).
DEFAULT_TIMEOUT_S = 30.0
# A closed camera connection waits this long for the frame in flight before cancelling it.
ENGINE_STOP_S = 5.0
# WebSocket close code "Try Again Later" (RFC 6455 registry): the camera cap is reached.
CLOSE_TRY_AGAIN_LATER = 1013
# Connections uvicorn admits beyond the cameras and uploads: the page, its files, /api/models, refusals.
CONNECTION_MARGIN = 32
# The page's own script may talk to this app; everything else is refused by the browser.
_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_STATUS_FOR_ERROR: tuple[tuple[type[PoseClientError], int], ...] = (
    (InvalidInputError, 400),
    (ModelNotReadyError, 404),
    (ServerUnavailableError, 503),
    (DeadlineExceededError, 504),
)


@dataclass(frozen=True)
class UiSettings:
    """Where Triton is, which model the page opens with, and the upload limit."""

    url: str = DEFAULT_URL
    model: str = DEFAULT_MODEL
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    # The SDK clients' other keyword arguments (retry, TLS, headers): the CLI's connection options.
    client_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Camera frames of one connection in flight to Triton at once in per-frame mode (answers stay in order);
    # the tracker pipelines its own (TrackingEngine), in order too.
    camera_in_flight: int = 1
    # Host and Origin headers answered (posetriton.ui.origins); serve() derives them from the bind address.
    hosts: HostPolicy = dataclasses.field(default_factory=lambda: HostPolicy.for_bind("127.0.0.1", 8080))
    # Camera connections open at once: each holds a tracking sequence on the server and a few frames here.
    max_cameras: int = 4
    # Photos being analysed at once (each held in memory, up to max_upload_bytes); more get 503.
    max_uploads: int = 8
    # Camera frames the WebSocket buffers before it stops reading from the socket (uvicorn's ws_max_queue).
    max_queued_frames: int = 4

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_cameras", "max_uploads", "max_queued_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def exposure_warning(host: str) -> str | None:
    """The warning to print when the app listens on an address other machines can reach, else None."""
    if is_loopback(host):
        return None
    return (
        f"warning: posetriton ui listens on {host}, reachable from other machines: anyone who can reach it can "
        "send images to Triton through it and see the results; it has no authentication. "
        "Use --host 127.0.0.1 unless that is what you want."
    )


class TritonGateway:
    """The app's side of Triton: SDK clients (the SDK binds a client to one model), created once, closed at shutdown.

    A model gets a client only after the server confirmed it is a pose ensemble that takes encoded
    images, so arbitrary names in requests cannot make the app open channels. Clients are made on
    first use, inside the server's event loop (a gRPC asyncio channel belongs to the loop it was made in).
    """

    def __init__(self, settings: UiSettings) -> None:
        self.settings = settings
        self._discovery_client: AsyncPoseClient | None = None
        self._clients: dict[str, AsyncPoseClient] = {}
        self._metadata: dict[str, ModelMetadata] = {}

    @property
    def _discovery(self) -> AsyncPoseClient:
        if self._discovery_client is None:
            self._discovery_client = self._new_client(self.settings.model)
        return self._discovery_client

    async def close(self) -> None:
        clients = [*self._clients.values()]
        if self._discovery_client is not None:
            clients.append(self._discovery_client)
        for client in clients:
            await client.close()

    async def models(self) -> list[dict[str, Any]]:
        """The pose ensembles that take encoded images, with what the page needs to draw and to set its controls."""
        found = []
        for meta in await self._discovery.list_models():  # the SDK lists neither steps nor NAME_track
            if meta.input_name != IMAGE:
                continue
            self._metadata[meta.name] = meta
            found.append(
                {
                    **meta.to_dict(),
                    "defaults": meta.request_defaults,
                    "limits": meta.request_limits,
                    "tracking": await self.tracking_available(meta.name),
                }
            )
        return found

    async def metadata(self, model: str) -> ModelMetadata:
        meta = self._metadata.get(model)
        if meta is None:
            if model.endswith(TRACK_SUFFIX):  # a tracking ensemble takes frames of a sequence, not single photos
                base = model.removesuffix(TRACK_SUFFIX)
                raise ModelNotReadyError(f"model {model!r} is a tracking ensemble; choose {base!r}")
            meta = await self._discovery.model_metadata(model)
            if not meta.is_pose_model or meta.input_name != IMAGE:
                raise ModelNotReadyError(f"model {model!r} is not a pose ensemble that takes encoded images")
            self._metadata[model] = meta
        return meta

    async def client(self, model: str) -> AsyncPoseClient:
        await self.metadata(model)
        if model not in self._clients:
            self._clients[model] = self._new_client(model)
        return self._clients[model]

    def _new_client(self, model: str) -> AsyncPoseClient:
        settings = self.settings
        return AsyncPoseClient(settings.url, model, settings.timeout_s, **settings.client_options)

    async def tracking_available(self, model: str) -> bool:
        """Whether live mode can use the server-side tracker: the server has NAME_track ready."""
        try:
            return bool(await self._discovery.is_model_ready(model + TRACK_SUFFIX))
        except ModelNotReadyError:
            return False

    async def camera_engine(self, model: str, track: bool = True, smoothed: bool = True) -> CameraEngine:
        """The tracker when asked for and the server has it for this model (keypoints smoothed over each track
        unless ``smoothed`` is False), else one request per frame."""
        client = await self.client(model)
        if track and await self.tracking_available(model):
            return TrackingEngine(client, smoothed=smoothed)
        return PerFrameEngine(client, self.settings.camera_in_flight)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _client_error(exc: PoseClientError) -> JSONResponse:
    status = next((code for kind, code in _STATUS_FOR_ERROR if isinstance(exc, kind)), 502)
    if isinstance(exc, InvalidInputError):
        # server_message is None when the SDK refused the image before sending it (an unreadable header).
        return _error(status, exc.reason, refused_by="server" if exc.server_message is not None else "client")
    return _error(status, str(exc))


class HostOriginGuard:
    """ASGI middleware: a Host not in the allow-list gets 400, an Origin not in it 403, before any route runs.

    A refused WebSocket gets the HTTP denial response (uvicorn supports it), so the handshake fails
    with the status and the message; a page elsewhere never sees an open socket.
    """

    def __init__(self, app: ASGIApp, hosts: HostPolicy) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        refusal: JSONResponse | None = None
        if not self.hosts.host_allowed(host):
            refusal = _error(
                400, f"this app does not answer to Host {host!r}: it answers {self.hosts.describe()} "
                "(posetriton ui --allowed-host adds a name)",
            )  # fmt: skip
        elif origin is not None and not self.hosts.origin_allowed(origin):
            refusal = _error(
                403, f"cross-origin request refused: Origin {origin!r} is not this app ({self.hosts.describe()})"
            )
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await refusal(scope, receive, send)
        else:
            websocket = WebSocket(scope, receive, send)
            if "websocket.http.response" in scope.get("extensions", {}):
                await websocket.send_denial_response(refusal)
            else:
                await websocket.close(code=1008, reason="refused: Host or Origin is not this app")


class Slots:
    """A count of things in use with a limit: taken without waiting, or refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def take(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        self.in_use -= 1


def create_app(settings: UiSettings | None = None) -> Starlette:
    """The ASGI app. It connects to Triton lazily: the page loads (and says so) even when Triton is down."""
    settings = settings or UiSettings()
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    gateway = TritonGateway(settings)
    cameras, uploads = Slots(settings.max_cameras), Slots(settings.max_uploads)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await gateway.close()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": _CONTENT_SECURITY_POLICY})

    async def config(request: Request) -> Response:
        return JSONResponse(
            {
                "url": settings.url,
                "model": settings.model,
                "max_upload_bytes": settings.max_upload_bytes,
                "accepted_types": list(ACCEPTED_TYPES),
                "max_cameras": cameras.limit,
                "cameras_open": cameras.in_use,
                "max_uploads": uploads.limit,
                "uploads_in_progress": uploads.in_use,
                "parameters": describe_parameters(),
            }
        )

    async def models(request: Request) -> Response:
        try:
            return JSONResponse({"models": await gateway.models(), "default": settings.model})
        except PoseClientError as exc:
            return _client_error(exc)

    async def predict(request: Request) -> Response:
        if not uploads.take():
            return _error(503, f"busy: the app analyses at most {uploads.limit} at once; try again in a moment")
        try:
            return await _predict(request)
        finally:
            uploads.give_back()

    async def _predict(request: Request) -> Response:
        model = request.query_params.get("model") or settings.model
        try:
            body = await read_limited(
                request.stream(), request.headers.get("content-length"), settings.max_upload_bytes
            )
            check_image(body, settings.max_upload_bytes)
            client = await gateway.client(model)
            parameters = parameters_from_query(request.query_params, (await gateway.metadata(model)).request_limits)
            start = time.perf_counter()
            poses = await client.predict(body, **sdk_arguments(parameters))
        except UploadRefused as exc:
            return _error(exc.status, str(exc))
        except ContractError as exc:
            return _error(400, str(exc))
        except PoseClientError as exc:
            return _client_error(exc)
        latency_ms = round((time.perf_counter() - start) * 1000, 1)
        return JSONResponse({**poses.to_dict(), "model": model, "latency_ms": latency_ms})

    async def camera(websocket: WebSocket) -> None:
        await websocket.accept()
        if not cameras.take():  # accepted first, so that the page can show why
            message = f"too many camera connections: {cameras.limit} are open, the limit; close one and start again"
            await websocket.send_json({"type": "fatal", "error": message})
            await websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason=message[:120])
            return
        try:
            await _camera(websocket)
        finally:
            cameras.give_back()

    async def _camera(websocket: WebSocket) -> None:
        model = websocket.query_params.get("model") or settings.model
        try:
            meta = await gateway.metadata(model)
            parameters = parameters_from_query(websocket.query_params, meta.request_limits)
            engine = await gateway.camera_engine(
                model,
                track=websocket.query_params.get("mode") != "frames",
                smoothed=websocket.query_params.get("keypoints") != "raw",
            )
        except (PoseClientError, ContractError) as exc:
            await websocket.send_json({"type": "fatal", "error": str(exc)})
            await websocket.close()
            return
        await CameraSession(websocket, engine, parameters, meta, settings.max_upload_bytes).run(model)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/config", config),
            Route("/api/models", models),
            Route("/api/predict", predict, methods=["POST"]),
            WebSocketRoute("/api/camera", camera),
            Mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static"),
        ],
        lifespan=lifespan,
        middleware=[Middleware(HostOriginGuard, hosts=settings.hosts)],
    )


class CameraSession:
    """One camera connection: read frames into the newest-wins mailbox while the engine answers them."""

    def __init__(
        self, websocket: WebSocket, engine: CameraEngine, parameters: Parameters, meta: ModelMetadata,
        max_frame_bytes: int,
    ) -> None:  # fmt: skip
        self.websocket = websocket
        self.engine = engine
        self.parameters = parameters
        self.meta = meta
        self.max_frame_bytes = max_frame_bytes
        self.frames = LatestFrame()
        self._send_lock = asyncio.Lock()
        self._open = True

    async def emit(self, message: Message) -> None:
        if not self._open:
            return
        async with self._send_lock:  # engines may answer from several tasks
            try:
                await self.websocket.send_json(message)
            except (WebSocketDisconnect, RuntimeError):  # the page went away mid-frame
                self._open = False

    async def run(self, model: str) -> None:
        await self.emit({"type": "ready", "model": model, "tracking": self.engine.tracking})
        engine = asyncio.create_task(self.engine.run(self.frames, lambda: self.parameters, self.emit))
        try:
            await self._read()
        finally:
            self._open = False
            self.frames.close()
            # The engine finishes the frame it is on (at most one request per worker), then stops.
            done, _ = await asyncio.wait({engine}, timeout=ENGINE_STOP_S)
            if not done:
                engine.cancel()
                await asyncio.gather(engine, return_exceptions=True)

    async def _read(self) -> None:
        seq = 0
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                frame = CameraFrame(seq, data, time.perf_counter())
                seq += 1
                try:
                    check_image(data, self.max_frame_bytes)
                except UploadRefused as exc:
                    await self.emit(error_message(frame, str(exc), self.frames.dropped))
                    continue
                self.frames.put(frame)
            elif message.get("text") is not None:
                try:
                    self.parameters = self._settings(message["text"])
                except ValueError as exc:  # ContractError and JSON errors alike; the old parameters stay
                    await self.emit({"type": "settings_error", "error": str(exc)})
                    continue
                await self.emit({"type": "settings", **self.parameters})

    def _settings(self, text: str) -> Parameters:
        """A text message sets the request parameters: ``{"conf": 0.4, "max_det": 20}`` (absent or null: the
        model's default), each checked by its declaration against the model's limits."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ContractError("a settings message is a JSON object of request parameters by name")
        return checked_parameters(values, self.meta.request_limits)


def describe_parameters() -> list[dict[str, Any]]:
    """Every request parameter as the page offers it: its declaration's ``describe()``, and whether only the
    tracker reads it (the page shows those with the camera)."""
    return [
        {**declared.describe(), "tracking_only": group.tracking_only}
        for group in parameter_groups(tracking=True)
        for declared in group.declarations().values()
    ]


def serve(
    settings: UiSettings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
    allowed_hosts: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """Run the app with uvicorn until Ctrl-C, answering the Host names of ``host:port`` (and ``allowed_hosts``).

    WebSocket messages are capped at the upload limit and ``max_queued_frames`` of them are buffered
    per connection; connections beyond the app's own caps plus a margin for the page's files are
    answered 503 by uvicorn before the app sees them.
    """
    import uvicorn

    settings = dataclasses.replace(settings, hosts=HostPolicy.for_bind(host, port, allowed_hosts))
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level=log_level, access_log=False,
        ws_max_size=settings.max_upload_bytes + 1024, ws_max_queue=settings.max_queued_frames,
        limit_concurrency=settings.max_cameras + settings.max_uploads + CONNECTION_MARGIN,
    )  # fmt: skip

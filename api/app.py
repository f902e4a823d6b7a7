"""The monitoring app, built by a factory from the miner's live objects.

Nothing happens at import time: ``create_app`` closes over the state, the
registry and the two config sections, so tests and the miner each build
their own app and no module-level global leaks between them.

Handlers are ``async def`` on purpose: each one only reads attributes of the
state (atomic under the GIL) or renders the registry, so running them on the
event loop avoids a thread-pool hop per request while the training thread is
busy; none of them awaits or blocks on I/O.

Decisions the route table leaves open:
- ``/diagnostics`` answers 503 ``{"detail": ...}`` until the runner has stored
  the block (``state.diagnostics = diag.model_dump()``): a status code is what
  clients read, and a body of nulls would pass for real figures.
- Control routes answer 200 with what is now pending; the loop acts on it
  between inner steps. An empty ``api.token`` counts as no token (403).
"""

# No `from __future__ import annotations`: FastAPI must evaluate the
# dependency annotations of the closures below, which name local objects.
import hmac
import math
import time
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.limits import LoadShedder, probe_reserve
from api.models import ControlAccepted, ControlAction, Liveness, Problem, Readiness, Status
from daemon import __version__
from daemon.config import ApiConfig, WatchdogConfig
from daemon.diagnostics import Diagnostics
from daemon.state import MinerState

log = structlog.get_logger(__name__)

METRICS_TTL = 0.5


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """A component's status() may hold numpy scalars or paths; /status must not 500 on them."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _section(state: MinerState, name: str) -> dict[str, Any] | None:
    provider = state.sections.get(name)
    if provider is None:
        return None
    try:
        data = provider()
    except Exception as exc:  # a broken component must not take /status down with it
        log.warning("status section failed", section=name, error=f"{type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    return _jsonable(data) if data is not None else None


def build_status(state: MinerState, stall_seconds: float) -> Status:
    age = state.progress_age()
    controls = state.controls
    # Each part's section under its own name (upload has its own key, null without an uploader);
    # a section named like one of Status's keys could not be told from it and is left out.
    others = sorted(name for name in state.sections if name not in Status.model_fields)
    return Status(
        version=state.version,
        task=state.task,
        device=state.device,
        rank=state.rank,
        world_size=state.world_size,
        local_rank=state.local_rank,
        phase=state.phase,
        ready=state.ready,
        paused=controls.paused.is_set(),
        checkpoint_requested=controls.checkpoint.is_set(),
        upload_requested=controls.upload.is_set(),
        outer_step=state.outer_step,
        inner_step=state.inner_step,
        global_step=state.global_step,
        epoch=state.epoch,
        last_step_time=state.last_step_time,
        last_step_seconds=_finite(state.last_step_seconds),
        loss=_finite(state.loss),
        learning_rate=_finite(state.learning_rate),
        samples_per_second=_finite(state.samples_per_second),
        tokens_per_second=_finite(state.tokens_per_second),
        tokens_total=state.tokens_total,
        mfu=_finite(state.mfu),
        separation_margin=_finite(state.eval.get("separation_margin")),
        eval={k: _finite(float(v)) for k, v in dict(state.eval).items()},
        eval_epoch=state.eval_epoch,
        eval_global_step=state.eval_global_step,
        model_on_accelerator=state.model_on_accelerator,
        last_checkpoint_time=state.last_checkpoint_time,
        upload=_section(state, "upload"),
        sections=(["upload"] if "upload" in state.sections else []) + others,
        **{name: _section(state, name) for name in others},
        uptime_seconds=state.uptime(),
        progress_age_seconds=age,
        stall_seconds=stall_seconds,
        stalled=age > stall_seconds,
    )


def create_app(
    state: MinerState,
    registry: CollectorRegistry,
    api_cfg: ApiConfig,
    watchdog_cfg: WatchdogConfig,
) -> FastAPI:
    """The FastAPI app serving ``state`` and ``registry`` (routes as in docs/OPERATIONS.md)."""
    stall = watchdog_cfg.stall_seconds
    token = api_cfg.token.get_secret_value().encode() if api_cfg.token is not None else b""
    bearer = HTTPBearer(
        auto_error=False,
        description="api.token; control routes answer 403 while none is configured",
    )

    app = FastAPI(
        title="minerd",
        version=__version__,
        description="Health, status, diagnostics, Prometheus metrics and controls of a running miner.",
    )
    app.add_middleware(
        LoadShedder,
        rate=api_cfg.requests_per_second,
        metrics_rate=api_cfg.metrics_requests_per_second or None,
        control_rate=api_cfg.control_requests_per_second or None,
        # The rest of api.max_connections is the health probes' (api/limits.py).
        max_in_flight=api_cfg.max_connections - probe_reserve(api_cfg.max_connections),
        on_shed=state.count_shed_request,
    )

    @app.get(
        "/livez",
        response_model=Liveness,
        responses={503: {"model": Liveness, "description": "no training progress for stall_seconds, or a "
                                                           "training loop that is failing (the reason)"}},
        summary="200 while the training heartbeat is fresh",
    )
    async def livez() -> Any:
        age = state.progress_age()
        stalled = age > stall
        # A loop that makes no progress (restoring after non-finite steps) is not alive either,
        # whatever the heartbeat says.
        failing = state.live_problem
        body = Liveness(
            status="stalled" if stalled else "failing" if failing else "ok",
            progress_age_seconds=age,
            stall_seconds=stall,
            phase=state.phase,
            reason=failing,
        )
        return JSONResponse(body.model_dump(), status_code=503) if stalled or failing else body

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "before the first inner step, or shutting down"}},
        summary="200 from the first inner step until shutdown begins",
    )
    async def readyz() -> Any:
        body = Readiness(ready=state.ready, phase=state.phase, first_step_done=state.first_step_done,
                         reason=state.not_ready_reason)
        return body if body.ready else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/status", response_model=Status, summary="Progress, loss, components and uptime")
    async def status() -> Status:
        return build_status(state, stall)

    @app.get(
        "/diagnostics",
        response_model=Diagnostics,
        responses={503: {"model": Problem, "description": "the runner has not collected diagnostics yet"}},
        summary="The GPU diagnostics block and its red flags",
    )
    async def diagnostics() -> Any:
        if not state.diagnostics:
            return JSONResponse({"detail": "diagnostics not collected yet"}, status_code=503)
        return Diagnostics.model_validate(state.diagnostics)

    rendered: dict[str, Any] = {"at": -1.0, "body": b""}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        summary="Prometheus text exposition of the miner's registry",
    )
    async def metrics() -> Response:
        # Rendered at most every METRICS_TTL seconds: scrapers come every few seconds, and a
        # burst of them then costs one rendering, not one each.
        now = time.monotonic()
        if now - rendered["at"] >= METRICS_TTL:
            rendered["body"], rendered["at"] = generate_latest(registry), now
        return Response(content=rendered["body"], media_type=CONTENT_TYPE_LATEST)

    def authorize(action: ControlAction) -> Any:
        async def check(
            request: Request,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> None:
            client = request.client.host if request.client is not None else None
            if not token:
                log.warning("control request refused: no api.token configured", action=action, client=client)
                raise HTTPException(403, "control endpoints are disabled: no api.token configured")
            # Bytes, not str: compare_digest rejects non-ASCII str, and header
            # values arrive as latin-1 text; a TypeError here would be a 500.
            presented = credentials.credentials.encode() if credentials is not None else None
            if presented is None or not hmac.compare_digest(presented, token):
                reason = "missing bearer token" if presented is None else "wrong bearer token"
                log.warning("control request rejected", action=action, reason=reason, client=client)
                raise HTTPException(401, f"unauthorized: {reason}", headers={"WWW-Authenticate": "Bearer"})
            log.info("control request accepted", action=action, client=client)

        return check

    def accepted(action: ControlAction) -> ControlAccepted:
        c = state.controls
        return ControlAccepted(
            action=action,
            paused=c.paused.is_set(),
            checkpoint_requested=c.checkpoint.is_set(),
            upload_requested=c.upload.is_set(),
        )

    control_responses: dict[int | str, dict[str, Any]] = {
        401: {"model": Problem, "description": "missing or wrong bearer token"},
        403: {"model": Problem, "description": "no api.token configured: control routes are disabled"},
    }

    def control_route(action: ControlAction, summary: str) -> None:
        guard = authorize(action)

        async def handler() -> ControlAccepted:
            c = state.controls
            if action == "checkpoint":
                c.checkpoint.set()
            elif action == "upload":
                c.upload.set()
            elif action == "pause":
                c.paused.set()
            else:
                c.paused.clear()
            return accepted(action)

        app.post(
            f"/control/{action}",
            response_model=ControlAccepted,
            responses=control_responses,
            dependencies=[Depends(guard)],
            summary=summary,
            name=f"control_{action}",
        )(handler)

    control_route("checkpoint", "Ask the loop to write a checkpoint after the current inner step")
    control_route("upload", "Ask the loop to publish a revision after the current inner step (gate applies)")
    control_route("pause", "Pause training between inner steps (the loop keeps beating while paused)")
    control_route("resume", "Resume training after a pause")
    return app

"""uvicorn in a daemon thread, so the API answers while the main thread trains.

The miner starts it first (``/readyz`` says 503 during start-up) and stops it
last (``/readyz`` says 503 during shutdown, ``/livez`` keeps answering).
uvicorn installs signal handlers only from the main thread, so from this
thread it leaves SIGINT/SIGTERM to the miner; ``log_config=None`` keeps its
loggers on our structlog pipeline (daemon/logsetup.py).
"""

from __future__ import annotations

import ipaddress
import threading
import time

import structlog
import uvicorn
from fastapi import FastAPI

from api.connections import guarded_protocol
from daemon.config import ApiConfig

log = structlog.get_logger(__name__)


class ApiStartError(RuntimeError):
    """The server could not bind or did not come up in time."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from outside
        return False


def has_token(api_cfg: ApiConfig) -> bool:
    """An empty token counts as none, as in api/app.py."""
    return api_cfg.token is not None and bool(api_cfg.token.get_secret_value())


class ApiServer:
    """Serves ``app`` on ``api_cfg.host``:``api_cfg.port + port_offset`` from a daemon thread.

    ``port_offset`` is the local rank under torchrun (local rank r
    serves on port + r); port 0 picks a free port and ignores the offset.
    """

    name = "api"

    def __init__(self, app: FastAPI, api_cfg: ApiConfig, *, port_offset: int = 0) -> None:
        self._cfg = api_cfg
        port = api_cfg.port + port_offset if api_cfg.port != 0 else 0
        self._protocol = guarded_protocol(api_cfg.header_timeout_seconds, api_cfg.max_connections)
        self.connections = self._protocol.guard  # open / waiting / timed-out / evicted counts
        self._config = uvicorn.Config(
            app,
            host=api_cfg.host,
            port=port,
            log_config=None,  # our logsetup owns logging
            access_log=False,  # a line per scrape would drown the step lines
            lifespan="off",  # the app has no start-up work; the miner owns the lifecycle
            timeout_graceful_shutdown=2,
            # The header deadline and the connection bound (api/connections.py), in place of
            # uvicorn's limit_concurrency, which answered 503 to the health probes as well once
            # idle sockets filled it.
            http=self._protocol,
            ws="none",
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.port: int | None = None

    @property
    def host(self) -> str:
        return self._cfg.host

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("ApiServer.url before start()")
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as exc:  # uvicorn calls sys.exit(1) when it cannot bind
            self._error = exc

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; returns once the socket is bound (``self.port`` is then the real port)."""
        if self._thread is not None:
            raise RuntimeError("ApiServer.start() called twice")
        if not is_loopback(self.host) and not has_token(self._cfg):
            log.warning(
                "API bound to a non-loopback address without api.token: anyone who can reach "
                "it reads status and metrics (control routes stay disabled)",
                host=self.host,
            )
        self._thread = threading.Thread(target=self._run, name="minerd-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ApiStartError(
                    f"API could not listen on {self.host}:{self._config.port} "
                    f"(see the error above; is the port in use?): {self._error!r}"
                )
            if time.monotonic() > deadline:
                self._server.should_exit = True
                raise ApiStartError(f"API did not start within {timeout:.0f}s")
            time.sleep(0.01)
        sockets = self._server.servers[0].sockets
        self.port = int(sockets[0].getsockname()[1])
        log.info("API listening", url=self.url)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving within ``timeout`` seconds (then drop open connections)."""
        thread = self._thread
        if thread is None:
            return
        self._server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            # Open keep-alive connections or a stuck handler: drop them.
            self._server.force_exit = True
            thread.join(1.0)
        if thread.is_alive():
            log.warning("API thread did not stop in time", timeout=timeout)
        else:
            log.info("API stopped")

"""Start components in order, stop them in reverse.

A failure in one component's stop is logged and the others still stop
(celery's bootsteps do the same): a stuck uploader must not keep the API or
the checkpoint from closing.
"""

from __future__ import annotations

import time

import structlog

from daemon.plugin.parts import Component

log = structlog.get_logger(__name__)


class Lifecycle:
    def __init__(self) -> None:
        self._started: list[Component] = []

    def start(self, component: Component) -> None:
        component.start()
        self._started.append(component)
        log.debug("component started", component=component.name)

    def stop_all(self, deadline_seconds: float) -> None:
        end = time.monotonic() + deadline_seconds
        while self._started:
            comp = self._started.pop()
            remaining = max(0.5, end - time.monotonic())
            try:
                comp.stop(remaining)
                log.debug("component stopped", component=comp.name)
            except Exception:
                log.exception("component failed to stop; stopping the others", component=comp.name)

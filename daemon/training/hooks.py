"""Step hooks: components that act after each inner step, off the engine's core."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.state import MinerState
from daemon.upload import Uploader

if TYPE_CHECKING:
    from daemon.training.engine import Trainer


class UploadHook:
    """Offers every inner step to the upload gate; `POST /control/upload` forces one through it."""

    def __init__(self, uploader: Uploader, state: MinerState) -> None:
        self.uploader = uploader
        self.state = state

    def before_inner_step(self, trainer: Trainer) -> None:
        return None

    def after_inner_step(self, trainer: Trainer) -> None:
        if self.state.controls.upload.is_set():
            self.state.controls.upload.clear()
            self.uploader.request_upload()
        c = trainer.c
        loss = trainer.last_loss if trainer.last_loss is not None else float("nan")
        self.uploader.on_inner_step(c.outer_step, c.inner_step, loss, trainer.module, trainer.p.optimizer,
                                    anchor=trainer.p.outer.anchor)

"""The uploader's place in the training loop: a step hook."""

from __future__ import annotations

from daemon.engine.protocols import StepContext
from daemon.state import MinerState
from daemon.upload import Uploader


class UploadHook:
    """Offers every inner step to the upload gate; `POST /control/upload` forces one through it."""

    def __init__(self, uploader: Uploader, state: MinerState) -> None:
        self.uploader = uploader
        self.state = state

    def before_inner_step(self, step: StepContext) -> None:
        return None

    def after_inner_step(self, step: StepContext) -> None:
        if self.state.controls.upload.is_set():
            self.state.controls.upload.clear()
            self.uploader.request_upload()
        loss = step.loss if step.loss is not None else float("nan")
        self.uploader.on_inner_step(step.outer_step, step.inner_step, loss, step.model, step.optimizer,
                                    anchor=step.anchor, global_step=step.global_step)

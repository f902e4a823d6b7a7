"""The bucket exchange's config section (``exchange``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from daemon.config import DAY, Section

MINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ExchangeConfig(Section):
    """Training together through a bucket: each miner submits the compressed pseudo-gradient of
    a round, an aggregator (``minerd aggregate``) scores them as a validator does, applies the
    accepted ones and publishes the next global model, which every miner then follows."""

    key = "exchange"

    enabled: bool = False
    target: str = Field("", description="where rounds and global revisions live: a directory (a shared mount) "
                        "or s3://bucket/prefix")
    endpoint_url: str = Field("", description="S3-compatible endpoint; empty = the AWS environment's "
                              "(AWS_ENDPOINT_URL_S3)")
    miner_id: str = Field("", description="this miner's name in the rounds (letters, digits, . _ -)")
    round_inner_steps: int = Field(0, ge=0, le=1_000_000, description="inner steps a miner trains per round; "
                                   "0 = train.inner_steps_per_outer (a round is one outer step)")
    round_seconds: float = Field(600, gt=0, le=DAY, description="the aggregator closes a round this long after "
                                 "it opened, or once exchange.expected_miners submitted")
    expected_miners: int = Field(0, ge=0, le=10_000, description="submissions that close a round early "
                                 "(0 = wait exchange.round_seconds)")
    min_improvement: float = Field(0.0, description="held-out loss a submission must remove, applied alone, to "
                                   "be accepted")
    preview: Literal["log", "block"] = Field(
        "log", description="score each submission as the aggregator will before sending it: log the preview, or "
        "block (do not submit) one the aggregator would reject")
    poll_seconds: float = Field(2.0, gt=0, le=3600, description="how often miners look for a new global revision "
                                "and the aggregator for submissions")

    @field_validator("miner_id")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not MINER_ID.fullmatch(value):
            raise ValueError("must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    def inner_steps(self, default: int) -> int:
        return self.round_inner_steps or default



"""The bucket exchange in one process: miners that submit rounds and follow the global model,
an aggregator that scores each submission as a validator does, on a directory target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from structlog.testing import capture_logs

from daemon.run.aggregate import build_aggregator
from daemon.run.catalog import load_config
from daemon.run.local import NeverStop, cpu_run
from daemon.state import MinerState
from daemon.sync.exchange.aggregator import Aggregator
from daemon.sync.exchange.layout import MANIFEST, POINTER, dumps, file_entry, submission_folder
from daemon.sync.exchange.miner import ExchangeMiner
from tests.conftest import small_lm_sets

ROUND = 3  # inner steps per round


def sets(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return small_lm_sets(tmp_path / name, "exchange.enabled=true", f"exchange.target={tmp_path / 'target'}",
                         f"exchange.miner_id={name}", f"train.inner_steps_per_outer={ROUND}",
                         "exchange.poll_seconds=0.001", "upload.enabled=false", "lm.eval_sequences=8",
                         "train.outer_lr=0.7", *extra)


class Miner:
    def __init__(self, tmp_path: Path, name: str, *extra: str, resume: bool = False) -> None:
        local = cpu_run(sets(tmp_path, name, *extra))
        self.run, self.registry, self.state = local.run, local.registry, local.state
        self.trainer = self.run.trainer
        self.exchange = self.run.outer
        assert isinstance(self.exchange, ExchangeMiner)
        if resume:
            self.trainer.resume()
        self.joined = self.exchange.join(NeverStop(), None)  # type: ignore[arg-type]

    def train_round(self) -> None:
        """Inner steps until this round is submitted."""
        base = self.exchange.base
        while not self.exchange.submitted:
            self.trainer.inner_step()
        assert self.exchange.base == base

    def follow(self) -> int:
        """Inner steps until the next global revision is loaded; how many it took."""
        base, steps = self.exchange.base, 0
        while self.exchange.base == base:
            self.trainer.inner_step()
            steps += 1
            assert steps < 20, "no global revision loaded"
        return steps


@pytest.fixture
def aggregator(tmp_path: Path) -> Aggregator:
    cfg = load_config(sets=sets(tmp_path, "aggregator"), environ={})
    agg = build_aggregator(cfg, MinerState(task="causal_lm"), torch.device("cpu"))
    agg.open()
    return agg


def scores(tmp_path: Path, round_: int) -> dict[str, dict[str, object]]:
    return json.loads((tmp_path / "target" / "rounds" / str(round_) / "scores.json").read_text())["submissions"]


class TestRounds:
    @pytest.mark.slow
    def test_two_miners_lower_the_global_loss_round_after_round(self, tmp_path: Path, aggregator: Aggregator) -> None:
        a, b = Miner(tmp_path, "a"), Miner(tmp_path, "b")
        losses = [aggregator.evaluate(aggregator.model)]
        for r in range(3):
            a.train_round()
            b.train_round()
            verdicts = aggregator.close()
            assert sorted((v.miner, v.reason) for v in verdicts) == [("a", "accepted"), ("b", "accepted")]
            losses.append(aggregator.evaluate(aggregator.model))
            assert a.follow() == 1 and b.follow() == 1  # the next inner step after publication
            assert a.exchange.base == b.exchange.base == r + 1
        assert losses[-1] < losses[0] - 0.3, losses
        # Both miners hold the global weights they loaded (then trained one step on).
        assert (tmp_path / "target" / POINTER).read_text().strip() == "round-3"
        for r in range(3):
            assert set(scores(tmp_path, r)) == {"a", "b"}
        # The aggregator replayed each miner's own samples: its update lowered the loss on them.
        own = scores(tmp_path, 2)["a"]
        assert own["own_loss_after"] < own["own_loss_before"], own  # type: ignore[operator]
        value = a.registry.get_sample_value
        assert value("minerd_exchange_submissions_total", {"result": "submitted"}) == 3
        assert value("minerd_exchange_round") == 3 and value("minerd_exchange_rounds_behind") == 0
        assert value("minerd_exchange_preview_loss_delta") > 0  # the last round's preview helped
        status = a.state.sections["exchange"]()
        assert status["round"] == 3 and status["round_submitted"] is False and status["newest_global_round"] == 3

    def test_a_diverging_miner_a_copier_and_bad_submissions_are_rejected(self, tmp_path: Path,
                                                                         aggregator: Aggregator) -> None:
        honest, wild = Miner(tmp_path, "honest"), Miner(tmp_path, "wild", "train.lr=1.0", "train.warmup_steps=0",
                                                         "train.grad_clip=0")
        honest.train_round()
        wild.train_round()
        target = tmp_path / "target"
        src = target / submission_folder(0, "honest")
        # A copier: the honest artifact under its own id (written later).
        copy = target / submission_folder(0, "copier")
        shutil.copytree(src, copy)
        record = json.loads((copy / "submission.json").read_text())
        (copy / "submission.json").write_bytes(dumps({**record, "miner_id": "copier"}))
        _manifest(copy)
        # A stale one, a foreign one, a NaN one, and one that is not safetensors at all.
        for name, edit in {"stale": {"round": 7}, "foreign": {"applicability": "0" * 32}}.items():
            folder = target / submission_folder(0, name)
            shutil.copytree(src, folder)
            (folder / "submission.json").write_bytes(dumps({**record, "miner_id": name, **edit}))
            _manifest(folder)
        nan = target / submission_folder(0, "nan")
        shutil.copytree(src, nan)
        (nan / "submission.json").write_bytes(dumps({**record, "miner_id": "nan"}))
        tensors = load_file(str(nan / "pseudo_gradient.safetensors"))
        key = next(k for k in tensors if k.endswith(".dense"))
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(nan / "pseudo_gradient.safetensors"), {"format": "pt"})
        _manifest(nan)
        junk = target / submission_folder(0, "junk")
        shutil.copytree(src, junk)
        (junk / "submission.json").write_bytes(dumps({**record, "miner_id": "junk"}))
        (junk / "pseudo_gradient.safetensors").write_bytes(b"\x80\x04pickle-like bytes, not safetensors")
        _manifest(junk)
        # A manifest that is not JSON, one whose sha256 does not match, one that claims a file
        # larger than the model could need, and a header naming other shapes.
        for name in ("badjson", "badsha", "huge", "shapes"):
            folder = target / submission_folder(0, name)
            shutil.copytree(src, folder)
            (folder / "submission.json").write_bytes(dumps({**record, "miner_id": name}))
            _manifest(folder)
        (target / submission_folder(0, "badjson") / MANIFEST).write_text("{not json")
        manifest = json.loads((target / submission_folder(0, "badsha") / MANIFEST).read_text())
        manifest["files"]["pseudo_gradient.safetensors"]["sha256"] = "0" * 64
        (target / submission_folder(0, "badsha") / MANIFEST).write_bytes(dumps(manifest))
        manifest = json.loads((target / submission_folder(0, "huge") / MANIFEST).read_text())
        manifest["files"]["pseudo_gradient.safetensors"]["size"] = 10**12
        (target / submission_folder(0, "huge") / MANIFEST).write_bytes(dumps(manifest))
        header_path = target / submission_folder(0, "shapes") / "pseudo_gradient.json"
        header = json.loads(header_path.read_text())
        first = next(iter(header["tensors"]))
        header["tensors"][first]["shape"] = [7, 7]
        header_path.write_bytes(dumps(header))
        _manifest(target / submission_folder(0, "shapes"))
        verdicts = {v.miner: v for v in aggregator.close()}
        assert verdicts["honest"].accepted and verdicts["honest"].weight == 1.0
        assert "not JSON" in verdicts["badjson"].detail and "does not match its manifest" in verdicts["badsha"].detail
        assert "over the" in verdicts["huge"].detail and verdicts["shapes"].reason == "structure"
        for name in ("badjson", "badsha", "huge", "shapes"):
            assert verdicts.pop(name).reason == "structure", name
        # The miners' previews said what the aggregator then decided, with the same losses.
        for miner in (honest, wild):
            preview, verdict = miner.exchange.last_preview, verdicts[miner.exchange.ex.miner_id]
            assert preview is not None and (preview.accepted, preview.reason) == (verdict.accepted, verdict.reason)
            assert preview.loss_before == pytest.approx(verdict.loss_before, abs=1e-5)
            assert preview.loss_after == pytest.approx(verdict.loss_after, abs=1e-5)
        expected = {"wild": "no_improvement", "copier": "copy", "stale": "stale_round", "foreign": "foreign",
                    "nan": "not_finite", "junk": "structure"}
        assert {m: v.reason for m, v in verdicts.items() if m != "honest"} == expected
        assert verdicts["wild"].loss_after > verdicts["wild"].loss_before  # type: ignore[operator]
        written = scores(tmp_path, 0)
        assert written["copier"]["reason"] == "copy" and written["honest"]["accepted"] is True

    def test_a_blocking_preview_keeps_a_harmful_round_back(self, tmp_path: Path, aggregator: Aggregator) -> None:
        wild = Miner(tmp_path, "wild", "train.lr=1.0", "train.warmup_steps=0", "train.grad_clip=0",
                     "exchange.preview=block")
        with capture_logs() as logs:
            wild.train_round()
        (line,) = [e["event"] for e in logs if e["event"].startswith("UPLOAD BLOCKED")]
        assert line.startswith("UPLOAD BLOCKED: round 0 preview no_improvement (loss ")
        assert not (tmp_path / "target" / submission_folder(0, "wild")).exists()
        assert wild.registry.get_sample_value("minerd_exchange_submissions_total", {"result": "blocked"}) == 1
        assert aggregator.close() == []  # nothing to score; the next round opens all the same

    @pytest.mark.slow
    def test_a_restarted_miner_says_where_it_resumes_from(self, tmp_path: Path, aggregator: Aggregator) -> None:
        m, other = Miner(tmp_path, "m"), Miner(tmp_path, "other")
        for _ in range(2):
            m.train_round()
            other.train_round()
            aggregator.close()
            m.follow()
            other.follow()
        m.trainer.checkpoint("stop")  # at round 2
        with capture_logs() as logs:
            again = Miner(tmp_path, "m", resume=True)
        assert again.joined is None and again.exchange.base == 2
        assert "EXCHANGE: resuming from this miner's checkpoint at round 2" in [e["event"] for e in logs]
        for _ in range(2):  # the others go on without it
            other.train_round()
            aggregator.close()
            other.follow()
        with capture_logs() as logs:
            late = Miner(tmp_path, "m", resume=True)
        events = [e["event"] for e in logs]
        assert "EXCHANGE: the global model moved past this checkpoint's round 2: starting from global round 4" in events
        assert late.exchange.base == 4 and late.joined is not None
        assert all(torch.equal(a, p.detach()) for a, p in zip(late.exchange.anchor, late.exchange.params, strict=True))

    def test_a_tampered_global_revision_is_refused(self, tmp_path: Path, aggregator: Aggregator) -> None:
        miner = Miner(tmp_path, "m")
        miner.train_round()
        aggregator.close()
        weights = tmp_path / "target" / "global" / "round-1" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
        before = {k: v.clone() for k, v in miner.trainer.model.state_dict().items()}
        for _ in range(3):
            miner.trainer.inner_step()
        assert miner.exchange.base == 0 and 1 in miner.exchange.refused  # trains on, from its own weights
        assert any(not torch.equal(v, before[k]) for k, v in miner.trainer.model.state_dict().items())

    def test_a_late_miner_drops_its_round_and_catches_up(self, tmp_path: Path, aggregator: Aggregator) -> None:
        fast, late = Miner(tmp_path, "fast"), Miner(tmp_path, "late")
        for _ in range(2):
            fast.train_round()
            aggregator.close()
            fast.follow()
        # The late miner trained nothing meanwhile: at the end of its round, global round 2 is there.
        steps = 0
        while late.exchange.base == 0:
            late.trainer.inner_step()
            steps += 1
        assert late.exchange.base == 2 and steps == ROUND
        assert late.trainer.progress.global_step == 2 * ROUND  # the schedule caught up with the rounds
        assert not (tmp_path / "target" / submission_folder(0, "late")).exists()
        # Caught up, it is scored like the others again.
        late.train_round()
        fast.train_round()
        verdicts = {v.miner: v.reason for v in aggregator.close()}
        assert verdicts == {"fast": "accepted", "late": "accepted"}


def _manifest(folder: Path) -> None:
    names = [p.name for p in folder.iterdir() if p.name != MANIFEST]
    (folder / MANIFEST).write_bytes(dumps({"format": 1, "files": {n: file_entry(folder / n) for n in names}}))

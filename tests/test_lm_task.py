"""The language-model task in the real trainer: it learns, resumes exactly, evaluates,
publishes revisions validators load with from_pretrained, and continues from one."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from api.app import build_status
from daemon.engine.protocols import EvalPoint
from daemon.engine.trainer import Trainer
from daemon.run.lifecycle import Lifecycle
from daemon.run.local import cpu_run
from daemon.tasks.causal_lm.model import flops_per_token
from daemon.upload import Uploader, verify_target
from tests.conftest import ROOT, small_lm_sets

EVAL_LINE = re.compile(r"^Eval @ step \d+: loss=\d+\.\d{3} ppl=\d+\.\d{2} bpb=\d+\.\d{3}$")


def params(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def steps(t: Trainer, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        t.inner_step()
        assert t.last_loss is not None
        losses.append(t.last_loss)
    return losses


@pytest.mark.slow
class TestLearning:
    """300 CPU steps take the held-out loss at least 2 nats below the untrained model's."""

    def test_held_out_loss_falls_two_nats(self, tmp_path: Path) -> None:
        # A vocabulary of 4096 (the untrained loss is ln 4096 = 8.3), one optimizer step
        # per 8 sequences of 32 tokens, no outer step to perturb a single process.
        run, _, _ = cpu_run(small_lm_sets(tmp_path, "lm.vocab_size=4096", "train.effective_batch_size=8",
                                          "lm.seq_len=32", "train.inner_steps_per_outer=1000",
                                          "lm.eval_every_steps=300"))
        t = run.trainer
        untrained = run.task.evaluate(t.model, run.device, EvalPoint(1, 0), lambda: None).metrics["loss"]
        assert abs(untrained - math.log(4096)) < 0.5, untrained
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # both cores: nothing else runs beside this test
        try:
            steps(t, 300)
        finally:
            torch.set_num_threads(threads)
        trained = t.last_eval["loss"]
        assert trained < untrained - 2.0, (untrained, trained)


class TestResume:
    """A run stopped and resumed has the same losses and weights as one that was not."""

    def test_exact(self, tmp_path: Path) -> None:
        # 7 inner steps an outer step: 12 steps cross an outer step and an evaluation (every 10).
        first = cpu_run(small_lm_sets(tmp_path / "a", "train.max_steps=6"))[0].trainer
        losses = steps(first, 6)
        first.checkpoint("stop")
        second = cpu_run(small_lm_sets(tmp_path / "a"))[0].trainer
        assert second.resume()
        p = second.progress
        assert (p.global_step, p.outer_step, p.inner_step) == (6, 0, 6)
        losses += steps(second, 6)
        straight = cpu_run(small_lm_sets(tmp_path / "b"))[0].trainer
        expected = steps(straight, 12)
        assert losses == expected
        assert straight.progress == second.progress and straight.progress.outer_step == 1
        assert straight.last_eval == second.last_eval and "loss" in second.last_eval
        a, b = params(second), params(straight)
        assert all(torch.equal(a[k], b[k]) for k in a)


class TestEvaluation:
    """Loss, perplexity and bits per byte: the log line, the metrics, /status."""

    def test_line_metrics_and_status(self, tmp_path: Path) -> None:
        from structlog.testing import capture_logs

        run, registry, state = cpu_run(small_lm_sets(tmp_path, "lm.eval_every_steps=3"))
        with capture_logs() as logs:
            steps(run.trainer, 6)
        lines = [e for e in logs if str(e["event"]).startswith("Eval @ step")]
        assert [e["global_step"] for e in lines] == [3, 6]
        assert all(EVAL_LINE.match(e["event"]) for e in lines), lines
        ev = run.trainer.last_eval
        assert math.isclose(ev["perplexity"], math.exp(ev["loss"]), rel_tol=1e-9)
        # Bits per byte: the loss in bits over the bytes of text the targets cover (~2.5-4 bytes a token here).
        assert 0.15 < ev["bits_per_byte"] / (ev["loss"] / math.log(2)) < 0.5
        assert registry.get_sample_value("minerd_eval_loss") == ev["loss"]
        assert registry.get_sample_value("minerd_eval_bits_per_byte") == ev["bits_per_byte"]
        assert registry.get_sample_value("minerd_tokens_total") == 6 * 16 * 64
        assert registry.get_sample_value("minerd_tokens_per_second") > 0
        assert registry.get_sample_value("minerd_mfu_ratio") is None  # no known peak on a CPU
        s = build_status(state, 600)
        assert s.eval["loss"] == ev["loss"] and s.eval_global_step == 6 and s.tokens_total == 6 * 16 * 64
        assert s.separation_margin is None and s.mfu is None and s.tokens_per_second

    def test_mfu_with_a_configured_peak(self, tmp_path: Path) -> None:
        run, registry, _ = cpu_run(small_lm_sets(tmp_path, "telemetry.peak_tflops=0.05"))
        steps(run.trainer, 2)
        mfu = registry.get_sample_value("minerd_mfu_ratio")
        tps = registry.get_sample_value("minerd_tokens_per_second")
        flops = flops_per_token(run.trainer.model, 64)  # lm.seq_len of the small job
        assert mfu is not None and tps is not None
        n = sum(p.numel() for p in run.trainer.model.parameters())
        assert 6 * n < flops < 6 * n * 1.2  # tied embeddings count once; attention adds a little
        assert math.isclose(mfu, tps * flops / 0.05e12, rel_tol=1e-3)

    def test_loss_rises_count(self, tmp_path: Path) -> None:
        run, _, _ = cpu_run(small_lm_sets(tmp_path))
        task, t = run.task, run.trainer
        base = params(t)
        rises = []
        for std in (0.0, 0.05, 0.2, 0.5, 0.0):  # noisier weights, a worse loss each time; then back
            with torch.no_grad():
                for name, p in t.model.named_parameters():
                    p.copy_(base[name] + std * torch.randn_like(p))
            rises.append(task.evaluate(t.model, run.device, EvalPoint(1, 0), lambda: None).metrics["loss_rises"])
        assert rises == [0, 1, 2, 3, 0]


class TestHuggingFaceRevision:
    """A published revision loads with from_pretrained and gives the training model's logits."""

    def test_round_trip_verify_and_continue(self, tmp_path: Path) -> None:
        up = ("upload.enabled=true", "upload.min_inner_step=0", "upload.every_inner_steps=1000")
        run, _, _ = cpu_run(small_lm_sets(tmp_path / "s", *up))
        uploader = next(c for c in run.components if isinstance(c, Uploader))
        life = Lifecycle()
        life.start(uploader)
        t = run.trainer
        steps(t, 3)
        uploader.request_upload()
        steps(t, 1)
        assert uploader.wait_idle(60)
        life.stop_all(10)
        target = tmp_path / "s" / "uploads"
        rev = target / (target / "LATEST").read_text().strip()
        names = {p.name for p in rev.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "metadata.json"} <= names
        model = AutoModelForCausalLM.from_pretrained(str(rev), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(rev), local_files_only=True)
        ids = tok("import os\nprint(os.getcwd())\n", return_tensors="pt").input_ids
        t.model.eval()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, t.model(ids).logits)
        assert "lm_head.weight" not in load_file(str(rev / "model.safetensors"))  # tied, stored once
        assert verify_target(str(target)) == []
        # It says what it was trained on: the dataset, and the ids of its last window by digest.
        data = json.loads((rev / "metadata.json").read_text())["data"]
        assert data["dataset"] == run.task.data.index.digest and data["global_step"] == 4  # type: ignore[attr-defined]
        assert len(data["last_window_sample_ids_sha256"]) == 1 and data["windows"][0] == 0
        # Continue from the revision: its weights and its tokenizer.
        cont, _, _ = cpu_run(small_lm_sets(tmp_path / "c", f"lm.init_from={rev}"))
        got = cont.trainer.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
        # A revision whose weights are consistent with its manifest but broken is caught.
        weights = load_file(str(rev / "model.safetensors"))
        weights["model.norm.weight"][:] = float("nan")
        save_file(weights, str(rev / "model.safetensors"), metadata={"format": "pt"})
        manifest = json.loads((rev / "metadata.json").read_text())
        data = (rev / "model.safetensors").read_bytes()
        import hashlib

        manifest["files"]["model.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (rev / "metadata.json").write_text(json.dumps(manifest))
        (problem,) = verify_target(str(target))
        assert "non-finite loss" in problem


BAD_INPUTS = [
    ("lm.corpus=/no/such/corpus", "lm.corpus: no such file or directory"),
    ("lm.corpus={empty}", "lm.corpus: empty"),
    ("lm.corpus={tmp}/doc.pdf", "lm.corpus: unsupported file type .pdf"),
    ("lm.corpus={tmp}/notext.jsonl", 'lm.corpus: line 1 of'),
    ("lm.corpus={tmp}/loop/**/*.txt", "lm.corpus: the pattern matches no file"),  # ends, links to "." or not
    ("lm.corpus={tmp}/bomb.parquet", "lm.corpus: row group 1 of"),  # 1.3 GB of text in under 1 KB
    ("lm.tokenizer={tmp}/gap.json", "lm.tokenizer: the tokenizer can produce token id 5000, but the model has 4"),
    ("lm.tokenizer={tmp}/remote", "lm.tokenizer: its tokenizer_config.json names code to run (auto_map)"),
    ("lm.vocab_size=100", "lm.vocab_size: input should be greater than or equal to 512"),
    ("lm.seq_len=4096", "lm.seq_len: is over the model's 1024 positions (lm.preset=tiny)"),
    ("lm.init_from={tmp}", "lm.init_from: not a Hugging Face model directory (no config.json)"),
    ("mining.enabled=true", "config error: mining.enabled: hard-negative mining needs train.task=twotower "
                            "(got 'causal_lm')"),
]

# The exact line for the two inputs that crashed with exit 1 (a crash loop under a supervisor).
EXACT_LINES = [
    ("lm.corpus={tmp}/zerodir", "config error: lm.corpus: {tmp}/zerodir/zero.txt is a character device (a link "
                                "to /dev/zero), not a regular file: a corpus reads regular files only "
                                "(got '{tmp}/zerodir')"),
    ("lm.corpus={tmp}/deep.jsonl", "config error: lm.corpus: line 2 of {tmp}/deep.jsonl nests deeper than the JSON "
                                   "reader follows (got '" + "[" * 60 + "')"),
]


def bad_files(tmp: Path) -> None:
    """The bad inputs' files under ``tmp``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers

    (tmp / "empty").mkdir()
    (tmp / "doc.pdf").write_bytes(b"%PDF-1.4")
    (tmp / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (tmp / "zerodir").mkdir()
    (tmp / "zerodir" / "a.txt").write_text("text\n" * 100)
    (tmp / "zerodir" / "zero.txt").symlink_to("/dev/zero")
    (tmp / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    (tmp / "loop").mkdir()
    (tmp / "loop" / "one").symlink_to(".")
    (tmp / "loop" / "two").symlink_to(".")
    text = pa.DictionaryArray.from_arrays(pa.array([0] * 1300, pa.int32()), pa.array(["x" * 1_000_000]))
    pq.write_table(pa.table({"text": text}), tmp / "bomb.parquet", compression="zstd")
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 5000}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(tmp / "gap.json"))
    (tmp / "remote").mkdir()
    (tmp / "remote" / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["x.Tok", null]}}')


def run_bad(tmp: Path, setting: str) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    """`minerd run` on ``setting``: the process, its config error lines (the text of a JSON
    record's event), and its state directory."""
    state = tmp / "state"
    args = [sys.executable, "-m", "daemon", "run", "--set", f"paths.state_dir={state}",
            "--set", "api.enabled=false", "--set", "telemetry.log_format=json", "--set", setting]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [str(json.loads(line)["event"]) if line.startswith("{") else line
              for line in out.stderr.splitlines() if "config error" in line]
    return out, errors, state


@pytest.mark.integration
class TestBadInput:
    """`minerd run` refuses each bad input with one line and exit 2, writing nothing."""

    @pytest.mark.parametrize(("setting", "expected"), BAD_INPUTS, ids=[b[0].split("=")[0] + "-" + str(i)
                                                                        for i, b in enumerate(BAD_INPUTS)])
    def test_exit_2_one_line_nothing_written(self, tmp_path: Path, setting: str, expected: str) -> None:
        bad_files(tmp_path)
        setting = setting.format(tmp=tmp_path, empty=tmp_path / "empty")
        out, errors, state = run_bad(tmp_path, setting)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert len(errors) == 1 and expected in errors[0], out.stderr[-2000:]
        assert "Traceback" not in out.stdout + out.stderr
        assert not state.exists()

    @pytest.mark.parametrize(("setting", "expected"), EXACT_LINES, ids=["dev-zero", "nested-json"])
    def test_the_exact_line(self, tmp_path: Path, setting: str, expected: str) -> None:
        bad_files(tmp_path)
        out, errors, state = run_bad(tmp_path, setting.format(tmp=tmp_path))
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert errors == [expected.format(tmp=tmp_path)], out.stderr[-2000:]
        assert "Traceback" not in out.stdout + out.stderr
        assert not state.exists()


class TestTokenIds:
    """A tokenizer that can produce an id past the model's embedding rows is refused when the model is built."""

    def test_a_kept_tokenizer_grown_a_hole_is_refused(self, tmp_path: Path) -> None:
        from daemon.data.text import corpus, tokenizer
        from daemon.errors import CorruptState
        from daemon.run.catalog import load_config
        from daemon.tasks.causal_lm import text_spec
        from daemon.tasks.causal_lm.config import LmConfig

        # The tokenizer trained at the first start, then edited: an id past the model's rows
        # (lm.vocab_size=1024, the tokenizer's length 1025). The text source sizes no model:
        # the model's own rows decide.
        sets = small_lm_sets(tmp_path)
        spec = text_spec(LmConfig.of(load_config(sets=sets, environ={})))
        tokenizer.load_or_train(spec, corpus.discover(list(spec.corpus)), tmp_path / "lm")
        path = tmp_path / "lm" / "tokenizer.json"
        data = json.loads(path.read_text())
        data["model"]["vocab"]["zzqq"] = 5000
        path.write_text(json.dumps(data))
        with pytest.raises(CorruptState) as exc:
            cpu_run(sets)
        assert exc.value.line() == (
            f"corrupt state: {path}: the tokenizer can produce token id 5000, but the model has 1025 embedding rows "
            "(the model's input embedding): every id must be below 1025; restore the state directory from a backup")

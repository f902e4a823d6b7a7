"""``twotower.init_from``: towers that start from a local Hugging Face model (a causal
language model, as the causal_lm task publishes, or an encoder), mean-pooled, with the
model's own tokenizer; and the directories it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from daemon.data.text.tokenizer import train_bpe, wrap
from daemon.engine.protocols import BatchPos, EvalPoint
from daemon.run.local import cpu_run
from daemon.sharding import weights_digest, whole_weights
from daemon.tasks.twotower.pretrained import PretrainedTower
from tests.conftest import cli
from tests.test_retrieval_text import LINE, assert_exact_resume, rows, sets, write_jsonl


def texts() -> list[str]:
    return [str(r[k]) for r in rows() for k in ("query", "document")]


def model_dir(folder: Path, kind: str = "llama", hidden: int = 32) -> Path:
    """A small model of ``kind`` and a BPE trained on the test pairs, saved as a revision is."""
    tok = wrap(train_bpe(texts(), 300))
    vocab = len(tok)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=512, tie_word_embeddings=True))
    else:
        model = BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=512))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class TestPretrainedTowers:
    def test_a_causal_lm_directory_starts_both_towers_mean_pooled(self, tmp_path: Path) -> None:
        folder = model_dir(tmp_path / "lm")
        path = write_jsonl(tmp_path / "p.jsonl", rows())
        run = cpu_run(sets(tmp_path / "s", path, f"twotower.init_from={folder}", "embeddings.enabled=false")).run
        model = run.trainer.model
        assert isinstance(model.query, PretrainedTower) and isinstance(model.doc, PretrainedTower)
        # The tower is the base model's hidden states averaged over the real tokens (identity map:
        # hidden 32 = embed_dim 32), the ids the directory's own tokenizer gives.
        base = AutoModel.from_pretrained(str(folder), local_files_only=True)
        ids = run.task.corpus.doc_feats[:4]
        mask = ids > 0
        width = int(mask.sum(1).max())
        with torch.no_grad():
            hidden = base(input_ids=(ids[:, :width] - 1).clamp(min=0),
                          attention_mask=mask[:, :width].long()).last_hidden_state
            expected = (hidden * mask[:, :width, None]).sum(1) / mask[:, :width].sum(1, keepdim=True)
            assert torch.allclose(model.doc(ids), expected, atol=1e-5)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        first = rows()[0]["document"]
        want = [t + 1 for t in tok(str(first))["input_ids"]][: ids.shape[1]]
        got = run.task.corpus.doc_feats[0]
        assert got[: len(want)].tolist() == want  # the directory's tokenizer, not a BPE of its own
        before = weights_digest(whole_weights(model))
        for _ in range(4):
            run.trainer.inner_step()
        assert weights_digest(whole_weights(model)) != before
        result = run.task.evaluate(model, run.device, EvalPoint(1, 4), lambda: None)
        assert LINE.fullmatch(result.line), result.line

    def test_an_encoder_of_another_width_and_exact_resume(self, tmp_path: Path) -> None:
        folder = model_dir(tmp_path / "bert", kind="bert", hidden=48)
        path = write_jsonl(tmp_path / "p.jsonl", rows())
        extra = (f"twotower.init_from={folder}", "mining.enabled=false")
        run = cpu_run(sets(tmp_path / "g", path, *extra)).run
        model = run.trainer.model
        assert model.doc.proj.weight.shape == (32, 48)
        # Every parameter trains (BERT's pooler is left out: DDP refuses weights without a gradient).
        run.task.loss(model, run.task.get_batch(torch.arange(32), run.device, BatchPos(1, 0)), 1).backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        assert_exact_resume(lambda state: sets(state, path, *extra), tmp_path, 2)


class TestRefused:
    def cfg(self, tmp_path: Path, folder: Path | str, corpus: str = "pairs") -> tuple[int, str, str]:
        path = write_jsonl(tmp_path / "p.jsonl", rows(20))
        extra = [f"twotower.pairs={path}"] if corpus == "pairs" else []
        args = ["train.task=twotower", f"twotower.corpus={corpus}", f"twotower.init_from={folder}", *extra]
        return cli("config", "validate", *[a for s in args for a in ("--set", s)])

    def test_a_directory_with_code(self, tmp_path: Path) -> None:
        folder = model_dir(tmp_path / "m")
        (folder / "modeling_evil.py").write_text("import os\nos.system('touch /tmp/owned')\n")
        code, out, err = self.cfg(tmp_path, folder)
        assert code == 2 and err.strip() == (f"config error: twotower.init_from: holds Python code (modeling_evil.py); "
                                             f"a model's own code is never run (got {str(folder)!r})"), out + err

    def test_a_tokenizer_past_the_model_rows(self, tmp_path: Path) -> None:
        folder = model_dir(tmp_path / "m")
        config = json.loads((folder / "config.json").read_text())
        config["vocab_size"] = 100
        (folder / "config.json").write_text(json.dumps(config))
        code, out, err = self.cfg(tmp_path, folder)
        assert code == 2 and len(err.strip().splitlines()) == 1, out + err
        assert "twotower.init_from: the tokenizer can produce token id" in err and "100 embedding rows" in err

    @pytest.mark.parametrize("what", ["missing", "no_config", "synthetic"])
    def test_one_line_each(self, tmp_path: Path, what: str) -> None:
        folder: Path | str = tmp_path / "none"
        corpus = "pairs"
        if what == "no_config":
            folder = tmp_path / "empty"
            folder.mkdir()
        elif what == "synthetic":
            folder, corpus = model_dir(tmp_path / "m"), "synthetic"
        code, out, err = self.cfg(tmp_path, folder, corpus)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "twotower.init_from:" in err, out + err
        assert "Traceback" not in out + err

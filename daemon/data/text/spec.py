"""What a text task asks of the text data source (plain data: no model library)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextSpec:
    """A corpus and its tokenizer, as one task's config section names them."""

    section: str  # the section whose keys these are ("lm"): error lines name "lm.corpus"
    corpus: tuple[str, ...]  # files, directories or globs; empty = the standard library
    tokenizer: str  # a tokenizer.json or a tokenizer directory; "" = a BPE trained on the corpus
    init_from: str  # a model directory whose tokenizer to use when ``tokenizer`` is ""
    vocab_size: int  # of the BPE trained on the corpus
    eval_fraction: float  # share of documents held out, chosen by a hash of their key
    # The input-embedding rows of the model a named tokenizer feeds, when the task knows
    # them before any model is built (a model to continue from); None: the model is sized
    # from the tokenizer, one row per token. A named tokenizer producing an id at or above
    # them is refused before the corpus is tokenised.
    embedding_rows: int | None = None
    dataset: str = ""  # a prepared dataset to read instead of preparing the corpus
    cache_dir: str = ""  # where an s3:// dataset's shards are kept ("" = <state_dir>/data/cache)
    cache_bytes: int = 2 << 30

    def key(self, name: str) -> str:
        return f"{self.section}.{name}"

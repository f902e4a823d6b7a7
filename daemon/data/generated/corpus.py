"""The generated two-tower corpus: documents in clusters of near-duplicates, and queries.

The corpus is generated deterministically from its spec (``twotower.seed`` and the
sizes) and written once to ``<state_dir>/data``. Documents come in clusters of
near-duplicates (a shared latent centre plus a small offset) so that a document's
siblings are the hard negatives: in-batch negatives are almost never siblings, which is
what makes FAISS mining worth its cost. Queries see the latent through a different,
non-linear view plus noise, so the query tower has real work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load

from daemon import atomic
from daemon.data.generated.spec import GeneratedSpec
from daemon.disk import save_safetensors
from daemon.plugin.parts import BuildContext

log = structlog.get_logger(__name__)

LATENT_DIM = 32
SIBLING_SPREAD = 0.25  # offset of a document from its cluster centre (latent units)
QUERY_NOISE = 0.2  # 0.3 made siblings nearly Bayes-indistinguishable: mining could not help (bench/mining.py)
DOC_NOISE = 0.02
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Alternates:
    """Zero or more rows of token ids per training document: document ``i``'s are the rows
    ``rows[start[i]:start[i + 1]]`` of ``feats`` (its further queries, or the negatives its
    pairs name). ``rows`` lets documents share a row: a negative many pairs name is held once."""

    feats: torch.Tensor  # [M, L] int64 token ids
    start: torch.Tensor  # [N_train + 1] int64, non-decreasing, start[0] = 0
    rows: torch.Tensor  # [start[-1]] int64 row numbers of feats

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def counts(self, ids: torch.Tensor) -> torch.Tensor:
        return self.start[ids + 1] - self.start[ids]

    def turn(self, ids: torch.Tensor, turn: int) -> torch.Tensor:
        """The row of ``feats`` each of ``ids`` takes at ``turn``, its rows taking turns (one per
        epoch, say); -1 where it has none."""
        n = self.counts(ids)
        has = n > 0
        out = torch.full_like(ids, -1)
        out[has] = self.rows[self.start[ids[has]] + turn % n[has]]
        return out


@dataclass(frozen=True)
class TextInfo:
    """What a corpus of real text adds: its features are token ids (0 = padding), from a BPE of
    ``vocab_size`` ids (shifted by one), and each id's inverse document frequency over the
    training documents (the towers' lexical start).

    A document that several training pairs answer keeps every query: ``Corpus.query_feats``
    holds its first, ``queries`` the others, and the epochs take turns among them. The
    negatives a pair names (``negatives``) are per document, never searched at evaluation.
    """

    vocab_size: int  # ids 1..vocab_size-1 are tokens, 0 is padding
    idf: torch.Tensor  # [vocab_size] float32
    queries: Alternates | None = None
    negatives: Alternates | None = None


@dataclass
class Corpus:
    """The two-tower task's data: document features and the training query of each document
    (float vectors of the generated corpus, or token ids of a text corpus)."""

    doc_feats: torch.Tensor  # [N, D] float32 (or [N, L] int64 token ids)
    query_feats: torch.Tensor  # [N_train, D] training query i belongs to document i
    eval_feats: torch.Tensor  # [Q, D] held-out queries
    eval_targets: torch.Tensor  # [Q] int64 document ids
    cluster_of: torch.Tensor  # [N] int64 (the generated corpus's clusters; one per document otherwise)
    text: TextInfo | None = None  # a text corpus's tokens

    @property
    def num_train(self) -> int:
        """Documents trained on (the first ones; held-out queries' documents may follow them,
        searched at evaluation but never trained)."""
        return int(self.query_feats.shape[0])


def _params(d: GeneratedSpec) -> dict[str, float | int]:
    return {
        "version": FORMAT_VERSION,
        "num_docs": d.num_docs,
        "eval_queries": d.eval_queries,
        "dim": d.dim,
        "cluster_size": d.cluster_size,
        "seed": d.seed,
        "latent": LATENT_DIM,
        "spread": SIBLING_SPREAD,
        "qnoise": QUERY_NOISE,
    }


def generate_corpus(d: GeneratedSpec) -> Corpus:
    gen = torch.Generator().manual_seed(d.seed)
    n, dim = d.num_docs, d.dim
    n_clusters = (n + d.cluster_size - 1) // d.cluster_size
    centres = F.normalize(torch.randn(n_clusters, LATENT_DIM, generator=gen), dim=1)
    cluster_of = torch.arange(n) // d.cluster_size
    offsets = torch.randn(n, LATENT_DIM, generator=gen) * (SIBLING_SPREAD / LATENT_DIM**0.5)
    latent = F.normalize(centres[cluster_of] + offsets, dim=1)
    doc_map = torch.randn(LATENT_DIM, dim, generator=gen) / LATENT_DIM**0.5
    query_map = torch.randn(LATENT_DIM, dim, generator=gen) * (2.0 / LATENT_DIM**0.5)

    def query_view(z: torch.Tensor) -> torch.Tensor:
        clean = torch.tanh(z @ query_map)
        return clean + QUERY_NOISE * torch.randn(clean.shape, generator=gen)

    doc_feats = latent @ doc_map + DOC_NOISE * torch.randn(n, dim, generator=gen)
    query_feats = query_view(latent)
    eval_targets = torch.randint(0, n, (d.eval_queries,), generator=gen)
    eval_feats = query_view(latent[eval_targets])
    return Corpus(doc_feats.float(), query_feats.float(), eval_feats.float(), eval_targets, cluster_of)


def corpus_path(spec: GeneratedSpec, data_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps(_params(spec), sort_keys=True).encode()).hexdigest()[:12]
    return data_dir / f"twotower-{digest}.safetensors"


def load_or_generate(spec: GeneratedSpec, data_dir: Path) -> Corpus:
    params = _params(spec)
    path = corpus_path(spec, data_dir)
    if path.exists():
        try:
            # Read through Python's file API, which releases the GIL while the
            # storage blocks: a hung read then leaves the API and watchdog alive.
            t = load(path.read_bytes())
            return Corpus(t["doc_feats"], t["query_feats"], t["eval_feats"], t["eval_targets"], t["cluster_of"])
        except (SafetensorError, KeyError, OSError) as exc:
            log.warning("generated corpus unreadable; generating it again", path=str(path), error=str(exc))
    log.info("generating the two-tower corpus", path=str(path), **params)
    corpus = generate_corpus(spec)
    tensors = {
        "doc_feats": corpus.doc_feats,
        "query_feats": corpus.query_feats,
        "eval_feats": corpus.eval_feats,
        "eval_targets": corpus.eval_targets,
        "cluster_of": corpus.cluster_of,
    }
    atomic.write_with(path, lambda tmp: save_safetensors(tensors, tmp, metadata={"params": json.dumps(params)}))
    return corpus


def build(ctx: BuildContext, spec: GeneratedSpec) -> Corpus:
    return load_or_generate(spec, ctx.cfg.state_dir / "data")

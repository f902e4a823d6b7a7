"""Trainable per-row embeddings: memory or chunked-disk storage with L1/L2 memory tiers.

See :mod:`daemon.tasks.twotower.embeddings.store` for the design and its guarantees.
"""

from daemon.tasks.twotower.embeddings.chunkfile import EmbeddingStoreCorrupt
from daemon.tasks.twotower.embeddings.metrics import EmbeddingCacheCollector
from daemon.tasks.twotower.embeddings.optim import SparseRowAdam, apply_sparse_sgd
from daemon.tasks.twotower.embeddings.store import EmbeddingStore

# The name of the embedding manager class that existing training code constructs, so that code
# can switch by changing an import.
TrainableEmbeddingManager = EmbeddingStore

__all__ = [
    "EmbeddingCacheCollector",
    "EmbeddingStore",
    "EmbeddingStoreCorrupt",
    "SparseRowAdam",
    "TrainableEmbeddingManager",
    "apply_sparse_sgd",
]

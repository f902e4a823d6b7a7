"""Compressed pseudo-gradients: the codec (``codec.py``), its files (``artifact.py``), the
outer sync that sends it (``sync.py``) and what it costs (``stats.py``)."""

from daemon.compression.codec import CODECS, CodecSpec, Encoded, ErrorFeedback, decode, encode
from daemon.compression.stats import CompressionStats

__all__ = ["CODECS", "CodecSpec", "CompressionStats", "Encoded", "ErrorFeedback", "decode", "encode"]

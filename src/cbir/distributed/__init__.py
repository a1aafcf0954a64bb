"""Past one machine: Ray Data extraction into Parquet embeddings, and their import.

Everything here needs the ``distributed`` extra (``pip install 'cbir[distributed]'``) and
imports it lazily (:mod:`cbir.distributed.deps`), so ``import cbir`` never does.
See docs/scaling-out.md.
"""

from cbir.distributed.deps import MissingExtraError, require
from cbir.distributed.embeddings import Embeddings, EmbeddingsError, EmbeddingsFolder

__all__ = ["Embeddings", "EmbeddingsError", "EmbeddingsFolder", "MissingExtraError", "require"]

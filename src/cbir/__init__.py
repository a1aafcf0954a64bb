"""cbir: content-based image retrieval with global descriptors.

The public Python API; the ``cbir`` command and the HTTP server are thin layers over it.
"""

from cbir.data import DecodeError, Preprocess, list_images, load_image
from cbir.errors import CbirError
from cbir.eval import evaluate_gpr1200, evaluate_labelled
from cbir.extract import ExtractionResult, extract, iter_extract
from cbir.models import Descriptor, Whitening, build_descriptor

__version__ = "0.1.0"

__all__ = [
    "CbirError",
    "DecodeError",
    "Descriptor",
    "ExtractionResult",
    "Preprocess",
    "Whitening",
    "__version__",
    "build_descriptor",
    "evaluate_gpr1200",
    "evaluate_labelled",
    "extract",
    "iter_extract",
    "list_images",
    "load_image",
]

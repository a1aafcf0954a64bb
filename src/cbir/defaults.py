"""Default values shared by the library and the command line, in a module that imports nothing.

The ``cbir`` command declares its options (and their help texts) before it knows which command
will run; reading the defaults from here keeps ``cbir --help`` from importing torch, FAISS or
ONNX Runtime. The modules that use a default import it from here, so each value is written once.
"""

from __future__ import annotations

import math

#: The index folder of ``cbir index`` / ``search`` / ``serve`` when ``--db`` is not given.
DEFAULT_DB = ".cbir"
#: Default limit on width*height (about 16k x 6k). Larger files are skipped and reported.
DEFAULT_MAX_PIXELS = 100_000_000
#: The backbone of the default descriptor (EfficientNet-Lite0, weights shipped on PyPI).
DEFAULT_BACKBONE = "efficientnet-lite0"
#: Multi-scale set of Radenovic et al. 2018.
RADENOVIC_SCALES = (1.0, 2**-0.5, 0.5)
#: Per-epoch learning-rate decay of Radenovic et al. (cirtorch's ``exp(-0.01)``).
RADENOVIC_LR_DECAY = math.exp(-0.01)
#: Diffusion graph neighbours and query seeds, sized for small collections (Iscen et al. 2017).
DIFFUSION_K = 20
DIFFUSION_KQ = 10
#: Weight exponent of alpha-QE and alpha-DBA (Radenovic et al. 2018).
DEFAULT_ALPHA = 3.0
#: ``cbir extract --ray``: images per Ray block (one actor call, one retry unit, one Parquet
#: shard of ~5 MB at 1280-d). Each block costs a task round trip and a shard write in other
#: processes, which on a small node take a core from the model's threads: on two cores the
#: describing calls ran at 70 images/s with 256-image blocks and 104 with 1024.
BLOCK_ROWS = 1024

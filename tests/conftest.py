"""Suite-wide set-up. Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, hence here rather than in a test file.
torch.compile's caches go to a fresh directory per run: a cache left by an older version of the custom
ops (another signature) would otherwise replay graphs that call them with the old arguments.
"""
import os
import tempfile

import torch

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="routeformer-inductor-"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

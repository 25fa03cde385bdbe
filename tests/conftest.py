"""Suite-wide set-up. Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, hence here rather than in a test file.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

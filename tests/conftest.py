import os

import torch

# Without a GPU, run the Triton kernels in Triton's CPU interpreter so that CI tests the kernel
# code itself. Triton decides this when a kernel is decorated, so it must precede importing hf_fused.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Tensor parallelism (transformers' tp_plan="auto"): two ranks under torchrun, on gloo over
CPUs here and on NCCL where two GPUs are present. The checks run in tests/tp_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fused.models import build_random_model

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs, or none (gloo on CPU)")
def test_two_ranks_patch_their_own_heads(tmp_path):
    build_random_model("tiny-llama").save_pretrained(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    assert run.stdout.count(": ok") == 2, run.stdout

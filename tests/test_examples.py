"""The examples' main() end to end on a tiny random model on CPU: they run, report and write results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_tps_writes_results(tmp_path, capsys):
    compare_tps = load("compare_tps")
    argv = ["--shape", "tiny-llama", "--device", "cpu", "--batch-sizes", "1,2", "--prompt-len", "8",
            "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path)]
    assert compare_tps.main(argv) == 0
    out = capsys.readouterr().out
    assert "the Triton kernel needs a GPU for speed" in out
    assert "| mode | batch | unpatched tok/s | patched tok/s | speedup |" in out

    (json_path,) = tmp_path.glob("tiny-llama-cpu-*.json")
    result = json.loads(json_path.read_text())
    meta = result["meta"]
    assert meta["verify"]["ok"] and meta["verify"]["top1_agreement"] == 1.0
    assert meta["patched_layers"] == 2 and meta["weight_bytes"] > 0
    assert {"torch", "triton", "transformers", "device", "date"} <= set(meta["environment"])
    cells = {(r["mode"], r["batch"], r["variant"]): r for r in result["results"]}
    assert set(cells) == {(m, b, v) for m in ("eager", "hf-static", "fast-loop") for b in (1, 2)
                          for v in ("unpatched", "patched")}
    for key, cell in cells.items():
        assert "error" not in cell, key
        assert cell["tok_s"] > 0 and cell["ms_per_token"] > 0 and cell["gb_s"] > 0, key
        assert cell["speedup"] > 0 and len(cell["times_full_s"]) == 1, key
    # The chart is optional (matplotlib is a demo extra), but when it is there it is written.
    if importlib.util.find_spec("matplotlib") is not None:
        assert json_path.with_suffix(".png").stat().st_size > 0


def test_compare_tps_patches_the_chosen_fusions(tmp_path, capsys):
    argv = ["--shape", "tiny-llama", "--device", "cpu", "--modes", "eager", "--batch-sizes", "1", "--prompt-len", "8",
            "--new-tokens", "2", "--repeats", "1", "--fuse", "qkv,mlp", "--out", str(tmp_path)]
    assert load("compare_tps").main(argv) == 0
    assert "fuse=qkv+mlp" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("tiny-llama-cpu-*.json")
    meta = json.loads(json_path.read_text())["meta"]
    assert meta["fuse"] == ["qkv", "mlp"] and meta["patched_layers"] == 2 and meta["verify"]["ok"] and meta["verify"]["top1_agreement"] == 1.0


def test_compare_tps_rejects_unknown_mode():
    with pytest.raises(SystemExit):
        load("compare_tps").main(["--shape", "tiny-llama", "--modes", "warp-drive"])


@pytest.mark.parametrize("extra", [[], ["--static-compile"], ["--no-patch"]], ids=["patched", "static", "stock"])
def test_generate_streams_tokens(capsys, extra):
    generate = load("generate")
    assert generate.main(["--shape", "tiny-llama", "--device", "cpu", "--max-new-tokens", "5", *extra]) == 0
    out = capsys.readouterr().out
    if "--no-patch" in extra:
        assert "not patched" in out
    else:
        assert "patched: 2 llama layers; kernel: " in out and "top-1 agreement 100.0%" in out
    streamed = out.split("-" * 60)[1].split()
    assert len(streamed) == 5 and all(t.isdigit() for t in streamed)


ROOT = EXAMPLES.parent
# The README's tokens-per-second tables and the runs they come from (--table reprints a run's JSON).
README_TPS_RUNS = ["tps_smollm2-135m_h100.json", "tps_llama3-8b_tp2_h100.json", "tps_llama3-8b_device-map2_h100.json"]


@pytest.mark.parametrize("run", README_TPS_RUNS)
def test_readme_tps_tables_are_the_committed_runs(run, capsys):
    assert load("compare_tps").main(["--table", str(ROOT / "docs" / run)]) == 0
    header, rest = capsys.readouterr().out.strip().split("\n", 1)
    # The README ends the header line with two spaces, a markdown line break.
    assert f"{header}  \n{rest}" in (ROOT / "README.md").read_text()


def test_readme_8b_table_is_the_printed_run():
    """That run's JSON did not come back from the GPU machine; its printed output is committed."""
    printed = (ROOT / "docs" / "tps_llama3-8b_qkv-mlp-gemv_h100.txt").read_text()
    header, rest = printed[printed.index("llama3-8b (random weights), bfloat16"):].strip().split("\n", 1)
    assert f"{header}  \n{rest}" in (ROOT / "README.md").read_text()

"""The examples' main() end to end on a tiny random model on CPU: they run, report and write results."""

from __future__ import annotations

import importlib.util
import json
import sys
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
            "--new-tokens", "4", "--repeats", "1", "--peers", "none", "--out", str(tmp_path)]
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
            "--new-tokens", "2", "--repeats", "1", "--fuse", "qkv,mlp", "--peers", "none", "--out", str(tmp_path)]
    assert load("compare_tps").main(argv) == 0
    assert "fuse=qkv+mlp" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("tiny-llama-cpu-*.json")
    meta = json.loads(json_path.read_text())["meta"]
    assert meta["fuse"] == ["qkv", "mlp"] and meta["patched_layers"] == 2 and meta["verify"]["ok"] and meta["verify"]["top1_agreement"] == 1.0


def test_compare_tps_measures_another_fusion_set_in_the_same_run(tmp_path, capsys):
    argv = ["--shape", "tiny-llama", "--device", "cpu", "--modes", "eager", "--batch-sizes", "1", "--prompt-len", "8",
            "--new-tokens", "2", "--repeats", "1", "--fuse", "qkv", "--also-fuse", "qkv,mlp,gemv,attention",
            "--peers", "none", "--out", str(tmp_path)]
    assert load("compare_tps").main(argv) == 0
    out = capsys.readouterr().out
    assert "| fuse=qkv+mlp+gemv+attention tok/s | fuse=qkv+mlp+gemv+attention speedup |" in out
    (json_path,) = tmp_path.glob("tiny-llama-cpu-*.json")
    run = json.loads(json_path.read_text())
    assert run["meta"]["also_fuse"] == [["qkv", "mlp", "gemv", "attention"]]
    assert run["meta"]["verify_also_fuse"]["fuse=qkv+mlp+gemv+attention"]["ok"]
    variants = [r["variant"] for r in run["results"]]
    assert variants == ["unpatched", "patched", "fuse=qkv+mlp+gemv+attention"]
    assert all(r["tok_s"] > 0 and r["speedup"] > 0 for r in run["results"])


def test_compare_tps_keeps_each_cell_as_it_ends(tmp_path, capsys, monkeypatch):
    """A run stopped before its end (a GPU call's time limit) keeps the cells it measured."""
    compare_tps = load("compare_tps")
    measure = compare_tps.measure_cell
    timed_cells = []

    def measure_then_stop(model, mode, batch, *args):
        if len(timed_cells) == 3:
            raise KeyboardInterrupt  # stands in for the time limit's kill
        timed_cells.append((mode, batch))
        return measure(model, mode, batch, *args)

    monkeypatch.setattr(compare_tps, "measure_cell", measure_then_stop)
    argv = ["--shape", "tiny-llama", "--device", "cpu", "--modes", "eager,fast-loop", "--batch-sizes", "1",
            "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--peers", "none", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        compare_tps.main(argv)
    out = capsys.readouterr().out
    assert "unpatched eager batch 1: " in out and "patched eager batch 1: " in out and " tok/s, " in out
    (json_path,) = tmp_path.glob("tiny-llama-cpu-*.json")
    results = json.loads(json_path.read_text())["results"]
    assert [(r["variant"], r["mode"]) for r in results] == [("unpatched", "eager"), ("unpatched", "fast-loop"),
                                                             ("patched", "eager")]
    assert results[2]["speedup"] > 0
    assert compare_tps.main(["--table", str(json_path)]) == 0


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
README_TPS_RUNS = ["tps_smollm2-135m_h100.json", "tps_llama3-8b_tp2_h100.json", "tps_llama3-8b_device-map2_h100.json",
                   "h200/tps_llama3-8b_eager_liger_h200.json", "h200/tps_smollm2-135m_eager_liger_h200.json"]


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


# A short run: eager only, 2 new tokens. The liger peer is chosen per test.
TINY_RUN = ["--shape", "tiny-llama", "--device", "cpu", "--modes", "eager", "--batch-sizes", "1", "--prompt-len", "8",
            "--new-tokens", "2", "--repeats", "1"]


@pytest.mark.parametrize("liger", ["not asked for", "not installed"])
def test_compare_tps_samples_without_liger(tmp_path, capsys, monkeypatch, liger):
    compare_tps = load("compare_tps")
    argv = [*TINY_RUN, "--do-sample", "--temperature", "0.7", "--out", str(tmp_path)]
    if liger == "not asked for":
        argv += ["--peers", "none"]
    else:
        monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel now raises ImportError
    assert compare_tps.main(argv) == 0
    out = capsys.readouterr().out
    assert (compare_tps.LIGER_MISSING in out.splitlines()) == (liger == "not installed")
    assert "new tokens, sampled (T=0.7, top_k=50, top_p=1); " in out
    assert "| mode | batch | unpatched tok/s | patched tok/s | speedup | patched ms/token |" in out
    (json_path,) = tmp_path.glob("tiny-llama-cpu-*.json")
    result = json.loads(json_path.read_text())
    assert result["meta"]["peers"] == [] and "liger" not in result["meta"]
    assert result["meta"]["sampling"] == {"temperature": 0.7, "top_k": 50, "top_p": 1.0}
    assert sorted(r["variant"] for r in result["results"]) == ["patched", "unpatched"]


def test_compare_tps_refuses_liger_when_not_installed(capsys, monkeypatch):
    compare_tps = load("compare_tps")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(SystemExit):
        compare_tps.parse_args(["--peers", "liger"])
    assert compare_tps.LIGER_MISSING in capsys.readouterr().err


def test_compare_tps_sampling_options():
    parse_args = load("compare_tps").parse_args
    assert parse_args(["--peers", "none"]).sampling is None
    assert parse_args(["--peers", "none", "--do-sample", "--top-k", "0"]).sampling == {
        "temperature": 1.0, "top_k": 0, "top_p": 1.0}


@pytest.mark.parametrize("bad, message", [
    (["--temperature", "0.7", "--top-k", "5"], "sampling options without --do-sample: --temperature, --top-k"),
    (["--do-sample", "--temperature", "0"], "--temperature must be > 0"),
    (["--do-sample", "--top-k", "-1"], "--top-k must be >= 0"),
    (["--do-sample", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--do-sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
])
def test_compare_tps_rejects_bad_sampling(bad, message, capsys):
    with pytest.raises(SystemExit):
        load("compare_tps").parse_args(["--peers", "none", *bad])
    assert message in capsys.readouterr().err


def test_compare_tps_table_shows_liger_and_its_failures(capsys):
    """A run's JSON with liger cells, one failed (Liger's dispatch under a fullgraph compile), reprinted."""
    compare_tps = load("compare_tps")
    run = json.loads((ROOT / "docs" / "tps_smollm2-135m_h100.json").read_text())
    run["meta"] |= {"peers": ["liger"], "liger": {"version": "0.8.5"},
                    "sampling": {"temperature": 0.7, "top_k": 50, "top_p": 0.9}}
    run["results"] += [
        {"mode": "eager", "batch": 1, "variant": "liger", "tok_s": 50.0, "speedup": 1.152},
        {"mode": "fast-loop", "batch": 1, "variant": "liger",
         "error": "Unsupported: Skip calling `torch.compiler.disable()`d function\n  Explanation: Skip "
                  "calling function `<function dispatch at 0x7f7c48a12ca0>` since it was wrapped with ..."},
    ]
    table = compare_tps.markdown_table(run["results"], run["meta"])
    assert "transformers 5.17.0, liger-kernel 0.8.5; " in table
    assert "new tokens, sampled (T=0.7, top_k=50, top_p=0.9); " in table
    assert "| speedup | liger tok/s | liger speedup | patched ms/token |" in table
    assert "| eager | 1 | 43.4 | 34.0 | 0.78x | 50.0 | 1.15x | 29.39 |" in table
    assert ("| fast-loop | 1 | 604.1 | 726.2 | 1.20x | fails: Unsupported: Skip calling `torch.compiler.disable()`d "
            "function | - | 1.38 |") in table
    assert compare_tps.short_reason("RuntimeError: " + "x" * 100 + "\nmore") == "RuntimeError: " + "x" * 57 + "…"


@pytest.mark.parametrize("run", sorted(p.name for p in (ROOT / "docs").glob("tps_*.json")))
def test_compare_tps_reprints_every_committed_run(run, capsys):
    """Runs from before --peers, --do-sample and --fuse print as greedy, without a liger column."""
    assert load("compare_tps").main(["--table", str(ROOT / "docs" / run)]) == 0
    out = capsys.readouterr().out
    assert "new tokens, greedy; " in out
    assert "| mode | batch | unpatched tok/s | patched tok/s | speedup | patched ms/token |" in out


def test_compare_tps_runs_liger_after_the_others(tmp_path, capsys, monkeypatch):
    """Liger on CPU: its Triton kernels need a GPU, so its cells may fail, but the run finishes and reports."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    # Liger replaces names in the modeling file for the whole process: put them all back afterwards.
    for name, value in vars(modeling_llama).items():
        if not name.startswith("__"):
            monkeypatch.setattr(modeling_llama, name, value)
    compare_tps = load("compare_tps")
    assert compare_tps.main([*TINY_RUN, "--peers", "liger", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("tiny-llama-cpu-*.json")
    result = json.loads(json_path.read_text())
    assert result["meta"]["liger"]["version"] == "0.8.5" and result["meta"]["peers"] == ["liger"]
    assert [r["variant"] for r in result["results"]] == ["unpatched", "patched", "liger"]
    unpatched, patched, liger = result["results"]
    assert "error" not in unpatched and "error" not in patched
    if "error" in liger:
        assert f"| fails: {compare_tps.short_reason(liger['error'])} | - |" in out
    else:
        assert liger["tok_s"] > 0 and f"| {liger['tok_s']:.1f} | {liger['speedup']:.2f}x |" in out

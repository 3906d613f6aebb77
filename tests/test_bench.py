"""The benchmark's tooling: its random real-shape models are valid GPT-Neo folders, and the
command runs end to end (its numbers are recorded in BENCHMARKS.md, not asserted here)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import GPTNeoForCausalLM

import neocore
from neocore.bench import write_random_model

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)


def test_random_125m_model_is_a_valid_checkpoint(tmp_path, caplog):
    folder = write_random_model("125M", tmp_path / "m")
    with caplog.at_level("WARNING", logger="neocore"):
        model = neocore.load(folder)
    assert not caplog.records, "the weights should be exact in bfloat16"
    assert model.config.num_parameters() == 125_198_592
    ref = GPTNeoForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = list(range(100, 140))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    ours = model.logits(ids)
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max() + 1e-5

    proc = subprocess.run([sys.executable, "-m", "neocore", "bench", "-m", str(folder), "--prompt-tokens", "8",
                           "--new-tokens", "4", "--threads", "1", "--dtype", "bfloat16,int8", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    bf16, int8 = json.loads(proc.stdout)
    assert [bf16["dtype"], int8["dtype"]] == ["bfloat16", "int8"] and int8["variant_of_first"]
    assert all(row["engine"] == "neocore" and row["decode_tok_s"] > 0 and row["peak_rss"] > 0 for row in (bf16, int8))
    # each format's roofline is the measured bandwidth over its own bytes a token: 2 against 1 + 4/32
    assert int8["roofline_tok_s"] / bf16["roofline_tok_s"] == pytest.approx(2 / 1.125, rel=1e-3)


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "bfloat16,int4"], "unknown dtype 'int4' (bfloat16, float32, int8)"),
    (["--compute", "exact,fp8"], "unknown compute mode 'fp8' (exact, bf16)"),
    (["--serve", "--compute", "fp8"], "unknown compute mode 'fp8' (exact, bf16)"),  # before a server starts
])
def test_bench_refuses_an_unknown_weight_format_or_compute_mode(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "neocore", "bench", "-m", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"neocore: error: {message}"


def test_make_model_that_fails_leaves_no_half_made_folder(tmp_path, sigterm_when):
    """Without torch, --format bin says so before it writes anything; stopped while it writes
    (SIGTERM), make-model takes away what it wrote, so that the same command can run again."""
    (tmp_path / "no-torch" / "torch").mkdir(parents=True)
    (tmp_path / "no-torch" / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    proc = subprocess.run([sys.executable, "-m", "neocore", "bench", "--make-model", "125M", "--out",
                           str(tmp_path / "bin"), "--format", "bin"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "no-torch")})
    assert proc.returncode == 1 and proc.stderr == "neocore: error: --format bin needs torch (pip install torch)\n"
    assert not (tmp_path / "bin").exists()
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        command = [sys.executable, "-m", "neocore", "bench", "--make-model", "125M", "--out", str(out)]
        assert sigterm_when(command, (out / "model.safetensors.partial").exists) == 143
        assert list(out.iterdir()) == [] if out.name == "empty" else not out.exists()


def test_bench_runs_a_model_with_a_small_vocabulary(reference_models):
    odd = reference_models("odd")  # 1003 ids, 64 positions, no config the prompt's ids could exceed
    proc = subprocess.run([sys.executable, "-m", "neocore", "bench", "-m", str(odd.folder), "--prompt-tokens", "8",
                           "--new-tokens", "4", "--threads", "1", "--repeats", "1", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0


def test_bench_runs_an_int8_folder_in_int8_unless_told(reference_models, tmp_path):
    from neocore.convert import convert
    folder = convert(reference_models("odd").folder, tmp_path / "int8", dtype="int8")
    proc = subprocess.run([sys.executable, "-m", "neocore", "bench", "-m", str(folder), "--prompt-tokens", "8",
                           "--new-tokens", "4", "--threads", "1", "--repeats", "1", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["dtype"] == "int8"
    assert row["weight_pages"] == neocore.load(folder).weight_pages  # the run says where its weights lay


@pytest.mark.parametrize("flags, message", [
    (["--prompt-tokens", "60", "--new-tokens", "4"],
     "--prompt-tokens 60 and --new-tokens 4 .at least 8 warm-up steps. need 68 positions; the model has 64"),
    (["--prompt-tokens", "8", "--new-tokens", "57"], "need 65 positions; the model has 64"),
    (["--latency"], "--latency times steps up to position 2016; the model has 64"),
    (["--threads", "1,2,1"], "--threads names a count twice: '1,2,1'"),
])
def test_bench_refuses_what_cannot_run_before_measuring(reference_models, monkeypatch, flags, message):
    from neocore import bench
    odd = reference_models("odd")

    def measured(*_):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(bench, "memory_bandwidth", measured)
    monkeypatch.setattr(bench, "_spawn", measured)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["-m", str(odd.folder), "--prompt-tokens", "8", "--new-tokens", "4", *flags])
    with pytest.raises(neocore.NeocoreError, match=message):
        bench.run(args)


@pytest.mark.parametrize("nbytes, threads", [(0, 1), (5, 2), (8, 1), (4096 + 5, 2), (1 << 20, 3)])
def test_the_bandwidth_probe_reads_every_word(nbytes, threads):
    """The roofline's probe folds every 64-bit word it reads (a trailing part word is left), so
    its reading is of the whole array, at any thread count and in every way of prefetching."""
    from neocore import _core
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    expected = int(np.bitwise_xor.reduce(data[:nbytes // 8 * 8].view(np.uint64)))
    assert set(_core.PREFETCHES) == {"none", "nta-near", "l2-far"}
    for prefetch in _core.PREFETCHES:
        assert _core.read_stream(data, threads, prefetch) == expected
    with pytest.raises(ValueError, match="threads must be at least 1"):
        _core.read_stream(data, 0)
    with pytest.raises(ValueError, match="prefetch must be one of none, nta-near, l2-far, got 'l1'"):
        _core.read_stream(data, threads, "l1")
    if nbytes > 8:
        with pytest.raises(ValueError, match="aligned to 8 bytes"):
            _core.read_stream(data[1:], threads)

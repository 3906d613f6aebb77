"""The load benchmark drives a real server and counts what it generated."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_serve_benchmark_reports_every_client_count(reference_models):
    """One server for each thread count named (each a run of its own), each under every client count."""
    folder = reference_models("tiny").folder
    done = subprocess.run([sys.executable, "-m", "neocore", "bench", "--serve", "-m", str(folder), "--threads", "1,2",
                           "--clients", "1,3", "--new-tokens", "6", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    assert [(run["threads"], run["compute"]) for run in runs] == [(1, "exact"), (2, "exact")]
    assert all(run["dtype"] == "bfloat16" and run["dtype_asked"] is None for run in runs)  # an fp32 folder's default
    for run in runs:
        assert [r["clients"] for r in run["neocore"]] == [1, 3]
        for row in run["neocore"]:
            assert row["tokens"] == 6 * row["clients"]  # counted by the server, not assumed
            assert row["tok_s"] > 0 and row["ttft_p50"] <= row["ttft_p95"] and row["server_peak_rss_mib"] > 0
        assert run["prefill_tok_s"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--compare", "openvino"], "--serve compares with transformers only, got --compare openvino"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    (["--threads", "2,x"], "--threads takes comma-separated whole numbers >= 1, got '2,x'"),
])
def test_serve_benchmark_refuses_what_it_would_not_run(tmp_path, flags, message):
    """Before any server starts: a flag the load test cannot honour is refused, not ignored."""
    proc = subprocess.run([sys.executable, "-m", "neocore", "bench", "--serve", "-m", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"neocore: error: {message}"


def test_a_server_that_cannot_start_keeps_the_runs_before_it(reference_models, tmp_path):
    """An int8 folder cannot give bfloat16 weights: that server's refusal ends the bench in one
    line, after the int8 run it measured first is printed."""
    folder = tmp_path / "int8"
    subprocess.run([sys.executable, "-m", "neocore", "convert", str(reference_models("tiny").folder), str(folder),
                    "--dtype", "int8"], check=True, capture_output=True, timeout=120)
    done = subprocess.run([sys.executable, "-m", "neocore", "bench", "--serve", "-m", str(folder), "--threads", "1",
                           "--dtype", "int8,bfloat16", "--clients", "1", "--new-tokens", "3", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode != 0
    assert [(run["dtype"], run["neocore"][0]["tokens"]) for run in json.loads(done.stdout)] == [("int8", 3)]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("neocore: error: 1 threads, bfloat16 weights, exact: the server did not start: ")
    assert "holds neocore int8 weights" in last

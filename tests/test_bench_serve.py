"""The load benchmark drives a real server and counts what it generated."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_serve_benchmark_reports_every_client_count(reference_models):
    folder = reference_models("tiny").folder
    done = subprocess.run([sys.executable, "-m", "neocore", "bench", "--serve", "-m", str(folder), "--threads", "1",
                           "--clients", "1,3", "--new-tokens", "6", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [r["clients"] for r in result["neocore"]] == [1, 3]
    for row in result["neocore"]:
        assert row["tokens"] == 6 * row["clients"]  # counted by the server, not assumed
        assert row["tok_s"] > 0 and row["ttft_p50"] <= row["ttft_p95"] and row["server_peak_rss_mib"] > 0
    assert result["prefill_tok_s"] > 0

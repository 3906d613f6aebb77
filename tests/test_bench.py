"""The benchmark's tooling: its random real-shape models are valid GPT-Neo folders, and the
command runs end to end (its numbers are recorded in BENCHMARKS.md, not asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from transformers import GPTNeoForCausalLM

import neocore
from neocore.bench import write_random_model


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
                           "--new-tokens", "4", "--threads", "1", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["engine"] == "neocore" and row["decode_tok_s"] > 0 and row["peak_rss"] > 0

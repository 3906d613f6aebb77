"""Shared fixtures: random-weight GPT-Neo models written in the real Hugging Face formats,
built once per session, with transformers' GPTNeoForCausalLM (fp32, eager) as the reference."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from neocore.tokenizer import BUNDLED_GPT2

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
if IN_CI:  # the reference must be there: the tests that compare with it skip only outside CI
    import torch  # noqa: F401
    import transformers  # noqa: F401


def reference(module: str):
    """torch or transformers, imported when a test needs the reference: where it is missing
    (no torch build for Python 3.9) such tests are skipped (in CI conftest has imported it)."""
    return pytest.importorskip(module)


# Shapes of the test models. Small ones exercise the window edge with few tokens; "odd" has
# sizes that are not multiples of the SIMD width; "window256" has the real window;
# "wide-heads" has the 128-wide heads of the 1.3B and 2.7B models and their MLP's 8192-long rows
# (one row of x then outgrows L1 in the decode kernel).
SHAPES = {
    "tiny": dict(vocab_size=50257, max_position_embeddings=160, hidden_size=64, num_layers=4,
                 num_heads=4, attention_types=[[["global", "local"], 2]], window_size=8),
    "odd": dict(vocab_size=1003, max_position_embeddings=64, hidden_size=36, num_layers=3,
                num_heads=3, intermediate_size=100, window_size=5, layer_norm_epsilon=1e-3,
                attention_types=[[["local", "global", "local"], 1]]),
    "window256": dict(vocab_size=512, max_position_embeddings=700, hidden_size=32, num_layers=2,
                      num_heads=2, attention_types=[[["global", "local"], 1]], window_size=256),
    "wide-heads": dict(vocab_size=300, max_position_embeddings=96, hidden_size=256, num_layers=3,
                       num_heads=2, attention_types=[[["local"], 1], [["global"], 2]], window_size=16,
                       intermediate_size=8192),
    # fewer tokens than the 20 log-probabilities a request may ask for
    "few-tokens": dict(vocab_size=12, max_position_embeddings=32, hidden_size=16, num_layers=2,
                       num_heads=2, attention_types=[[["global", "local"], 1]], window_size=4),
    # transformers' default weight scale at a small size: 128-wide heads, the real window
    "default-init": dict(vocab_size=2000, max_position_embeddings=320, hidden_size=256, num_layers=4,
                         num_heads=2, attention_types=[[["global", "local"], 2]], window_size=256,
                         initializer_range=0.02),
    "gpt-neo-125M": dict(vocab_size=50257, max_position_embeddings=2048, hidden_size=768,
                         num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]],
                         window_size=256, initializer_range=0.02),
}
# Small models get larger weights so that greedy decoding does not repeat one token forever;
# at full width that would make the network chaotic (fp32 torch itself drifts from fp64 by
# ~1% of the logit range), so the 125M shape keeps transformers' default 0.02, and so does
# "default-init", where lossy arithmetic is judged (chaos would amplify any rounding).
SMALL_MODEL_INIT = 0.08


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """The GPT-2 vocab.json + merges.txt shipped inside the package."""
    return BUNDLED_GPT2


@dataclass
class Reference:
    """A random model: its Hugging Face folder (fp32 safetensors) and the torch model."""
    name: str
    folder: Path
    torch_model: object
    config: dict

    def logits(self, ids: list[int]) -> np.ndarray:
        torch = reference("torch")
        with torch.no_grad():
            return self.torch_model(torch.tensor([ids])).logits[0].numpy()

    def state_dict(self) -> dict:
        return self.torch_model.state_dict()


def random_model(shape: dict, seed: int = 0):
    """GPTNeoForCausalLM with weights that survive bf16 and fp16 storage unchanged, and biases and
    norms moved off their 0/1 init so that a dropped one shows."""
    torch, transformers = reference("torch"), reference("transformers")
    torch.manual_seed(seed)
    vocab = shape["vocab_size"]
    shape = {"initializer_range": SMALL_MODEL_INIT, **shape}
    config = transformers.GPTNeoConfig(**shape, bos_token_id=vocab - 1,
                                       eos_token_id=vocab - 1, attn_implementation="eager")
    model = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            p.copy_(p.to(torch.bfloat16).float())
            p[p.abs() < 1e-4] = 0.0  # below fp16's normal range, so fp16 files stay exact too
    return model


@pytest.fixture(scope="session")
def reference_models(tmp_path_factory):
    """reference_models(name) -> Reference, built once per session."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            model = random_model(SHAPES[name])
            model.save_pretrained(folder, safe_serialization=True)
            if SHAPES[name]["vocab_size"] == 50257:
                for f in ("vocab.json", "merges.txt"):
                    shutil.copy(BUNDLED_GPT2 / f, folder / f)
            cache[name] = Reference(name, folder, model, SHAPES[name])
        return cache[name]

    return get


def write_torch_bin(model, folder: Path, real_style_extras: bool = True) -> Path:
    """pytorch_model.bin via torch.save, with the buffers that old transformers wrote:
    per-layer attention.bias masks and masked_bias scalars, and lm_head tied to wte."""
    torch = reference("torch")
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    if real_style_extras:
        cfg = model.config
        n = cfg.max_position_embeddings
        causal = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
        for i, kind in enumerate(cfg.attention_layers):
            mask = torch.bitwise_xor(causal, torch.tril(causal, -cfg.window_size)) if kind == "local" else causal
            state[f"transformer.h.{i}.attn.attention.bias"] = mask
            state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
        state["lm_head.weight"] = state["transformer.wte.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    model.config.to_json_file(folder / "config.json")
    return folder


@pytest.fixture(scope="session")
def write_bin():
    return write_torch_bin


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """The issue's tolerance: max |diff| <= 1e-4 * max |logit| + 1e-5."""
    assert ours.shape == ref.shape
    bound = 1e-4 * float(np.abs(ref).max()) + 1e-5
    worst = float(np.abs(ours - ref).max())
    assert worst <= bound, f"max |diff| {worst:.3g} exceeds {bound:.3g}"


def _sigterm_when(command: list[str], ready, timeout: float = 60) -> int:
    """Runs command, sends it SIGTERM once ready() is true (waiting timeout seconds at most)
    and returns its exit status; the process is killed if it outlives the test."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the command ended before it was ready"
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def sigterm_when():
    """sigterm_when(command, ready, timeout=60) -> exit status: see _sigterm_when."""
    return _sigterm_when


@pytest.fixture(scope="session")
def logits_close():
    return assert_logits_close


def _edited_copy(src: Path, dst: Path, change, config: dict | None = None) -> Path:
    """A copy of the model folder src (config and tokenizer files too) whose weights
    change(tensors) edits, and whose config.json gets the fields in config."""
    import json
    from safetensors.torch import load_file, save_file
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copyfile(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    return dst


@pytest.fixture(scope="session")
def edited_copy():
    """edited_copy(src, dst, change, config=None): see _edited_copy."""
    return _edited_copy


@pytest.fixture(scope="session")
def padded_vocab(reference_models, tmp_path_factory) -> Path:
    """The "tiny" model with its vocabulary padded past the tokenizer's 50257 ids by 3 rows
    that win every argmax: the final norm's output leans on its bias b, and the rows are 20 b."""
    torch = reference("torch")

    def pad(tensors):
        tensors["transformer.ln_f.weight"] *= 0.1
        extra = 20 * tensors["transformer.ln_f.bias"].expand(3, -1)
        tensors["transformer.wte.weight"] = torch.cat([tensors["transformer.wte.weight"], extra])

    return _edited_copy(reference_models("tiny").folder, tmp_path_factory.mktemp("padded") / "model", pad,
                        {"vocab_size": 50260})

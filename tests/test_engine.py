"""The forward pass against transformers: logits, incremental decoding, greedy generation."""
from __future__ import annotations

import numpy as np
import pytest

import neocore
from neocore import _core

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)

ISAS = [isa for isa in _core.usable_isas() if isa != "scalar"]
DTYPES = ["bfloat16", "float32"]


def random_ids(vocab: int, n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, lengths", [
    ("tiny", [1, 5, 30]),        # window 8: 30 tokens is nearly 4 windows
    ("odd", [7, 21]),            # sizes that are no multiple of 8; window 5
    ("window256", [600]),        # the real window, well past it and across prefill chunks
    ("wide-heads", [9, 70]),     # head_dim 128, a local first layer, window 16
])
def test_logits_match_transformers(reference_models, logits_close, name, lengths, dtype, isa):
    ref = reference_models(name)
    model = neocore.load(ref.folder, dtype=dtype, isa=isa, threads=2)
    for n in lengths:
        ids = random_ids(ref.config["vocab_size"], n, seed=n)
        logits_close(model.logits(ids), ref.logits(ids))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["tiny", "wide-heads"])
def test_incremental_decoding_equals_full_sequence(reference_models, logits_close, isa, name):
    ref = reference_models(name)
    model = neocore.load(ref.folder, isa=isa)
    ids = random_ids(ref.config["vocab_size"], 40, seed=3)
    full = model.logits(ids)
    model.reset()
    steps = [model.append(ids[:6]).copy()]
    for token in ids[6:]:
        steps.append(model.append([token]).copy())
    logits_close(np.stack(steps), full[5:])


def test_chunked_prefill_matches_single_steps_past_the_window(reference_models, logits_close):
    """The ring-buffer trap: a prefill chunk must not overwrite keys its own early queries need."""
    ref = reference_models("window256")
    model = neocore.load(ref.folder, dtype="float32")
    ids = random_ids(ref.config["vocab_size"], 620, seed=5)
    model.append(ids[:300])         # fills the local ring, then wraps it
    chunked = model.append(ids[300:600]).copy()  # 300 > window: one chunk crosses a wrap
    model.reset()
    model.append(ids[:300])
    for token in ids[300:599]:
        model.append([token])
    stepped = model.append([ids[599]]).copy()
    logits_close(chunked[None], stepped[None])
    logits_close(chunked[None], ref.logits(ids[:600])[-1:])


@pytest.mark.parametrize("isa", ISAS)
def test_greedy_continuation_equals_transformers_generate(reference_models, isa):
    ref = reference_models("tiny")
    model = neocore.load(ref.folder, isa=isa)
    prompt = random_ids(ref.config["vocab_size"], 12, seed=7)
    with torch.no_grad():
        out = ref.torch_model.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                                       do_sample=False, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    assert len(set(expected)) > 8, "the reference continuation is degenerate; the test would prove little"
    assert model.generate_ids(prompt, max_new_tokens=64, stop_at_eos=False) == expected


@pytest.mark.parametrize("isa", ISAS)
def test_thread_count_does_not_change_a_bit(reference_models, isa):
    ref = reference_models("odd")
    ids = random_ids(ref.config["vocab_size"], 23, seed=11)
    one = neocore.load(ref.folder, isa=isa, threads=1).logits(ids)
    two = neocore.load(ref.folder, isa=isa, threads=2).logits(ids)
    three = neocore.load(ref.folder, isa=isa, threads=3).logits(ids)
    assert np.array_equal(one, two) and np.array_equal(one, three)


def test_real_125m_shape(reference_models, logits_close):
    """The full-size 125M shape (random weights): tied 50257 x 768 head, 12 layers, window 256."""
    ref = reference_models("gpt-neo-125M")
    model = neocore.load(ref.folder)
    ids = random_ids(50257, 300, seed=13)
    logits_close(model.logits(ids), ref.logits(ids))
    assert model.weight_bytes() < 0.52 * 4 * ref.torch_model.num_parameters()  # bf16: ~2 bytes/param


def test_context_limit_is_a_clear_error(reference_models):
    ref = reference_models("odd")  # 64 positions
    model = neocore.load(ref.folder)
    with pytest.raises(neocore.ContextError, match="64"):
        model.logits(random_ids(1003, 65))
    with pytest.raises(neocore.ContextError):
        model.generate_ids(random_ids(1003, 60), max_new_tokens=10)
    model.reset()
    model.append(random_ids(1003, 64))
    with pytest.raises(neocore.ContextError):
        model.append([1])
    assert model.position == 64
    small = neocore.load(ref.folder, context=16)
    with pytest.raises(neocore.ContextError, match="16"):
        small.logits(random_ids(1003, 17))


def test_out_of_range_token_is_refused(reference_models):
    model = neocore.load(reference_models("odd").folder)
    with pytest.raises(neocore.NeocoreError, match="token ids"):
        model.logits([1, 1003])
    with pytest.raises(neocore.NeocoreError, match="token ids"):
        model.logits([-1])


def test_concurrent_calls_do_not_corrupt_the_engine(reference_models):
    """One cache per model: calls from several threads are serialised, never interleaved in C."""
    import threading
    ref = reference_models("wide-heads")  # 96 positions
    model = neocore.load(ref.folder)
    ids = random_ids(300, 20, seed=21)
    expected = model.logits(ids)
    model.reset()
    errors = []

    def work():
        try:
            for token in random_ids(300, 30, seed=threading.get_ident() % 1000):
                model.append([token])
        except Exception as exc:  # noqa: BLE001 - any failure is the test's failure
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and model.position == 90
    with pytest.raises(neocore.ContextError):
        model.append(random_ids(300, 7))
    assert np.array_equal(model.logits(ids), expected)


def test_tokens_per_second_counts_every_token_of_the_last_ten_seconds():
    """The /metrics rate: tokens of the last 10 s over 10 s, however many (a 4096-entry
    history once capped it at 409.6), and none from before the window."""
    from neocore.engine import EngineStats
    stats = EngineStats()
    for i in range(3000):  # 3000 tokens over the first 5 s
        stats.add_token(1000.0 + i * 5 / 3000)
    for _ in range(4000):  # 7 s later, 4000 more at once
        stats.add_token(1012.0)
    # the window: the current 0.1 s bucket and the 99 before it, from t = 1002.1 on
    assert stats.tokens_per_second(now=1012.0) == pytest.approx((3000 * 2.9 / 5 + 4000) / 10, rel=0.01)
    assert stats.tokens_per_second(now=1030.0) == 0

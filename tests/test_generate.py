"""Text generation, sampling and scoring against transformers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import (GPTNeoForCausalLM, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import neocore
from neocore.convert import convert
from neocore.engine import Request
from neocore.sampling import SamplingParams, choose_rows, kth_largest, process_logits, process_rows
from neocore.weights import bf16_to_f32

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)

PROMPT = "The old lighthouse keeper climbed the stairs"


@pytest.fixture(scope="module")
def tiny(reference_models, gpt2_tokenizer_dir):
    ref = reference_models("tiny")
    return ref, neocore.load(ref.folder)


def hf_continuation(ref, model, prompt: str, n: int) -> str:
    ids = model.tokenizer.encode(prompt)
    with torch.no_grad():
        out = ref.torch_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    if model.config.eos_token_id in new:
        new = new[:new.index(model.config.eos_token_id)]
    return model.tokenizer.decode(new)


def test_greedy_text_equals_transformers(tiny):
    ref, model = tiny
    for prompt in (PROMPT, "Hello", "def main():\n    "):
        expected = hf_continuation(ref, model, prompt, 48)
        assert len(expected) > 20
        assert model.generate(prompt, max_new_tokens=48, temperature=0) == expected


def test_stream_yields_the_same_text_in_whole_characters(tiny):
    _, model = tiny
    chunks = list(model.stream(PROMPT, max_new_tokens=60, seed=4))
    assert len(chunks) > 5
    assert "".join(chunks) == model.generate(PROMPT, max_new_tokens=60, seed=4)


def test_seeded_sampling_is_reproducible_across_runs_and_threads(reference_models, tiny):
    ref, model = tiny
    two = neocore.load(ref.folder, threads=2)
    one = neocore.load(ref.folder, threads=1)
    kwargs = dict(max_new_tokens=40, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1)
    a = one.generate(PROMPT, seed=123, **kwargs)
    assert a == one.generate(PROMPT, seed=123, **kwargs) == two.generate(PROMPT, seed=123, **kwargs)
    assert a != two.generate(PROMPT, seed=124, **kwargs)


def hf_processors(params: SamplingParams) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        processors.append(TopPLogitsWarper(params.top_p))
    return processors


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7, top_k=0, top_p=1.0),
    SamplingParams(temperature=1.0, top_k=10, top_p=1.0),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.8),
    SamplingParams(temperature=0.6, top_k=40, top_p=0.9, repetition_penalty=1.2),
    SamplingParams(temperature=1.5, top_k=3, top_p=0.5, repetition_penalty=0.8),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.0),  # OpenAI's and transformers' lowest: the best token
])
def test_processors_match_transformers(params):
    rng = np.random.default_rng(7)
    for trial in range(5):
        logits = (rng.standard_normal(1000) * 3).astype(np.float32)
        previous = rng.integers(0, 1000, 30).tolist()
        ours = process_logits(logits, previous, params)
        theirs = hf_processors(params)(torch.tensor([previous]), torch.from_numpy(logits.copy())[None])[0].numpy()
        assert np.array_equal(np.isfinite(ours), np.isfinite(theirs)), "different tokens survive the filters"
        kept = np.isfinite(ours)
        assert kept.sum() >= 1
        np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_a_batch_of_whole_vocabulary_rows_is_filtered_as_transformers_filters_each():
    """GPT-2's 50257 ids, where top-k finds its threshold among the values past a bound rather
    than by partitioning whole rows; the rows of a batch have their own settings, and ties at
    the k-th value keep every tied id, as transformers' top-k keeps them (top-p then off: which
    of several tied ids top-p keeps follows torch's sort, stable only up to 16 values)."""
    rng = np.random.default_rng(11)
    for trial in range(6):
        logits = (rng.standard_normal((6, 50257)) * 3).astype(np.float32)
        top_p = 1.0 if trial % 2 else 0.9
        if trial % 2:
            logits = np.round(logits)  # many ties, at the k-th value too
        settings = [SamplingParams(0.8, 40, top_p), SamplingParams(1.0, 1, 1.0), SamplingParams(1.3, 200, top_p, 1.2),
                    SamplingParams(0.0, 40, top_p), SamplingParams(1.0, 0, 1.0), SamplingParams(0.7, 40, 1.0)]
        previous = [rng.integers(0, 50257, 20).tolist() for _ in settings]
        ours = process_rows(logits, previous, settings)
        for row, params in enumerate(settings):
            if params.greedy:
                continue
            theirs = hf_processors(params)(torch.tensor([previous[row]]), torch.from_numpy(logits[row].copy())[None])[0]
            assert np.array_equal(np.isfinite(ours[row]), np.isfinite(theirs.numpy())), (trial, row)


def test_kth_largest_is_what_a_whole_partition_finds():
    rng = np.random.default_rng(3)
    for width in (50257, 10000, 700):
        for k in (1, 5, 40, 400):
            block = (rng.standard_normal((4, width)) * 2).astype(np.float32)
            block[1] = np.round(block[1])                  # ties
            block[2, rng.integers(0, width, 3)] = np.nan    # NaN, which partition orders last
            block[3, :width // 2] = -np.inf
            block[3, rng.integers(0, width, 2)] = np.inf
            assert np.array_equal(kth_largest(block, k), np.partition(block, -k, axis=1)[:, -k], equal_nan=True)


def test_top_p_cuts_where_transformers_does_over_the_whole_vocabulary():
    """top_p over GPT-2's 50257 tokens (top_k off, the server's default). A float32 running sum
    kept or dropped a token more than transformers in 1.5% of rows (torch's CPU cumsum sums in
    float64); summed so too, the rows left differ only where torch's exp and numpy's round a
    probability differently at the cut (about 0.1%)."""
    rng = np.random.default_rng(62)
    differing = 0
    for row in range(600):
        logits = (rng.standard_normal(50257) * (0.5, 1, 2)[row % 3]).astype(np.float32)
        params = SamplingParams(temperature=1.0, top_k=0, top_p=(0.5, 0.9)[row % 2])
        ours = process_logits(logits.copy(), [], params)
        theirs = hf_processors(params)(torch.zeros(1, 1, dtype=torch.long), torch.from_numpy(logits.copy())[None])[0]
        differing += not np.array_equal(np.isfinite(ours), np.isfinite(theirs.numpy()))
    assert differing <= 3, f"{differing} of 600 rows keep other tokens than transformers"


def test_top_p_keeps_the_tied_tokens_transformers_keeps():
    """Tied logits at the cut: the ids kept are those transformers keeps, where torch's CPU sort
    is stable (up to 16 values; the count alone was right before)."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        logits = np.round(rng.standard_normal(rng.integers(2, 12)) * 2).astype(np.float32)
        for p in (0.3, 0.6, 0.9):
            params = SamplingParams(temperature=1.0, top_k=0, top_p=p)
            ours = process_logits(logits.copy(), [], params)
            theirs = hf_processors(params)(torch.zeros(1, 1, dtype=torch.long), torch.from_numpy(logits.copy())[None])[0]
            assert np.array_equal(np.isfinite(ours), np.isfinite(theirs.numpy())), (logits, p)


def test_greedy_applies_the_repetition_penalty_like_transformers(tiny):
    ref, model = tiny
    ids = model.tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = ref.torch_model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                                       repetition_penalty=1.5, pad_token_id=0)
    expected = model.tokenizer.decode(out[0, len(ids):].tolist())
    assert model.generate(PROMPT, max_new_tokens=30, temperature=0, repetition_penalty=1.5) == expected


def test_stop_string_spanning_two_tokens(tiny):
    _, model = tiny
    ids = model.tokenizer.encode(PROMPT)
    new = model.generate_ids(ids, max_new_tokens=30)
    pieces = [model.tokenizer.decode([t]) for t in new]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = model.tokenizer.decode(new)
    expected = full[:full.find(stop)]
    assert model.generate(PROMPT, max_new_tokens=30, temperature=0, stop=[stop]) == expected
    streamed = list(model.stream(PROMPT, max_new_tokens=30, temperature=0, stop=["never appears", stop]))
    assert "".join(streamed) == expected and not any(stop in c for c in streamed)


def test_eos_ends_generation(tiny):
    ref, model = tiny
    eos = model.config.eos_token_id
    steered = neocore.load(ref.folder)
    # Point the final LayerNorm's bias along EOS's (tied) embedding: EOS then wins every step.
    eos_row = bf16_to_f32(steered._weights["wte"][eos])
    steered._weights["lnf_b"][:] = 1000 * eos_row / np.linalg.norm(eos_row)
    ids = model.tokenizer.encode(PROMPT)
    assert steered.generate_ids(ids, max_new_tokens=10) == [eos]
    assert steered.generate_ids(ids, max_new_tokens=3, stop_at_eos=False) == [eos] * 3
    assert steered.generate(PROMPT, max_new_tokens=10, temperature=0) == ""
    assert model.generate(PROMPT, max_new_tokens=10, temperature=0) != ""


@pytest.mark.parametrize("config_eos, generation_eos", [
    ("both", None),      # config.json lists two ids, no generation_config.json
    ("first", "both"),   # generation_config.json adds the second
    ("both", "first"),   # generation_config.json's single id wins over config.json's two
])
def test_the_eos_ids_that_end_generation_are_those_transformers_stops_at(tiny, tmp_path, config_eos, generation_eos):
    """config.json may list several EOS ids, and generation_config.json, where there is one,
    names those transformers' generate stops at instead. Make a token that greedy decoding
    reaches the second id, in copies of the folder, and compare with transformers loading the
    same folder; converting the folder keeps what it stops at."""
    ref, model = tiny
    ids = model.tokenizer.encode(PROMPT)
    free = model.generate_ids(ids, max_new_tokens=12, stop_at_eos=False)
    second = free[4]
    choice = {"first": model.config.eos_token_id, "both": [model.config.eos_token_id, second]}
    folder = shutil.copytree(ref.folder, tmp_path / "eos")
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = choice[config_eos]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").unlink(missing_ok=True)
    if generation_eos:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": choice[generation_eos]}))
    expected = free[:free.index(second) + 1] if (generation_eos or config_eos) == "both" else free
    loaded = neocore.load(folder)
    assert loaded.generate_ids(ids, max_new_tokens=12) == expected
    with torch.no_grad():
        out = GPTNeoForCausalLM.from_pretrained(folder).eval().generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out[0, len(ids):].tolist() == expected
    if expected != free:
        assert loaded.generate(PROMPT, max_new_tokens=12, temperature=0) == model.tokenizer.decode(expected[:-1])
    converted = convert(folder, tmp_path / "converted")
    assert neocore.load(converted).generate_ids(ids, max_new_tokens=12) == expected


def test_a_bad_generation_config_is_refused_in_one_line(tiny, tmp_path):
    ref, _ = tiny
    folder = shutil.copytree(ref.folder, tmp_path / "bad")
    for text, message in (('{"eos_token_id": "</s>"}', "eos_token_id must be a token id"),
                          ("{not json", "not a readable JSON file"), ("[1, 2]", "expected a JSON object")):
        (folder / "generation_config.json").write_text(text)
        with pytest.raises(neocore.ConfigError, match=f"generation_config.json: {message}"):
            neocore.load(folder)
    assert neocore.load(folder, eos_token_id=7).config.eos_token_ids == (7,)  # overrides win, unread
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").mkdir()  # passed over, as transformers does, and so is a dangling link
    assert neocore.load(folder).config.eos_token_ids == (50256,)
    (folder / "generation_config.json").rmdir()
    (folder / "generation_config.json").symlink_to(tmp_path / "nowhere.json")
    assert neocore.load(folder).config.eos_token_ids == (50256,)


def test_convert_keeps_an_eos_override_over_the_generation_config(tiny, tmp_path):
    ref, _ = tiny
    folder = shutil.copytree(ref.folder, tmp_path / "src")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 50256, "max_length": 20}))
    converted = convert(folder, tmp_path / "dst", eos_token_id=[7, 8])
    assert neocore.load(converted).config.eos_token_ids == (7, 8)
    assert json.loads((converted / "generation_config.json").read_text()) == {"eos_token_id": [7, 8], "max_length": 20}
    # without the field (where transformers would not stop) and no override, the copy lacks it too
    (folder / "generation_config.json").write_text(json.dumps({"max_length": 20}))
    plain = convert(folder, tmp_path / "plain")
    assert json.loads((plain / "generation_config.json").read_text()) == {"max_length": 20}
    assert neocore.load(plain).config.eos_token_ids == (50256,)


def test_a_temperature_too_small_for_float32_is_greedy(tiny):
    """1e-300 rounds to 0 in float32 and 1e-30 overflows the scaled logits: both draw the
    argmax, with the other sequences of the batch unaffected."""
    _, model = tiny
    greedy = model.generate([PROMPT, "Hello"], max_new_tokens=24, temperature=0)
    for temperature in (1e-300, 1e-30, 1e-6):
        assert model.generate(PROMPT, max_new_tokens=24, temperature=temperature, seed=1) == greedy[0]
    sampled = model.generate("Hello", max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=3)
    texts = [model.engine.submit(Request(model.tokenizer.encode(p), SamplingParams(t, 0, 1.0), 24, 3))
             for p, t in ((PROMPT, 1e-300), ("Hello", 1.0))]
    assert [s.result().text for s in texts] == [greedy[0], sampled]


def test_sampling_rows_with_nothing_finite_fall_back_to_the_argmax():
    logits = np.array([[0.5, np.nan, 2.0], [np.nan, np.nan, np.nan]], np.float32)
    params = [SamplingParams(1.0, 0, 1.0)] * 2
    chosen = choose_rows(logits, [[], []], params, [np.random.default_rng(0)] * 2)
    assert chosen[1] == 0 and 0 <= chosen[0] < 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=2), "top_p"), (dict(top_p=-0.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_new_tokens=-1), "max_new_tokens"),
    # finite, but float32 logits divided by them overflow (penalty) or all tie (temperature)
    (dict(repetition_penalty=1e-40), "repetition_penalty"), (dict(repetition_penalty=1e39), "repetition_penalty"),
    (dict(temperature=1e39), "temperature"),
])
def test_nonsense_parameters_are_refused_before_generating(tiny, kwargs, message):
    _, model = tiny
    with pytest.raises(neocore.SamplingError, match=message):
        model.stream(PROMPT, **kwargs)


def test_the_widest_accepted_settings_still_filter_and_favour():
    """At the accepted extremes the filters still see distinct float32 scores: top_k keeps k
    tokens at temperature 1e6, and a penalty of 1e-6 makes a seen token the likeliest."""
    logits = np.random.default_rng(2).standard_normal((1, 1000)).astype(np.float32)
    hot = process_logits(logits[0], [], SamplingParams(temperature=1e6, top_k=5, top_p=1.0))
    assert np.isfinite(hot).sum() == 5
    seen = int(np.argsort(logits[0])[-2])  # positive, but not the top score
    boosted = process_logits(logits[0], [seen], SamplingParams(temperature=1.0, top_k=0, top_p=1.0,
                                                               repetition_penalty=1e-6))
    assert np.isfinite(boosted).all() and int(np.argmax(boosted)) == seen


def test_prompt_longer_than_the_context(tiny):
    _, model = tiny
    with pytest.raises(neocore.ContextError, match="the prompt is .* tokens long; the context holds 160"):
        model.generate("word " * 200)


def test_generation_stops_at_a_full_context(tiny):
    _, model = tiny
    prompt = "word " * 150
    text = model.generate(prompt, max_new_tokens=100, temperature=0)
    assert len(model.tokenizer.encode(prompt)) + len(model.tokenizer.encode(text)) >= model.context_length - 2
    ids = model.tokenizer.encode(prompt)
    done = model.engine.submit(Request(ids, SamplingParams(temperature=0), 100, text=False,
                                       stop_at_eos=False)).result()
    # every position holds a token, and the last one's logits chose one more
    assert done.finish_reason == "length" and len(done.tokens) == model.context_length - len(ids) + 1


def hf_logprobs(ref, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = ref.torch_model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def test_score_matches_transformers(tiny):
    ref, model = tiny
    text = "Once upon a time, there was a small village by the sea."
    result = model.score(text)
    ids = [model.tokenizer.eos_id] + model.tokenizer.encode(text)
    expected = hf_logprobs(ref, ids)
    np.testing.assert_allclose(result.logprobs, expected, atol=1e-4)
    assert result.perplexity == pytest.approx(np.exp(-expected.mean()), rel=1e-4)


def test_score_windows_a_text_longer_than_the_context(tiny):
    """Context 160, stride 60: each window scores only the tokens the previous one did not."""
    ref, model = tiny
    text = " ".join(f"item{i} costs {i * 7 % 13} coins;" for i in range(80))
    ids = [model.tokenizer.eos_id] + model.tokenizer.encode(text)
    assert len(ids) > 3 * model.context_length
    result = model.score(text, stride=60)
    expected = np.empty(len(ids) - 1)
    done, start, window = 0, 0, model.context_length
    while done < len(ids) - 1:
        end = min(start + window, len(ids))
        expected[done:end - 1] = hf_logprobs(ref, ids[start:end])[done - start:]
        done, start = end - 1, start + 60
    np.testing.assert_allclose(result.logprobs, expected, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_weights_are_an_error_not_text(tiny, tmp_path, edited_copy, dtype):
    """NaN logits leave nothing to choose or score: a clear error, whatever the sampling."""
    ref, _ = tiny

    def poison(tensors):
        tensors["transformer.h.1.mlp.c_fc.weight"][2, 3] = float("nan")

    model = neocore.load(edited_copy(ref.folder, tmp_path / "nan", poison), dtype=dtype)
    for kwargs in ({"temperature": 0}, {"top_p": 0.9, "seed": 1}, {"top_p": 1.0, "top_k": 0, "seed": 1}):
        with pytest.raises(neocore.NeocoreError, match="logits are NaN or infinite"):
            model.generate(PROMPT, max_new_tokens=4, **kwargs)
    with pytest.raises(neocore.NeocoreError, match="logits are NaN or infinite"):
        model.score(PROMPT)
    scoring = Request(model.tokenizer.encode(PROMPT), SamplingParams(temperature=0), 0, prompt_logprobs=True)
    with pytest.raises(neocore.NeocoreError, match="logits are NaN or infinite"):
        model.engine.submit(scoring).result()


def test_a_padded_vocabulary_never_yields_ids_without_text(padded_vocab):
    """The vocabulary padded past the tokenizer's 50257 ids with rows that win every argmax:
    text generation picks the best id the tokenizer has, as transformers' logits rank them."""
    from transformers import GPTNeoForCausalLM
    folder = padded_vocab
    model = neocore.load(folder, dtype="float32")
    assert model.tokenizer.vocab_size == 50257 < model.config.vocab_size
    torch_model = GPTNeoForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids, expected = model.tokenizer.encode(PROMPT), []
    with torch.no_grad():
        for _ in range(6):
            logits = torch_model(torch.tensor([ids + expected])).logits[0, -1]
            assert int(logits.argmax()) >= 50257
            expected.append(int(logits[:50257].argmax()))
    assert model.generate(PROMPT, max_new_tokens=6, temperature=0) == model.tokenizer.decode(expected)
    assert len(model.generate(PROMPT, max_new_tokens=6, seed=3)) > 0
    # nor named among a text request's log-probabilities, the prompt's included
    done = model.engine.submit(Request(ids, SamplingParams(temperature=0), 3, logprobs=5, prompt_logprobs=True)).result()
    named = [t for entry in done.prompt_logprobs[1:] + done.logprobs for t, _ in entry.top]
    assert len(named) == 5 * (len(ids) - 1 + 3) and max(named) < 50257


def test_logits_and_score_hold_the_models_sequence_for_the_whole_call(tiny, monkeypatch):
    """Two threads' logits (or scores) once interleaved between one call's reset and its
    append, giving the other call's logits; a slow reset makes that switch certain."""
    import threading
    import time
    _, model = tiny
    texts = ["The first text is about the sea.", "A second one, on mountains and snow."]
    ids = [model.tokenizer.encode(t) for t in texts]
    alone = [model.logits(i) for i in ids], [model.score(t).logprobs for t in texts]
    reset = type(model).reset

    def slow_reset(self):
        reset(self)
        time.sleep(0.005)  # another thread would feed its tokens here

    monkeypatch.setattr(type(model), "reset", slow_reset)
    together: dict = {}

    def run(k):
        together[k] = model.logits(ids[k]), model.score(texts[k]).logprobs

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in (0, 1):
        assert np.array_equal(together[k][0], alone[0][k]) and np.array_equal(together[k][1], alone[1][k])


@pytest.mark.parametrize("call", [
    lambda m: m.logits([1.9]), lambda m: m.logits([True]), lambda m: m.logits([[1, 2]]),
    lambda m: m.logits("abc"), lambda m: m.logits(["a"]), lambda m: m.logits(5), lambda m: m.logits(None),
    lambda m: m.append([2.0]), lambda m: m.generate_ids([-5], max_new_tokens=0),
    lambda m: m.generate_ids(["x"], max_new_tokens=0), lambda m: m.logits([1, True]),
    lambda m: m.logits([np.uint64(2 ** 64 - 1)]), lambda m: m.logits(iter([1, 2])),
])
def test_token_ids_must_be_integers_in_the_vocabulary(tiny, call):
    """Not rounded (1.9 -> 1), parsed or flattened into some other token."""
    with pytest.raises(neocore.NeocoreError, match="token ids must be"):
        call(tiny[1])


def test_token_ids_may_mix_python_and_numpy_integers_of_any_width(tiny):
    """np.asarray would make these floats (uint64 beside int) and refuse them."""
    model = tiny[1]
    ids = [np.uint64(5), 7, np.int8(3), np.uint16(9)]
    assert np.array_equal(model.logits(ids), model.logits(np.array([5, 7, 3, 9])))
    assert np.array_equal(model.logits(range(2, 6)), model.logits([2, 3, 4, 5]))


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate_ids({1: 2}), "ids must be a list of token ids"),
    (lambda m: m.score("some text", stride="2"), "stride must be an integer"),
    (lambda m: m.score("some text", stride=1.5), "stride must be an integer"),
])
def test_model_arguments_of_the_wrong_type_are_neocore_errors(tiny, call, message):
    with pytest.raises(neocore.NeocoreError, match=message):
        call(tiny[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(threads=1.5), "threads must be an integer"), (dict(threads=True), "threads must be an integer"),
    (dict(threads="2"), "threads must be an integer"), (dict(context=2.5), "context must be an integer"),
    (dict(context="64"), "context must be an integer"), (dict(context=True), "context must be an integer"),
])
def test_load_takes_whole_numbers_only(reference_models, kwargs, message):
    with pytest.raises(neocore.NeocoreError, match=message):
        neocore.load(reference_models("tiny").folder, **kwargs)


def test_numpy_floats_are_sampling_parameters_like_floats(tiny):
    _, model = tiny
    as_numpy = model.generate("Hello", max_new_tokens=8, temperature=np.float32(0.5), top_p=np.float32(0.75), seed=2)
    assert as_numpy == model.generate("Hello", max_new_tokens=8, temperature=0.5, top_p=0.75, seed=2)

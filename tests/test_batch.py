"""Many sequences in one step: batched logits against single-sequence logits and transformers,
row independence, batched generation against one prompt at a time, and the engine's
bookkeeping (stops, cancellation, slot reuse, errors)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import neocore
from neocore import _core
from neocore.engine import Engine, Request, Stream
from neocore.sampling import SamplingParams
from neocore.weights import bf16_to_f32

GREEDY = SamplingParams(temperature=0)


def run_schedule(model, schedule, seqs_ids):
    """Feeds sequences through model.step in the given steps: schedule is a list of steps, each
    a list of (sequence index, number of tokens). Returns, per sequence, the logits of every
    position, collected as they come."""
    fed = [0] * len(seqs_ids)
    got = [[] for _ in seqs_ids]
    slots = [1 + i for i in range(len(seqs_ids))]
    for slot in slots:
        model.clear_sequence(slot)
    for step in schedule:
        tokens, seqs = [], []
        for i, n in step:
            tokens += seqs_ids[i][fed[i]:fed[i] + n]
            seqs += [slots[i]] * n
        logits = np.empty((len(tokens), model.config.vocab_size), np.float32)
        model.step(np.array(tokens, np.int32), np.array(seqs, np.int32), np.ones(len(tokens), np.uint8), logits)
        at = 0
        for i, n in step:
            got[i].append(logits[at:at + n].copy())
            fed[i] += n
            at += n
    return [np.concatenate(g) for g in got]


def random_schedule(lengths, rng, max_chunk):
    """Steps that advance every unfinished sequence by a random amount (1 = a decode row)."""
    left = list(lengths)
    schedule = []
    while any(left):
        step = []
        for i in rng.permutation(len(left)):
            if left[i] and rng.random() < 0.8:
                n = int(min(left[i], rng.choice([1, 1, 2, rng.integers(1, max_chunk + 1)])))
                step.append((int(i), n))
                left[i] -= n
        if step:
            schedule.append(step)
    return schedule


@pytest.mark.parametrize("name, lengths", [("tiny", [30, 7, 19, 1, 40]), ("window256", [600, 300, 45, 270])])
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_logits_match_single_sequence_and_transformers(reference_models, logits_close, name, lengths,
                                                              threads):
    ref = reference_models(name)
    model = neocore.load(ref.folder, threads=threads)
    rng = np.random.default_rng(len(lengths) + threads)
    seqs_ids = [rng.integers(0, ref.config["vocab_size"], n).tolist() for n in lengths]
    batched = run_schedule(model, random_schedule(lengths, rng, 96), seqs_ids)
    for ids, ours in zip(seqs_ids, batched):
        np.testing.assert_allclose(ours, model.logits(ids), rtol=0, atol=1e-4 * np.abs(ours).max() + 1e-5)
        logits_close(ours, ref.logits(ids))


def test_a_rows_result_does_not_depend_on_the_other_rows(reference_models):
    """Bit for bit: a sequence fed alone and the same sequence fed with others in every step."""
    ref = reference_models("window256")
    model = neocore.load(ref.folder, threads=2)
    rng = np.random.default_rng(3)
    ids = [rng.integers(0, 512, n).tolist() for n in (290, 150, 60, 300)]
    mine = [(0, 100), (0, 100), (0, 1), (0, 1), (0, 60), (0, 1), (0, 27)]
    crowd = [[(1, 50), (2, 3)], [(1, 1), (3, 100)], [(1, 1), (2, 1), (3, 1)], [(3, 150), (2, 20)],
             [(1, 98)], [(2, 36), (3, 49)], []]
    alone = run_schedule(model, [[step] for step in mine], ids[:1])[0]
    together = run_schedule(model, [[step] + others for step, others in zip(mine, crowd)], ids)[0]
    assert np.array_equal(alone, together)


@pytest.mark.parametrize("compute", ["exact", "bf16"])
def test_a_prompts_last_row_does_not_depend_on_which_rows_are_wanted(reference_models, compute):
    """The row a prompt's first token is drawn from gets the same bits whether the step also
    wants the other rows (prompt logprobs, echo) or not, and beside a decoding sequence or not:
    asking for logprobs never changes what is generated."""
    ref = reference_models("wide-heads")
    model = neocore.load(ref.folder, threads=2, compute=compute)
    vocab = model.config.vocab_size
    prompt = np.random.default_rng(5).integers(0, vocab, 40).astype(np.int32)
    decoding = np.array([7, 8, 9], np.int32)

    def last_row(want_all: bool, beside_decode: bool) -> np.ndarray:
        for slot in (1, 2):
            model.clear_sequence(slot)
        tokens, seqs = prompt, np.full(prompt.size, 1, np.int32)
        want = np.full(prompt.size, want_all, np.uint8)
        want[-1] = 1
        if beside_decode:
            model.step(decoding[:2], np.full(2, 2, np.int32), np.zeros(2, np.uint8), np.empty((0, vocab), np.float32))
            tokens, seqs = np.concatenate([decoding[2:], prompt]), np.concatenate([[2], seqs]).astype(np.int32)
            want = np.concatenate([[1], want]).astype(np.uint8)
        logits = np.empty((int(want.sum()), vocab), np.float32)
        model.step(tokens, seqs, want, logits)
        return logits[-1].copy()

    first = last_row(False, False)
    for want_all, beside_decode in [(True, False), (False, True), (True, True)]:
        assert np.array_equal(last_row(want_all, beside_decode), first)


def test_batched_step_refuses_bad_batches_and_leaves_the_state_alone(reference_models):
    ref = reference_models("tiny")
    model = neocore.load(ref.folder)
    logits = np.empty((4, model.config.vocab_size), np.float32)
    ok = np.array([5, 6], np.int32), np.array([1, 1], np.int32)
    model.step(*ok, np.ones(2, np.uint8), logits)
    bad = [
        (np.array([1, 2, 3], np.int32), np.array([1, 2, 1], np.int32), _core.BadBatch),   # rows apart
        (np.array([1], np.int32), np.array([999], np.int32), _core.BadBatch),            # no such slot
        (np.array([1, 50257], np.int32), np.array([2, 2], np.int32), ValueError),          # token id
        (np.zeros(200, np.int32), np.full(200, 1, np.int32), _core.ContextFull),          # past 160
    ]
    for tokens, seqs, error in bad:
        with pytest.raises(error):
            model.step(tokens, seqs, np.zeros(tokens.size, np.uint8), logits)
    assert model._core.length(1) == 2 and model._core.length(2) == 0
    model.step(np.array([7], np.int32), np.array([1], np.int32), np.ones(1, np.uint8), logits)
    np.testing.assert_allclose(logits[0], model.logits([5, 6, 7])[-1], atol=1e-5)


PROMPTS = ["The old lighthouse keeper", "def fibonacci(n):", "Hello", "In 1887, the city of",
           "import numpy as np\n", "Once upon a time there was a", "x", "The results show that the"]


@pytest.fixture(scope="module")
def tiny(reference_models):
    return neocore.load(reference_models("tiny").folder)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny):
    together = tiny.generate(PROMPTS, max_new_tokens=30, temperature=0)
    alone = [tiny.generate(p, max_new_tokens=30, temperature=0) for p in PROMPTS]
    assert together == alone
    assert len(set(together)) == len(PROMPTS)


def test_batched_generate_ids_equals_single(tiny, reference_models):
    ref = reference_models("tiny")
    prompts = [tiny.tokenizer.encode(p) for p in PROMPTS[:4]]
    together = tiny.generate_ids(prompts, max_new_tokens=20)
    for ids, new in zip(prompts, together):
        assert new == tiny.generate_ids(ids, max_new_tokens=20)
        import torch
        with torch.no_grad():
            out = ref.torch_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert new == out[0, len(ids):].tolist()[:len(new)]


def test_seeded_batch_does_not_depend_on_the_other_prompts(tiny):
    kwargs = dict(max_new_tokens=25, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=7)
    batch = tiny.generate(PROMPTS, **kwargs)
    assert batch == tiny.generate(PROMPTS, **kwargs)               # reproducible
    assert batch[0] == tiny.generate(PROMPTS[0], **kwargs)         # prompt 0 alone
    other = tiny.generate([PROMPTS[0], "Something else entirely", PROMPTS[2]], **kwargs)
    assert other[0] == batch[0] and other[2] == batch[2]           # neighbours changed, rows did not
    params = SamplingParams(1.0, 50, 0.9, 1.1)
    ids = tiny.tokenizer.encode(PROMPTS[5])
    alone = tiny.engine.submit(Request(ids, params, 25, seed=7, seed_index=5)).result().text
    assert alone == batch[5]
    assert len(set(batch)) > 1


def test_stops_eos_and_lengths_are_per_sequence(tiny):
    full = tiny.generate(PROMPTS[:3], max_new_tokens=30, temperature=0)
    stop = full[1][5:9]
    got = tiny.generate(PROMPTS[:3], max_new_tokens=30, temperature=0, stop=[stop])
    for f, g in zip(full, got):
        assert g == (f[:f.index(stop)] if stop in f else f)
    handles = [tiny.engine.submit(Request(tiny.tokenizer.encode(p), GREEDY, n, text=False))
               for p, n in zip(PROMPTS, [1, 5, 17, 30, 2, 9, 3, 12])]
    for handle, n in zip(handles, [1, 5, 17, 30, 2, 9, 3, 12]):
        done = handle.result()
        assert done.finish_reason == "length" and len(done.tokens) == n


def test_eos_ends_only_the_sequences_that_stop_at_it(reference_models):
    ref = reference_models("tiny")
    steered = neocore.load(ref.folder)
    eos = steered.config.eos_token_id
    # The final LayerNorm's bias along EOS's (tied) embedding: EOS then wins every step.
    eos_row = bf16_to_f32(steered._weights["wte"][eos])
    steered._weights["lnf_b"][:] = 1000 * eos_row / np.linalg.norm(eos_row)
    ids = steered.tokenizer.encode(PROMPTS[0])
    stops = steered.engine.submit(Request(ids, GREEDY, 5, text=False))
    runs_on = steered.engine.submit(Request(ids, GREEDY, 5, text=False, stop_at_eos=False))
    text = steered.engine.submit(Request(ids, GREEDY, 5))
    assert (stops.result().tokens, stops.result().finish_reason) == ([eos], "stop")
    done = runs_on.result()
    assert (done.tokens, done.finish_reason) == ([eos] * 5, "length")
    assert (text.result().text, text.result().finish_reason) == ("", "stop")


def test_cancel_frees_the_slot_and_others_continue(tiny):
    engine = tiny.engine
    ids = tiny.tokenizer.encode(PROMPTS[0])
    long = engine.submit(Request(ids, GREEDY, 150, text=False, stop_at_eos=False))
    others = [engine.submit(Request(tiny.tokenizer.encode(p), GREEDY, 20, text=False)) for p in PROMPTS[1:4]]
    seen = 0
    for chunk in long:
        seen += 1
        if seen == 3:
            long.cancel()
        if chunk.finish_reason:
            assert chunk.finish_reason == "cancelled"
    assert 3 <= seen < 100
    expected = tiny.generate_ids([tiny.tokenizer.encode(p) for p in PROMPTS[1:4]], max_new_tokens=20)
    assert [h.result().tokens for h in others] == expected
    assert engine.active == 0 and len(engine._free_slots) == 255


def test_many_threads_submitting_at_once(tiny):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = tiny.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = tiny.generate(PROMPTS, max_new_tokens=12, temperature=0)
    assert [results[i] for i in range(12)] == [expected[i % len(PROMPTS)] for i in range(12)]


def test_logprobs_and_echo_logprobs_match_the_logits(tiny):
    ids = tiny.tokenizer.encode(PROMPTS[3])
    done = tiny.engine.submit(Request(ids, GREEDY, 6, text=False, logprobs=3, prompt_logprobs=True)).result()
    logits = tiny.logits(ids + done.tokens[:-1]).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    sequence = ids + done.tokens
    assert done.prompt_logprobs[0].logprob is None and len(done.prompt_logprobs) == len(ids)
    for pos, entry in enumerate(done.prompt_logprobs[1:] + done.logprobs, start=1):
        assert entry.token == sequence[pos]
        assert entry.logprob == pytest.approx(logp[pos - 1, sequence[pos]], abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0][0] == int(np.argmax(logp[pos - 1]))


def test_a_prompt_that_fills_the_context_chooses_one_token_and_is_scored(tiny, reference_models):
    """As transformers does: a prompt of the whole context chooses a token from its last row
    (a token never fed), and each of its rows scores the next token; one token more is refused."""
    import torch
    ref = reference_models("tiny")
    ids = np.random.default_rng(4).integers(0, 50256, 160).tolist()
    with torch.no_grad():
        expected = ref.torch_model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert tiny.generate_ids(ids, max_new_tokens=1) == expected[0, 160:].tolist()
    scored = tiny.engine.submit(Request(ids, GREEDY, 0, text=False, prompt_logprobs=True)).result()
    logits = ref.logits(ids).astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert [e.token for e in scored.prompt_logprobs] == ids and scored.finish_reason == "length"
    np.testing.assert_allclose([e.logprob for e in scored.prompt_logprobs[1:]], logp[np.arange(159), ids[1:]],
                               atol=1e-4)
    with pytest.raises(neocore.ContextError, match="the prompt is 161 tokens long; the context holds 160"):
        tiny.engine.submit(Request(ids + [1], GREEDY, 0, text=False, prompt_logprobs=True))


def test_a_request_that_fails_on_its_own_ends_alone(tiny, monkeypatch):
    """A failure in one request's own work after a step (its text: here the tokenizer breaks)
    ends that request with the error; a request running beside it goes on to its end."""
    ids = tiny.tokenizer.encode(PROMPTS[0])
    expected = tiny.generate_ids(ids, max_new_tokens=30, stop_at_eos=False)

    def broken(token_id: int) -> bytes:
        raise neocore.TokenizerError("the tokenizer broke")

    monkeypatch.setattr(tiny.tokenizer, "token_bytes", broken)
    beside = tiny.engine.submit(Request(ids, GREEDY, 30, text=False, stop_at_eos=False), asynchronous=False)
    failing = tiny.engine.submit(Request(ids, GREEDY, 30), asynchronous=False)
    with pytest.raises(neocore.NeocoreError, match="the tokenizer broke"):
        failing.result()
    assert beside.result().tokens == expected


def test_more_logprobs_than_tokens_name_every_token(reference_models):
    """logprobs up to 20 on a vocabulary of 12: every token, most likely first."""
    model = neocore.load(reference_models("few-tokens").folder)
    done = model.engine.submit(Request([1, 2, 3], GREEDY, 4, text=False, logprobs=20, stop_at_eos=False)).result()
    logits = model.logits([1, 2, 3] + done.tokens[:-1])
    assert len(done.logprobs) == len(logits[2:]) == 4
    for entry, row in zip(done.logprobs, logits[2:]):  # the rows that chose the tokens
        assert [t for t, _ in entry.top] == np.argsort(-row, kind="stable").tolist()


def test_engine_refuses_bad_requests(tiny):
    engine = tiny.engine
    with pytest.raises(neocore.NeocoreError, match="empty"):
        engine.submit(Request([], GREEDY, 5))
    with pytest.raises(neocore.ContextError):
        engine.submit(Request([1] * 161, GREEDY, 5))
    with pytest.raises(neocore.NeocoreError, match="token ids"):
        engine.submit(Request([50257], GREEDY, 5))
    with pytest.raises(neocore.NeocoreError, match="max_new_tokens"):
        engine.submit(Request([1], GREEDY, -1))
    for seed in (-1, 2 ** 70, 1.5, True):  # refused at submit: numpy's generator would raise on the engine's thread
        with pytest.raises(neocore.NeocoreError, match="seed"):
            engine.submit(Request([1], GREEDY, 5, seed=seed))
    with pytest.raises(neocore.NeocoreError, match="seed"):
        tiny.generate("hi", max_new_tokens=3, seed=-1)
    with pytest.raises(neocore.NeocoreError, match="max_batch"):
        Engine(tiny, max_batch=0)


@pytest.mark.parametrize("bad, match", [
    (dict(prompt=None), "flat sequence"), (dict(prompt=[[1, 2], [3, 4]]), "flat sequence"),
    (dict(prompt=[1, [2, 3]]), "flat sequence"), (dict(prompt=iter([1, 2])), "flat sequence"),
    (dict(params=None), "SamplingParams"), (dict(logprobs=2.5), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(logprobs="2"), "logprobs"), (dict(stop=[1]), "stop"), (dict(seed_index=-1), "seed_index"),
    (dict(text="no"), "text must be True or False"), (dict(stop_at_eos=None), "stop_at_eos must be True or False"),
    (dict(prompt_logprobs="x"), "prompt_logprobs must be True or False"),
    (dict(stop=["a"], text=False), "stop strings need text=True"),
])
def test_a_malformed_request_is_refused_at_submit_and_harms_no_other(tiny, bad, match):
    """Each of these once passed the checks and then failed inside a step, which ended every
    running request with its error."""
    running = tiny.engine.submit(Request([1, 2, 3], GREEDY, 40, text=False, stop_at_eos=False))
    with pytest.raises(neocore.NeocoreError, match=match):
        tiny.engine.submit(Request(**{"prompt": [1, 2], "params": GREEDY, "max_new_tokens": 3, **bad}))
    done = running.result()
    assert done.finish_reason == "length" and len(done.tokens) == 40


@pytest.mark.parametrize("kind", [np.uint8, np.int8, np.uint64])
def test_numpy_narrow_and_unsigned_integers_are_taken_as_their_values(tiny, kind):
    """Once taken as they were, they wrapped: an unsigned top_k (as -top_k) failed the step of
    every running sequence, max_batch + max_queue overflowed, a context check passed wrongly."""
    ids = tiny.tokenizer.encode(PROMPTS[0])
    running = tiny.engine.submit(Request([1, 2, 3], GREEDY, 30, text=False, stop_at_eos=False))
    params = SamplingParams(temperature=1.0, top_k=kind(5), top_p=1.0)
    sampled = tiny.engine.submit(Request(ids, params, kind(6), seed=kind(3), seed_index=kind(1))).result()
    expected = tiny.engine.submit(Request(ids, SamplingParams(1.0, 5, 1.0), 6, seed=3, seed_index=1)).result()
    assert sampled.tokens == expected.tokens and sampled.finish_reason == expected.finish_reason
    assert running.result().finish_reason == "length"
    with pytest.raises(neocore.ContextError):  # 150 + 119 tokens: 269 > 160, not (150 + 119) % 256
        tiny.generate_ids([1] * 150, max_new_tokens=np.uint8(120))
    model = neocore.load(tiny.path)
    queue = np.iinfo(kind).max - 100 + 1 if kind is not np.uint64 else 100  # 100 + queue wraps in kind
    engine = model.start_engine(max_batch=kind(100), max_queue=kind(queue))
    engine.check_count(100 + queue)  # as many as it runs and queues: no error
    assert [s.result().finish_reason for s in engine.submit_all(
        [Request([1, 2], GREEDY, 2, text=False, stop_at_eos=False)] * 3)] == ["length"] * 3


def test_values_past_python_s_digit_limit_are_named_in_one_line(tiny):
    """A message quoting a 5000-digit integer once failed to be built (ValueError: Exceeds the
    limit (4300 digits))."""
    huge = 10 ** 5000
    for call in (lambda: tiny.generate_ids([1], max_new_tokens=-huge),
                 lambda: SamplingParams(temperature=huge), lambda: Engine(tiny, max_batch=huge),
                 lambda: tiny.generate("hi", seed=huge)):
        with pytest.raises(neocore.NeocoreError, match="an integer of 16610 bits") as info:
            call()
        assert "\n" not in str(info.value)


def test_a_stream_left_between_chunks_runs_on_and_a_with_block_cancels_it(tiny):
    """Leaving a for loop over a stream is no cancel (read on later: result() has every chunk);
    the end of `with stream:` is."""
    stream = tiny.engine.submit(Request([1, 2, 3], GREEDY, 20, text=False, stop_at_eos=False), asynchronous=False)
    for _ in stream:
        break
    done = stream.result()
    assert done.finish_reason == "length" and len(done.tokens) == 20
    with tiny.engine.submit(Request([1, 2, 3], GREEDY, 150, text=False, stop_at_eos=False),
                            asynchronous=False) as stream:
        next(iter(stream))
    assert stream.result().finish_reason == "cancelled"


def test_a_task_cancelled_in_async_for_cancels_its_request_and_misuse_does_not(tiny):
    import asyncio

    async def main() -> None:
        stream = tiny.engine.submit(Request([1, 2, 3], GREEDY, 150, text=False, stop_at_eos=False))

        async def read() -> None:
            async for _ in stream:
                pass
        task = asyncio.create_task(read())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert stream.cancelled
        other = tiny.engine.submit(Request([1, 2, 3], GREEDY, 5, text=False, stop_at_eos=False))
        with pytest.raises(TypeError, match="asynchronous=False"):
            other.result()  # a loop's stream read the threads' way: refused, and still running
        assert not other.cancelled and (await other.aresult()).finish_reason == "length"

    asyncio.run(main())


def test_numpy_integers_and_any_sequence_of_stops_are_accepted(tiny):
    import collections
    ids = tiny.tokenizer.encode(PROMPTS[0])
    plain = tiny.engine.submit(Request(ids, GREEDY, 6, logprobs=2, seed=3, seed_index=1, stop=["zz"])).result()
    numpy = tiny.engine.submit(Request(np.array(ids), SamplingParams(temperature=0, top_k=np.int64(40)),
                                       np.int64(6), logprobs=np.int64(2), seed=np.int64(3),
                                       seed_index=np.int32(1), stop=collections.deque(["zz"]))).result()
    assert numpy.tokens == plain.tokens and numpy.text == plain.text


def test_a_prompt_changed_after_submit_runs_as_it_was_checked(reference_models):
    """The caller reuses its list while the request waits: the request runs with the prompt
    that was checked, and the sequence already running is not failed by a bad id."""
    model = neocore.load(reference_models("tiny").folder)
    engine = model.start_engine(max_batch=1)
    running = engine.submit(Request([1, 2, 3], GREEDY, 30, text=False, stop_at_eos=False))
    prompt = [7, 8, 9]
    queued = engine.submit(Request(prompt, GREEDY, 5, text=False, stop_at_eos=False))
    prompt[1] = 10 ** 6
    assert running.result().tokens == model.generate_ids([1, 2, 3], 30, stop_at_eos=False)
    done = queued.result()
    assert done.tokens == model.generate_ids([7, 8, 9], 5, stop_at_eos=False) and done.prompt_tokens == 3


def test_result_after_reading_a_stream_holds_every_chunk(tiny):
    request = Request(tiny.tokenizer.encode(PROMPTS[1]), GREEDY, 12)
    whole = tiny.engine.submit(request).result()
    read_all = tiny.engine.submit(request)
    chunks = list(read_all)
    assert "".join(c.text for c in chunks) == whole.text and read_all.result() == whole
    read_one = tiny.engine.submit(request)
    first = next(iter(read_one))
    assert first.tokens == whole.tokens[:1] and read_one.result() == whole


def test_closing_the_engine_under_generate_is_an_error_not_short_text(reference_models):
    import time
    model = neocore.load(reference_models("tiny").folder)
    outcome = {}

    def run(name, call):
        try:
            outcome[name] = call()
        except neocore.NeocoreError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=run, args=("many", lambda: model.generate(PROMPTS, 120, temperature=0))),
               threading.Thread(target=run, args=("one", lambda: model.generate(PROMPTS[0], 120, temperature=0)))]
    for t in threads:
        t.start()
    engine, deadline = model.engine, time.monotonic() + 60
    # both calls' sequences running (a call made after close would start a fresh engine)
    while (engine.active < 1 + len(PROMPTS) or not engine.stats.tokens_generated) and time.monotonic() < deadline:
        time.sleep(0.001)
    engine.close(0)
    for t in threads:
        t.join(60)
    assert all(isinstance(outcome[name], neocore.EngineClosedError) for name in ("many", "one")), outcome


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate(None), "prompt must be a string"), (lambda m: m.generate(5), "prompt must be a string"),
    (lambda m: m.generate(["a", None]), "prompt must be a string"),
    (lambda m: m.stream(None), "a prompt must be a string"),
    (lambda m: m.generate_ids([1], max_new_tokens=None), "max_new_tokens must be an integer"),
    (lambda m: m.generate_ids(None), "ids must be a list of token ids"),
    (lambda m: m.generate_ids([1.0, 2.0]), "token ids must be a flat sequence of integers"),
    (lambda m: m.generate({"hi": 1}), "prompt must be a string or a list of strings"),
    (lambda m: m.generate_ids([1] * 161, max_new_tokens=1), "161 tokens do not fit in the context"),
    (lambda m: m.generate("hi", max_new_tokens=0, seed=-1), "seed must be"),  # checked with nothing to do too
    (lambda m: m.generate(["hi"], max_new_tokens=0, stop=5), "stop must be a string or a list of strings"),
    (lambda m: m.stream("hi", max_new_tokens=0, stop=[b"x"]), "stop must be a string or a list of strings"),
    (lambda m: m.generate_ids([1] * 150, max_new_tokens=12), "161 tokens do not fit in the context"),
    (lambda m: neocore.load(None), "a model is a folder path"),
    (lambda m: neocore.load(str(m.path).encode()), "a model is a folder path"),
    (lambda m: neocore.load(m.path, attention_layers=5), "attention_layers must be a list"),
    (lambda m: neocore.load(m.path, attention_layers=[["global"], ["local"]]), "attention_layers must be a list"),
])
def test_wrong_arguments_are_neocore_errors(tiny, call, match):
    with pytest.raises(neocore.NeocoreError, match=match):
        call(tiny)


def test_a_stop_given_as_one_string_is_one_stop(tiny):
    text = tiny.generate(PROMPTS[0], max_new_tokens=20, temperature=0)
    # three characters whose first appearance as a string comes after one of them alone does
    stop = next(text[k:k + 3] for k in range(1, len(text) - 3)
                if text.find(text[k:k + 3]) == k and min(text.find(c) for c in text[k:k + 3]) < k)
    stream = tiny.engine.submit(Request(tiny.tokenizer.encode(PROMPTS[0]), GREEDY, 20, stop=stop))
    assert stream.result().text == text[:text.index(stop)]


def test_one_engine_per_model(reference_models):
    """A second engine would take the same sequence slots and overwrite the first one's caches."""
    model = neocore.load(reference_models("tiny").folder)
    engine = model.engine
    with pytest.raises(neocore.NeocoreError, match="already has an engine"):
        Engine(model)
    busy = engine.submit(Request([1, 2, 3], GREEDY, 150, text=False, stop_at_eos=False))
    with pytest.raises(neocore.NeocoreError, match="already has an engine"):
        model.start_engine()
    assert model.engine is engine
    busy.result()
    # limits that are refused leave the idle engine as it was
    with pytest.raises(neocore.NeocoreError, match="max_batch"):
        model.start_engine(max_batch=10 ** 6)
    assert model.engine is engine and engine.submit(Request([1, 2, 3], GREEDY, 3)).result().finish_reason
    # an idle engine (as model.generate leaves one) is closed and replaced, never shared
    replaced = model.start_engine(max_batch=4)
    assert model.engine is replaced and replaced.max_batch == 4
    # work sent to the replaced engine (by a thread that took it a moment before) goes to the new one
    forwarded = engine.submit(Request([1, 2, 3], GREEDY, 3, text=False))
    assert forwarded.result().tokens and replaced.stats.requests == 1 and model.engine is replaced


def test_start_engine_right_after_generate_replaces_the_idle_engine(reference_models):
    """The loop thread outlives the last chunk it delivers by a moment: start_engine waits for
    it to end instead of calling the engine busy (a tiny switch interval widens that moment)."""
    import sys
    model = neocore.load(reference_models("tiny").folder, threads=1)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for batch in range(2, 62):
            model.generate_ids([1, 2], max_new_tokens=1)
            assert model.start_engine(max_batch=batch).max_batch == batch
    finally:
        sys.setswitchinterval(interval)


def test_generate_while_another_thread_restarts_the_engine(reference_models):
    """start_engine closes an idle engine that generate may have just taken: its request then
    runs on the new engine instead of failing as if the engine had shut down."""
    import time
    model = neocore.load(reference_models("tiny").folder, threads=1)
    expected = model.generate_ids([1, 2, 3], max_new_tokens=2)
    failures: list[BaseException] = []
    stop = time.monotonic() + 3

    def restart() -> None:
        try:
            while time.monotonic() < stop:
                try:
                    model.start_engine(max_batch=4)
                except neocore.NeocoreError as exc:
                    if "already has an engine" not in str(exc):  # busy: refused, as documented
                        raise
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        for _ in range(300):
            if time.monotonic() >= stop:
                break
            try:
                assert model.generate_ids([1, 2, 3], max_new_tokens=2) == expected
            except neocore.EngineClosedError as exc:
                failures.append(exc)
    finally:
        thread.join(30)
    assert not thread.is_alive() and not failures


def test_queue_depth_can_be_read_while_requests_come_and_go(reference_models):
    """/health and /metrics read it from the server's thread while the engine's changes the queue."""
    import time
    model = neocore.load(reference_models("tiny").folder, threads=1)
    engine = model.start_engine(max_batch=1)
    stop = time.monotonic() + 2
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            while time.monotonic() < stop:
                for s in [engine.submit(Request([1, 2], GREEDY, 1, text=False)) for _ in range(20)]:
                    s.result()
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=submit)
    thread.start()
    while time.monotonic() < stop:
        try:
            assert 0 <= engine.queue_depth <= 20
        except RuntimeError as exc:  # "deque mutated during iteration"
            errors.append(exc)
            break
    thread.join(30)
    assert not thread.is_alive() and not errors


def test_cancelling_a_queued_request_ends_it_while_the_batch_is_full(reference_models):
    model = neocore.load(reference_models("tiny").folder)
    engine = model.start_engine(max_batch=1, max_queue=2)
    ids = model.tokenizer.encode(PROMPTS[0])
    running = engine.submit(Request(ids, GREEDY, 150, text=False, stop_at_eos=False))
    queued = [engine.submit(Request(ids, GREEDY, 5, text=False)) for _ in range(2)]
    for stream in queued:
        stream.cancel()
    assert engine.submit(Request(ids, GREEDY, 5, text=False))  # their places are free at once
    ends = [stream.result() for stream in queued]
    assert [c.finish_reason for c in ends] == ["cancelled", "cancelled"]
    assert engine.stats.tokens_generated < 150  # ended while the running request went on
    assert len(running.result().tokens) == 150
    engine.close(10)


def test_a_batch_that_never_fits_leaves_nothing_running(reference_models):
    """generate(list) queues its prompts all together or not at all."""
    model = neocore.load(reference_models("tiny").folder)
    engine = model.start_engine(max_batch=1, max_queue=1)
    with pytest.raises(neocore.NeocoreError, match="at once"):
        model.generate(PROMPTS[:3], max_new_tokens=100)
    with pytest.raises(neocore.NeocoreError, match="at once"):
        model.generate_ids([[1, 2], [3], [4]], max_new_tokens=100)
    assert engine.active == 0 and engine.queue_depth == 0 and engine.stats.requests == 0


def test_a_request_that_fails_to_start_gets_its_error_and_the_engine_goes_on(tiny, monkeypatch):
    """Whatever goes wrong while a request joins the batch ends that request with an error
    (its caller waited for ever before) and nothing else."""
    import neocore.engine as engine_module

    def broken(seed, index=0):
        raise ValueError("no generator today")
    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "sequence_rng", broken)
        stream = tiny.engine.submit(Request([1, 2], GREEDY, 3, text=False))
        chunks = list(stream)
    assert chunks[-1].finish_reason == "error" and "no generator today" in chunks[-1].error
    assert tiny.generate_ids([1, 2], max_new_tokens=3) == tiny.generate_ids([1, 2], max_new_tokens=3)


def test_queue_limit(reference_models):
    model = neocore.load(reference_models("tiny").folder)
    engine = model.start_engine(max_batch=1, max_queue=1)
    ids = model.tokenizer.encode(PROMPTS[0])
    first = engine.submit(Request(ids, GREEDY, 100, text=False, stop_at_eos=False))
    for chunk in first:  # running now, so the queue is empty
        break
    second = engine.submit(Request(ids, GREEDY, 5, text=False))
    with pytest.raises(neocore.QueueFullError):
        engine.submit(Request(ids, GREEDY, 5, text=False))
    first.cancel()
    assert len(second.result().tokens) == 5
    engine.close(5)
    with pytest.raises(neocore.EngineClosedError):
        engine.submit(Request(ids, GREEDY, 5))
    assert model.engine is not engine  # the model itself goes on with a fresh engine
    assert model.generate_ids(ids, max_new_tokens=5) == second.result().tokens


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


BF16_HARDWARE = next((isa for isa in ("amx", "avx512bf16") if _core.isa_runs_here(isa)), None)


@pytest.mark.parametrize("compute, value_bytes", [
    ("exact", 4),
    pytest.param("bf16", 2, marks=pytest.mark.skipif(
        BF16_HARDWARE is None, reason="this CPU lacks AVX512-BF16 and AMX-BF16, which the bf16 mode runs on")),
])
def test_cache_memory_follows_what_sequences_hold(reference_models, compute, value_bytes):
    """255 sequence slots of the real 125M shape would be 38 GB of cache if they were backed up
    front; only written positions take memory (fp32 keys and values, bf16 in the bf16 mode),
    and clearing a sequence hands it back."""
    ref = reference_models("gpt-neo-125M")
    model = neocore.load(ref.folder, threads=2, compute=compute, isa=BF16_HARDWARE if compute == "bf16" else None)
    assert model.compute == compute
    cfg = model.config
    per_token = 2 * cfg.num_layers * cfg.hidden_size * value_bytes  # keys and values
    seqs, length = 16, 200
    logits = np.empty((1, cfg.vocab_size), np.float32)

    def fill(slot: int) -> None:
        want = np.zeros(length, np.uint8)
        want[-1] = 1
        model.step(np.arange(length, dtype=np.int32), np.full(length, slot, np.int32), want, logits)

    fill(0)  # the step's own scratch is touched once, and stays
    model.clear_sequence(0)
    before = _rss_bytes()
    for slot in range(1, seqs + 1):
        fill(slot)
    grown = _rss_bytes() - before
    held = seqs * length * per_token
    assert held * 0.8 < grown < held * 1.3 + (16 << 20), (grown, held)
    for slot in range(1, seqs + 1):
        model.clear_sequence(slot)
    assert _rss_bytes() - before < 0.2 * grown


def _vm_flags_of_mappings(length: int) -> list[list[str]]:
    """The kernel's VmFlags of every mapping of this process that is length bytes long."""
    found, size = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not head[0].endswith(":"):  # a mapping's first line: start-end perms ...
                start, end = (int(x, 16) for x in head[0].split("-"))
                size = end - start
            elif head[0] == "VmFlags:" and size == length:
                found.append(head[1:])
    return found


def test_a_sequence_cache_stays_out_of_huge_pages(reference_models):
    """Where transparent huge pages are on for every mapping (THP "always"), a first token,
    which writes a little of every head's block, would fault in 2 MiB around each: the cache
    mapping is advised MADV_NOHUGEPAGE (the kernel's flag "nh"), so it grows with what a
    sequence holds whatever the machine's setting."""
    ref = reference_models("gpt-neo-125M")
    model = neocore.load(ref.folder, threads=2)
    model.append([1, 2, 3])
    length = -(-model.cache_bytes(model.context_length) // 4096) * 4096
    flags = _vm_flags_of_mappings(length)
    assert flags and all("nh" in f for f in flags), flags


def test_asyncio_streams(tiny):
    """Submitted from a running event loop, streams are read with `async for`."""
    import asyncio

    async def main() -> list[str]:
        streams = [tiny.engine.submit(Request(tiny.tokenizer.encode(p), GREEDY, 15)) for p in PROMPTS[:4]]
        with pytest.raises(TypeError):
            next(iter(streams[0]))
        return [(await s.aresult()).text for s in streams]

    assert asyncio.run(main()) == tiny.generate(PROMPTS[:4], max_new_tokens=15, temperature=0)


def test_a_stream_read_in_another_event_loop_is_refused(tiny):
    """A stream's chunks are handed to the loop that submitted it: read from another loop it
    would wait for ever, so it says so at once."""
    import asyncio

    async def submit() -> Stream:
        return tiny.engine.submit(Request(tiny.tokenizer.encode(PROMPTS[0]), GREEDY, 5))

    submitter = asyncio.new_event_loop()  # kept running, so that only the refusal can cancel
    thread = threading.Thread(target=submitter.run_forever)
    thread.start()
    try:
        stream = asyncio.run_coroutine_threadsafe(submit(), submitter).result(timeout=10)
        with pytest.raises(TypeError, match="read in the event loop that submitted it"):
            asyncio.run(asyncio.wait_for(stream.aresult(), timeout=10))
        assert not stream.cancelled  # refused, not given up on: its own loop reads it whole
        done = asyncio.run_coroutine_threadsafe(stream.aresult(), submitter).result(timeout=30)
        assert done.text == tiny.generate(PROMPTS[0], max_new_tokens=5, temperature=0)
    finally:
        submitter.call_soon_threadsafe(submitter.stop)
        thread.join(timeout=10)
        submitter.close()


def test_the_blocking_calls_work_inside_a_running_event_loop(tiny):
    """generate, generate_ids and stream wait in the calling thread, whatever loop runs it (a
    notebook's cell, an async web handler)."""
    import asyncio
    ids = tiny.tokenizer.encode(PROMPTS[0])
    expected = (tiny.generate(PROMPTS[0], max_new_tokens=6, temperature=0),
                tiny.generate(PROMPTS[:2], max_new_tokens=6, temperature=0),
                tiny.generate_ids(ids, max_new_tokens=6))

    async def inside() -> tuple:
        return (tiny.generate(PROMPTS[0], max_new_tokens=6, temperature=0),
                tiny.generate(PROMPTS[:2], max_new_tokens=6, temperature=0),
                tiny.generate_ids(ids, max_new_tokens=6),
                "".join(tiny.stream(PROMPTS[0], max_new_tokens=6, temperature=0)))

    *results, streamed = asyncio.run(inside())
    assert tuple(results) == expected and streamed == expected[0]
    with pytest.raises(neocore.NeocoreError, match="need a running event loop"):
        tiny.engine.submit(Request(ids, GREEDY, 3), asynchronous=True)


def test_a_model_that_has_generated_is_freed_when_dropped(reference_models):
    """The engine's thread ends when its work does: waiting, it would hold the model (weights,
    maps, files) for ever."""
    import gc
    import time
    import weakref
    model = neocore.load(reference_models("tiny").folder)
    model.generate(PROMPTS[0], max_new_tokens=3, temperature=0)
    dropped = weakref.ref(model)
    del model
    deadline = time.monotonic() + 10  # the loop's last pass may still be returning
    while dropped() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert dropped() is None


def test_an_interrupted_close_leaves_the_model_usable(reference_models):
    """A real Ctrl-C while close() waits: the running request is cancelled and the loop ends
    before the model makes a new engine, which must not share a slot with the old loop (an
    interrupted Thread.join marks a running thread stopped on CPython 3.9-3.12)."""
    import signal
    model = neocore.load(reference_models("tiny").folder)
    ids = model.tokenizer.encode(PROMPTS[0])
    alone = model.generate_ids(ids, max_new_tokens=8)
    engine = model.engine
    stream = engine.submit(Request([1, 2, 3], GREEDY, 150, text=False, stop_at_eos=False))

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)  # 20 ms into close, the request still running
        with pytest.raises(KeyboardInterrupt):
            engine.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert stream.result().finish_reason == "cancelled"
    assert engine._thread is None and model.engine is not engine
    assert model.generate_ids(ids, max_new_tokens=8) == alone
    for timeout in ("x", float("nan"), -1):
        with pytest.raises(neocore.NeocoreError, match="timeout must be a number of seconds"):
            model.engine.close(timeout)


@pytest.mark.parametrize("timeout", [float("inf"), 1e10, 2 ** 70])
def test_a_close_timeout_past_any_wait_lets_running_requests_finish(reference_models, timeout):
    """Past what a wait can take (threading.TIMEOUT_MAX), a timeout is no bound: close() once
    raised an OverflowError there, and cancelled the requests it was to let finish."""
    model = neocore.load(reference_models("tiny").folder)
    stream = model.engine.submit(Request([1, 2, 3], GREEDY, 30, text=False, stop_at_eos=False), asynchronous=False)
    model.engine.close(timeout)
    done = stream.result()
    assert done.finish_reason == "length" and len(done.tokens) == 30


@pytest.mark.parametrize("make, match", [
    (lambda m: Engine(m, max_batch=1.5), "max_batch must be an integer"),
    (lambda m: Engine(m, max_batch=True), "max_batch must be an integer"),
    (lambda m: Engine(m, max_queue="3"), "max_queue must be an integer"),
    (lambda m: m.engine.submit([1, 2]), "submit takes neocore.engine.Request objects"),
    (lambda m: m.engine.submit(None), "submit takes neocore.engine.Request objects"),
    (lambda m: m.engine.submit(Request([1], GREEDY, 3, stop=b"a")), r"stop must be .* got b'a'"),
    (lambda m: m.engine.submit_all(5), "submit takes neocore.engine.Request objects"),
])
def test_engine_arguments_of_the_wrong_type_are_neocore_errors(reference_models, make, match):
    model = neocore.load(reference_models("tiny").folder)
    with pytest.raises(neocore.NeocoreError, match=match):
        make(model)


def test_a_stream_dropped_unread_is_cancelled(reference_models):
    """model.stream submits at once; a program that drops the iterator without reading it
    must not leave the engine generating every token it asked for."""
    import gc
    import time
    model = neocore.load(reference_models("tiny").folder)
    model.stream(PROMPTS[0], max_new_tokens=150, temperature=0)  # dropped at once
    gc.collect()
    deadline = time.monotonic() + 30
    while model.engine._thread is not None and time.monotonic() < deadline:  # the loop ends with the work
        time.sleep(0.01)
    assert model.engine.stats.tokens_generated < 150


def test_a_stream_closed_unread_is_cancelled(reference_models):
    """Closing model.stream's iterator cancels its request even before the first chunk is read."""
    import time
    model = neocore.load(reference_models("tiny").folder)
    chunks = model.stream(PROMPTS[0], max_new_tokens=150, temperature=0)
    chunks.close()
    deadline = time.monotonic() + 30
    while model.engine._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.engine.stats.tokens_generated < 150
    assert list(chunks) == []  # closed: nothing more comes


def test_a_wait_cut_short_cancels_the_request(reference_models):
    """A timeout around aresult(), or an error while waiting in result(), ends the request."""
    import asyncio
    import time
    model = neocore.load(reference_models("tiny").folder)

    async def main() -> None:
        stream = model.engine.submit(Request([1, 2, 3], GREEDY, 150, text=False, stop_at_eos=False))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stream.aresult(), 0.001)
        assert stream.cancelled

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while model.engine._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.engine.stats.tokens_generated < 150


def test_a_stream_waited_on_by_two_threads_ends_for_both(tiny):
    """result() as a future's: every waiter gets the whole completion."""
    stream = tiny.engine.submit(Request([1, 2, 3], GREEDY, 40, text=False, stop_at_eos=False), asynchronous=False)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(stream.result()), daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 3 and all(r.tokens == results[0].tokens for r in results) and len(results[0].tokens) == 40


def test_an_iterator_of_stops_reaches_every_prompt(tiny):
    text = tiny.generate(PROMPTS[0], max_new_tokens=20, temperature=0)
    stop = text[3:6]
    alone = tiny.generate(PROMPTS[0], max_new_tokens=20, temperature=0, stop=[stop])
    assert tiny.generate([PROMPTS[0]] * 3, max_new_tokens=20, temperature=0, stop=iter([stop])) == [alone] * 3


def test_submit_all_takes_any_iterable_of_requests(tiny):
    made = (Request(tiny.tokenizer.encode(p), GREEDY, 4) for p in PROMPTS[:3])  # read once
    assert [c.text for c in tiny.engine.results(made)] == tiny.generate(PROMPTS[:3], max_new_tokens=4, temperature=0)


def test_an_engine_whose_thread_cannot_start_queues_nothing(reference_models, monkeypatch):
    import threading
    model = neocore.load(reference_models("tiny").folder)
    engine = model.engine
    start = threading.Thread.start

    def refused(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    with pytest.raises(neocore.NeocoreError, match="cannot start the engine's thread"):
        engine.submit(Request([1, 2, 3], GREEDY, 3))
    assert engine.queue_depth == 0 and engine._thread is None
    monkeypatch.setattr(threading.Thread, "start", start)
    assert engine.submit(Request([1, 2, 3], GREEDY, 3)).result().finish_reason == "length"


def test_a_request_submitted_as_the_loop_ends_starts_a_new_loop(reference_models):
    """The loop decides to end and says so under one hold of its lock: a request that comes
    just after finds no loop and starts one, rather than being left to the ending one."""
    import time

    model = neocore.load(reference_models("tiny").folder)
    engine = model.engine
    in_window = threading.Event()

    class PauseAfterTheLastCheck(threading.Condition):
        def __exit__(self, *exc):
            released = super().__exit__(*exc)
            ending = threading.current_thread().name == "neocore-engine" and not engine._waiting \
                and not engine._running and not in_window.is_set()
            if ending:  # the loop has just found nothing to do: hold it here a while
                in_window.set()
                time.sleep(0.05)
            return released

    engine._work = PauseAfterTheLastCheck()
    assert engine.submit(Request([1, 2, 3], GREEDY, 3, text=False)).result().finish_reason == "length"
    assert in_window.wait(10)
    late = engine.submit(Request([1, 2, 3], GREEDY, 3, text=False))
    assert late.result().finish_reason == "length"

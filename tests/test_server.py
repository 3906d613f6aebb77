"""`neocore serve` in a subprocess on a free loopback port, spoken to with the official openai
client and raw HTTP: text equal to model.generate, concurrent streams, disconnects, every error
case with its status and OpenAI error object, metrics, and a clean SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

import neocore
from neocore import chat, server as neocore_server
from neocore.bench_serve import free_port, wait_until_serving
from neocore.engine import Request
from neocore.sampling import SamplingParams

PROMPTS = ["The old lighthouse keeper", "def fibonacci(n):", "Hello", "In 1887, the city of",
           "import numpy as np\n", "Once upon a time there was a", "x", "The results show that the"]
START_TIMEOUT = 60


@contextmanager
def running_server(folder, *flags: str):
    """The real server in a subprocess; stopped with SIGTERM (killed if it hangs) even when the
    test fails. Yields (base_url, process)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "neocore", "serve", "-m", str(folder), "--port", str(port),
                                "--threads", "1", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(__file__)))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, process, START_TIMEOUT, process.stderr.read)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def raw_post(base: str, path: str, declared_length: int, body: bytes = b"") -> socket.socket:
    """A connection that has sent a POST whose Content-Length says declared_length, then body:
    what no HTTP client library sends on purpose."""
    host, port = base.removeprefix("http://").split(":")
    raw = socket.create_connection((host, int(port)), timeout=30)
    raw.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (path.encode(), declared_length) + body)
    return raw


@pytest.fixture(scope="module")
def tiny(reference_models):
    return reference_models("tiny").folder


@pytest.fixture(scope="module")
def model(tiny):
    return neocore.load(tiny)


@pytest.fixture(scope="module")
def server(tiny):
    with running_server(tiny, "--max-batch", "8") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_equals_model_generate(client, model):
    for prompt in PROMPTS[:3]:
        expected = model.generate(prompt, max_new_tokens=20, temperature=0)
        done = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
        assert done.choices[0].text == expected
        assert done.choices[0].finish_reason in ("length", "stop")
        assert done.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
        streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True)
        pieces = [c.choices[0].text for c in streamed]
        assert "".join(pieces) == expected and len(pieces) > 3


def test_prompt_lists_n_seed_stop_and_echo(client, model):
    done = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=12, temperature=0, n=2)
    assert [c.index for c in done.choices] == list(range(6))
    expected = model.generate(PROMPTS[:3], max_new_tokens=12, temperature=0)
    assert [c.text for c in done.choices] == [e for e in expected for _ in range(2)]
    seeded = dict(model="tiny", prompt=PROMPTS[0], max_tokens=15, temperature=1.0, seed=11, n=3)
    a, b = client.completions.create(**seeded), client.completions.create(**seeded)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text == model.generate(PROMPTS[0], max_new_tokens=15, temperature=1.0, top_k=0,
                                               top_p=1.0, seed=11)
    stop = expected[0][3:7]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[0][:expected[0].index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, echo=True,
                                       logprobs=2)
    assert echoed.choices[0].text.startswith(PROMPTS[1])
    lp = echoed.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(model.tokenizer.encode(PROMPTS[1])) + 5
    assert_tops_hold_the_chosen(lp, 2)


def assert_tops_hold_the_chosen(logprobs, k: int) -> None:
    """Each legacy top_logprobs entry past the first (which nothing predicts) holds the k most
    likely tokens and the chosen one with its token_logprob: k entries where the chosen is among
    the k, k + 1 where it is not, and then it is the least likely of them."""
    for token, chosen, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert top[token] == chosen
        assert len(top) == k or (len(top) == k + 1 and chosen <= min(top.values()))


def test_top_p_0_is_the_most_likely_token(client, model):
    """OpenAI takes top_p from 0: some clients send 0 for a deterministic answer; as transformers
    reads it, only the most likely token is left, whatever the temperature and seed."""
    sampled = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=12, temperature=1.5, top_p=0,
                                        seed=3)
    assert sampled.choices[0].text == model.generate(PROMPTS[4], max_new_tokens=12, temperature=0)


def test_echo_with_max_tokens_0_scores_the_prompt(client, model):
    """OpenAI's legacy idiom for a prompt's log-probabilities: nothing is generated, and each
    prompt token's logprob is the one a generating request reports for it."""
    prompt = PROMPTS[5]
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    generated = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                          logprobs=1)
    n = len(model.tokenizer.encode(prompt))
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert choice.logprobs.tokens == generated.choices[0].logprobs.tokens[:n]
    assert choice.logprobs.token_logprobs == generated.choices[0].logprobs.token_logprobs[:n]
    assert choice.logprobs.token_logprobs[0] is None and all(lp < 0 for lp in choice.logprobs.token_logprobs[1:])


def test_streamed_logprobs_offsets_count_from_the_start_of_the_choice(client):
    """As OpenAI's legacy streams do: text_offset runs on across chunks, so a streamed choice's
    logprobs are the non-streamed ones cut into pieces."""
    request = dict(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**request).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in client.completions.create(**request, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def token_name(raw: bytes) -> str:
    """A token's name in logprobs: its text, or, for a token that is part of a character, its
    bytes written as OpenAI writes them ("bytes:\\xe2\\x80")."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_completion_logprobs_tell_partial_tokens_apart(client, model):
    """A prompt of tokens that split characters (’ and an emoji), echoed and scored: each token
    has a name of its own (U+FFFD would give several the same one), and text_offset counts the
    characters of the text before each token."""
    tokenizer = model.tokenizer
    ids = tokenizer.encode("Hi ’’ 😊 x")
    raw = [tokenizer.token_bytes(t) for t in ids]
    assert any(token_name(r).startswith("bytes:") for r in raw)
    choice = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=5).choices[0]
    assert choice.text == b"".join(raw).decode("utf-8")
    assert choice.logprobs.tokens == [token_name(r) for r in raw]
    assert choice.logprobs.text_offset == [len(b"".join(raw[:i]).decode("utf-8", "ignore")) for i in range(len(ids))]
    assert_tops_hold_the_chosen(choice.logprobs, 5)
    # a prompt that ends inside a character is echoed with U+FFFD for it, as decode gives it:
    # the first new token's text begins after that
    cut = next(n for n in range(1, len(ids)) if not b"".join(raw[:n]).decode("utf-8", "ignore")
               == b"".join(raw[:n]).decode("utf-8", "replace"))
    choice = client.completions.create(model="tiny", prompt=ids[:cut], max_tokens=3, echo=True, logprobs=1,
                                       temperature=0).choices[0]
    assert choice.text.startswith(tokenizer.decode(ids[:cut]))
    assert choice.logprobs.text_offset[cut] == len(tokenizer.decode(ids[:cut]))


def test_a_client_gone_while_sending_its_body_leaves_no_traceback(tiny):
    with running_server(tiny) as (base, process):
        raw_post(base, "/v1/chat/completions", 1000, b'{"messages": [').close()  # 14 of its 1000 bytes
        assert httpx.get(base + "/health", timeout=10).status_code == 200  # still serving
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        stderr = process.stderr.read()
    assert "Traceback" not in stderr and "Exception in ASGI application" not in stderr, stderr


def test_chat_completion_uses_the_chat_transcript(client, model):
    messages = [{"role": "system", "content": "A conversation."}, {"role": "user", "content": "What is a lighthouse?"}]
    expected = model.generate(chat.transcript(messages), max_new_tokens=24, temperature=0, stop=chat.STOPS).strip()
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    parts = [{"role": "system", "content": [{"type": "text", "text": "A conversation."}]},
             {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a lighthouse?"}]}]
    done = client.chat.completions.create(model="tiny", messages=parts, max_tokens=24, temperature=0)
    assert done.choices[0].message.content == expected
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                           response_format={"type": "text"}, tool_choice="none")
    assert plain.choices[0].message.content == expected  # what plain text promises is accepted
    # an assistant's content may be null or absent, as OpenAI allows: an empty turn
    turns = [*messages, {"role": "assistant", "content": ""}, {"role": "user", "content": "And?"}]
    expected = model.generate(chat.transcript(turns), max_new_tokens=8, temperature=0, stop=chat.STOPS).strip()
    for empty in ({"role": "assistant", "content": None}, {"role": "assistant"}):
        done = client.chat.completions.create(model="tiny", messages=[*messages, empty, turns[-1]], max_tokens=8,
                                              temperature=0)
        assert done.choices[0].message.content == expected


def test_chat_text_that_spells_a_special_token_stays_text(client, model):
    """'<|endoftext|>' in a message is what its writer wrote, not the end of a document: the
    answer is the one the engine gives the transcript encoded as text (as `neocore chat` feeds it)."""
    messages = [{"role": "system", "content": "A conversation.<|endoftext|>"},
                {"role": "user", "content": "What does <|endoftext|> mean?"}]
    ids = model.tokenizer.encode(chat.transcript(messages), allow_special=False)
    assert model.tokenizer.eos_id not in ids
    expected = model.engine.results([Request(ids, SamplingParams(0, 0, 1.0, 1.0), 24, stop=chat.STOPS)])[0].text
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert done.choices[0].message.content == expected.strip()
    assert done.usage.prompt_tokens == len(ids)


def sse_events(base: str, path: str, body: dict) -> list:
    """Each event's data of a streamed request, parsed ("[DONE]" as it is)."""
    with httpx.stream("POST", base + path, json=body, timeout=60) as response:
        assert response.status_code == 200
        return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                for line in response.iter_lines() if line.startswith("data: ")]


def whitespace_first_messages(model, penalty: float) -> list[dict]:
    """Messages whose greedy answer starts with a token of whitespace only (sent as a chunk of
    its own) followed by one that starts with whitespace. A repetition penalty far below 1
    multiplies the positive logits of the transcript's own tokens, whitespace among them, so a
    short bounded search finds such messages."""
    tokenizer = model.tokenizer
    for gap in (" \r ", " \t ", " \x0b ", " \x0c "):
        for word in ("a", "b", "x", "?", "Z", "ok", "%", "1"):
            messages = [{"role": "user", "content": f"{word}{gap}{word}"}]
            ids = tokenizer.encode(chat.transcript(messages))
            tokens = model.engine.results([Request(ids, SamplingParams(0, 0, 1.0, penalty), 2,
                                                   stop=chat.STOPS)])[0].tokens
            texts = [tokenizer.decode([t]) for t in tokens]
            if len(texts) == 2 and texts[0].strip() == "" and "\n" not in texts[0] and texts[1][:1].isspace():
                return messages
    pytest.fail("no messages found whose answer starts with two whitespace tokens")


def test_streamed_chat_drops_all_the_leading_whitespace_the_answer_drops(client, model):
    """The answer's leading whitespace spans two chunks: streamed, both are stripped, as the
    non-streamed answer strips them."""
    penalty = 1e-5
    messages = whitespace_first_messages(model, penalty)
    request = dict(model="tiny", messages=messages, max_tokens=8, temperature=0,
                   extra_body={"repetition_penalty": penalty})
    expected = model.generate(chat.transcript(messages), max_new_tokens=8, temperature=0, repetition_penalty=penalty,
                              stop=chat.STOPS).strip()
    assert client.chat.completions.create(**request).choices[0].message.content == expected
    streamed = client.chat.completions.create(**request, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_chat_answers_end_without_the_trailing_whitespace_a_transcript_drops(client, model):
    """An answer cut off just after a token of whitespace: both ways the answer is the text as
    the transcript keeps it (chat.turn strips it), the same streamed as not."""
    penalty = 1e-5
    tokenizer = model.tokenizer
    for word in ("a", "b", "x", "?", "Z", "ok", "%", "1"):
        messages = [{"role": "user", "content": f"{word} \t {word} \r {word}"}]
        ids = tokenizer.encode(chat.transcript(messages))
        tokens = model.engine.results([Request(ids, SamplingParams(0, 0, 1.0, penalty), 12, stop=chat.STOPS)])[0].tokens
        ends = [k for k in range(1, len(tokens)) if tokenizer.decode(tokens[:k + 1])[-1:].isspace()
                and tokenizer.decode(tokens[:k]).strip()]
        if ends:
            break
    else:
        pytest.fail("no messages found whose answer has text and then a token ending in whitespace")
    request = dict(model="tiny", messages=messages, max_tokens=ends[0] + 1, temperature=0,
                   extra_body={"repetition_penalty": penalty})
    raw = tokenizer.decode(tokens[:ends[0] + 1])
    assert raw != raw.rstrip()
    assert client.chat.completions.create(**request).choices[0].message.content == raw.strip()
    streamed = client.chat.completions.create(**request, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == raw.strip()


def test_streamed_chat_names_the_role_in_the_first_delta_even_without_text(client, model):
    """A stop string at the very start of the answer: the only chunk has no text, and still
    names the role."""
    messages = [{"role": "user", "content": "What is a lighthouse?"}]
    first = model.generate(chat.transcript(messages), max_new_tokens=1, temperature=0, stop=chat.STOPS).strip()
    assert first
    request = dict(model="tiny", messages=messages, max_tokens=5, temperature=0, stop=[first])
    assert client.chat.completions.create(**request).choices[0].message.content == ""
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""


def test_chat_logprobs_bytes_are_the_tokens_own(client, model):
    """Tokens that are part of a character carry their own bytes, not U+FFFD's, and a name of
    their own; the truth is the engine's token ids and the tokenizer's bytes for them."""
    tokenizer = model.tokenizer
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.encode(chat.transcript(messages))
        truth = model.engine.results([Request(ids, SamplingParams(0, 0, 1.0, 1.0), 8, stop=chat.STOPS,
                                              logprobs=20)])[0].logprobs
        if any(token_name(tokenizer.token_bytes(t)).startswith("bytes:") for e in truth for t, _ in e.top):
            break
    else:
        pytest.fail("no partial token among any prompt's top 20")
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=20)
    content = done.choices[0].logprobs.content
    assert [c.bytes for c in content] == [list(tokenizer.token_bytes(e.token)) for e in truth]
    assert [[t.bytes for t in c.top_logprobs] for c in content] == \
        [[list(tokenizer.token_bytes(t)) for t, _ in e.top] for e in truth]
    assert [[t.token for t in c.top_logprobs] for c in content] == \
        [[token_name(tokenizer.token_bytes(t)) for t, _ in e.top] for e in truth]


def test_usage_counts_each_prompt_once_whatever_n(client, model):
    messages = [{"role": "user", "content": "hi"}]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, n=3)
    assert done.usage.prompt_tokens == len(model.tokenizer.encode(chat.transcript(messages)))
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    done = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=3, temperature=0, n=2)
    assert done.usage.prompt_tokens == sum(len(model.tokenizer.encode(p)) for p in PROMPTS[:2])
    assert done.usage.completion_tokens == 4 * 3


def test_stream_options_include_usage_ends_with_a_usage_chunk(server):
    """As OpenAI's streams: every chunk carries "usage": null, and a last chunk before [DONE]
    has no choices and the usage the non-streamed answer reports."""
    for path, body in (("/v1/completions", {"prompt": PROMPTS[0]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        body = {**body, "max_tokens": 6, "temperature": 0, "n": 2}
        whole = httpx.post(server + path, json=body, timeout=60).json()
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        *chunks, last, done = sse_events(server, path, streamed)
        assert done == "[DONE]" and last["choices"] == [] and last["usage"] == whole["usage"]
        assert chunks and all(c["choices"] and "usage" in c and c["usage"] is None for c in chunks)
        plain = sse_events(server, path, {**body, "stream": True, "stream_options": {"include_usage": False}})
        assert all("usage" not in c for c in plain[:-1]) and plain[-2]["choices"]


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny0"]
    assert httpx.get(server + "/health").json()["status"] == "ok"
    before = metrics(server)
    client.completions.create(model="tiny", prompt="Hello", max_tokens=7, temperature=0)
    after = metrics(server)
    assert after["neocore_requests_total"] == before["neocore_requests_total"] + 1
    assert after["neocore_generated_tokens_total"] >= before["neocore_generated_tokens_total"] + 1
    assert after["neocore_time_to_first_token_seconds_count"] > before["neocore_time_to_first_token_seconds_count"]
    assert {"neocore_queue_depth", "neocore_active_sequences", "neocore_generation_tokens_per_second"} <= set(after)


def test_retrieve_a_model(client, server):
    listed = client.models.list().data[0]
    assert client.models.retrieve(listed.id) == listed
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    response = httpx.get(server + "/v1/models/no-such-model")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found" and response.json()["error"]["param"] == "model"


def test_first_token_summary_count_and_sum_only_grow(server):
    """A Prometheus summary's _count and _sum are counters: past the 1024 waits its quantiles
    are taken over, they still count every first token."""
    name = "neocore_time_to_first_token_seconds"
    before = metrics(server)
    body = {"prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 1, "temperature": 0}
    for _ in range(17):
        assert httpx.post(server + "/v1/completions", json=body, timeout=60).status_code == 200
    after = metrics(server)
    assert after[name + "_count"] - before[name + "_count"] == 17 * 64
    assert after[name + "_sum"] > before[name + "_sum"]


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_eight_concurrent_streaming_clients(client, model):
    prompts = PROMPTS
    expected = model.generate(prompts, max_new_tokens=30, temperature=0)
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=30, temperature=0, stream=True)
        got[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(len(prompts))] == expected


def test_a_client_that_disconnects_frees_its_slot(client, model, server):
    expected = model.generate(PROMPTS[1], max_new_tokens=40, temperature=0)
    other: list[str] = []
    thread = threading.Thread(target=lambda: other.append("".join(
        c.choices[0].text for c in client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=40,
                                                             temperature=0, stream=True))))
    body = {"prompt": PROMPTS[0], "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as response:
        thread.start()
        for i, _ in enumerate(response.iter_lines()):
            if i == 6:
                break  # leave mid-stream
    thread.join(60)
    assert other == [expected]
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["active"] == 0
    assert metrics(server)["neocore_requests_finished_total"] == metrics(server)["neocore_requests_total"]


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "top_p": -0.1}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 9}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 1}, "presence_penalty"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 99999999]}, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt"),  # a bool is not token 1
    # more sequences than the engine runs and queues: refused before any prompt is read
    ("/v1/completions", {"prompt": [[1]] * 200 + [[-1]], "n": 16}, "n"),
    ("/v1/completions", {"prompt": [[1]] * 100_000}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": 5}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 2.5]]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3, -1]]}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 400}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "seed": 2 ** 63}, "seed"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    # more characters than 160 tokens of at most 128 bytes: refused before tokenizing
    ("/v1/completions", {"prompt": "x" * (160 * 128 + 1)}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]}, "messages[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x",
                              "max_completion_tokens": 2}, "max_tokens"),  # checked though the other wins
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    # integers past float's range
    ("/v1/completions", {"prompt": "hi", "temperature": 10 ** 400}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 10 ** 400}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 10 ** 400},
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": -10 ** 400},
     "repetition_penalty"),
    # past what sampling takes (1e-6 to 1e6)
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e7}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-7},
     "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "stop": "x" * 1025}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
     "stop"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    # vLLM's extensions that would steer the output, and values of the wrong type where nothing is asked
    ("/v1/completions", {"prompt": "hi", "min_p": 0.1}, "min_p"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": True}, "ignore_eos"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [13]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "guided_json": {"type": "object"}},
     "guided_json"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": ""}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "suffix": 0}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "seed": -2 ** 63 - 1}, "seed"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": 1}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "use_beam_search": True},
     "use_beam_search"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": True}, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
]


@pytest.mark.parametrize("path, body, param", BAD_REQUESTS)
def test_bad_requests_get_400_and_the_error_object(server, path, body, param):
    response = httpx.post(server + path, json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if body.get("prompt") in ("word " * 400, "x" * (160 * 128 + 1)):
        assert error["code"] == "context_length_exceeded"
    assert httpx.get(server + "/health").status_code == 200  # still serving


def test_a_max_tokens_past_the_room_the_prompt_leaves_is_refused(server, model):
    """As OpenAI and vLLM refuse it, rather than cut the completion short: up to the last
    token that fits (a full context still yields one), the request runs; one more is a 400.
    Without max_tokens, generation stops where the context does."""
    context = model.context_length
    ids = model.tokenizer.encode("word " * context)[:context - 5]

    def ask(path: str, body: dict) -> httpx.Response:
        return httpx.post(server + path, json=body, timeout=60)
    fits = ask("/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0})
    assert fits.status_code == 200
    expected = model.generate_ids(ids, max_new_tokens=6)
    assert fits.json()["usage"]["completion_tokens"] == len(expected)
    for path, body, param in [
            ("/v1/completions", {"prompt": ids, "max_tokens": 7}, "max_tokens"),
            ("/v1/completions", {"prompt": ["hi", ids], "max_tokens": 7}, "max_tokens"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": context},
             "max_tokens"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                      "max_completion_tokens": context}, "max_completion_tokens")]:
        response = ask(path, body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == "context_length_exceeded"
        assert f"context holds {context} tokens" in error["message"]
    unbounded = ask("/v1/completions", {"prompt": ids, "temperature": 0})  # the default, 16
    assert unbounded.status_code == 200 and unbounded.json()["choices"][0]["text"] == model.generate(
        model.tokenizer.decode(ids), max_new_tokens=6, temperature=0)


def test_vllms_spellings_of_nothing_asked_are_taken(client, server, model):
    """top_k -1 (vLLM's "off"), a negative seed, a whole number written as a float, tools the
    model may not call, and extensions at the value that asks for nothing."""
    common = dict(model="tiny", prompt=PROMPTS[3], max_tokens=10, temperature=1.0)
    off = client.completions.create(**common, seed=4, extra_body={"top_k": -1}).choices[0].text
    assert off == model.generate(PROMPTS[3], max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, seed=4)
    negative = [client.completions.create(**common, seed=-1).choices[0].text for _ in range(2)]
    assert negative[0] == negative[1] == model.generate(PROMPTS[3], max_new_tokens=10, temperature=1.0, top_k=0,
                                                        top_p=1.0, seed=2 ** 63 - 1)
    whole = httpx.post(server + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4.0, "n": 1.0,
                                                         "temperature": 0, "min_p": 0, "ignore_eos": False,
                                                         "stop_token_ids": [], "guided_json": None}, timeout=60)
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["text"] == model.generate(PROMPTS[0], max_new_tokens=4, temperature=0)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, tools=tools, tool_choice="none")
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
    assert answer.choices[0].message.content == plain.choices[0].message.content


def test_chat_too_long_for_the_context_names_messages(server):
    body = {"messages": [{"role": "user", "content": "word " * 400}]}
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    assert "prompt" not in error["message"] and error["message"].startswith("the conversation is ")


def test_a_body_over_the_size_limit_gets_413(server):
    """Sent whole (with its Content-Length) or in chunks (without), a body past the limit is
    refused once the limit is read."""
    big = b'{"prompt": "' + b"x" * neocore_server.MAX_BODY_BYTES + b'"}'
    for content in (big, iter([big[i:i + 65536] for i in range(0, len(big), 65536)])):
        response = httpx.post(server + "/v1/completions", content=content, headers={"content-type": "application/json"},
                              timeout=60)
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "invalid_request_error" and response.json()["error"]["message"]
    # a Content-Length past the limit is refused before any of the body is read
    with raw_post(server, "/v1/completions", neocore_server.MAX_BODY_BYTES + 1) as raw:
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")
    assert httpx.get(server + "/health").status_code == 200


def test_malformed_bodies_and_unknown_routes(server, client):
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(server + "/v1/completions", content=content,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["message"]
    for method, path, status in (("GET", "/v1/nothing", 404), ("POST", "/v1/completions/", 404),
                                 ("GET", "/v1/completions", 405)):
        response = httpx.request(method, server + path)
        error = response.json()["error"]
        assert response.status_code == status and f"{method} {path}" in error["message"]
        assert error["type"] == "invalid_request_error" and error["code"] is None
        if status == 405:
            assert response.headers["allow"] == "POST"  # what a 405 must say (RFC 9110)
    assert httpx.head(server + "/health").status_code == 200
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", temperature=-1)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None


def test_hostile_text_and_bodies_get_400(server, model):
    """Lone UTF-16 surrogates (valid JSON escapes, not Unicode), JSON nested past Python's
    recursion limit, and a single 20,000-letter word (n log n to tokenize, then too long)."""
    cases = [(b'{"prompt": "caf\\ud800"}', "/v1/completions", "prompt"),
             (b'{"prompt": ["ok", "\\udfff"]}', "/v1/completions", "prompt"),
             (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "/v1/chat/completions", "messages"),
             (b"[" * 100_000 + b"]" * 100_000, "/v1/completions", None),
             (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "/v1/chat/completions", None),
             (json.dumps({"prompt": "ab" * 10_000}).encode(), "/v1/completions", "prompt"),
             # more digits than Python turns into an int (4300): json.loads raises ValueError
             (b'{"prompt": "hi", "seed": 1' + b"0" * 5000 + b"}", "/v1/completions", None),
             (b'{"messages": [], "temperature": 1' + b"0" * 5000 + b"}", "/v1/chat/completions", None)]
    for content, path, param in cases:
        response = httpx.post(server + path, content=content, headers={"content-type": "application/json"},
                              timeout=60)
        assert response.status_code == 400, content[:40]
        assert response.json()["error"]["param"] == param and response.json()["error"]["message"]
    expected = model.generate("hi", max_new_tokens=5, temperature=0)
    done = httpx.post(server + "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "temperature": 0})
    assert done.json()["choices"][0]["text"] == expected


def test_a_temperature_below_float32_is_greedy(server, model):
    expected = model.generate(PROMPTS[0], max_new_tokens=12, temperature=0)
    body = b'{"prompt": "%s", "max_tokens": 12, "temperature": 1e-300}' % PROMPTS[0].encode()
    response = httpx.post(server + "/v1/completions", content=body, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected


def test_more_sequences_than_the_server_ever_holds_get_400_not_429(server):
    """8 running + 64 queued at most: 5 prompts x n=16 can never fit, so retrying is pointless."""
    before = metrics(server)["neocore_requests_total"]
    response = httpx.post(server + "/v1/completions", json={"prompt": ["a", "b", "c", "d", "e"], "n": 16}, timeout=60)
    assert response.status_code == 400 and "80 sequences" in response.json()["error"]["message"]
    assert metrics(server)["neocore_requests_total"] == before  # nothing was queued


def test_a_non_streaming_client_that_disconnects_frees_its_slots(server):
    before = metrics(server)
    body = {"prompt": "x", "max_tokens": 159, "n": 16, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 30
    while httpx.get(server + "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = metrics(server)
    assert httpx.get(server + "/health").json()["active"] == 0
    # cancelled: far fewer than the 16 x 159 tokens asked for
    assert after["neocore_generated_tokens_total"] - before["neocore_generated_tokens_total"] < 16 * 159 / 2
    assert after["neocore_requests_finished_total"] == after["neocore_requests_total"]


def test_the_banner_names_the_port_bound_and_the_model(tiny, tmp_path):
    """--port 0 takes some free port: the line saying where the server listens names it. The
    model's name is its folder's, '.' included; a hub id's is its last part (its folder is a
    snapshot named by a commit hash)."""
    process = subprocess.Popen([sys.executable, "-m", "neocore", "serve", "-m", ".", "--port", "0",
                                "--threads", "1"], stderr=subprocess.PIPE, text=True, cwd=tiny)
    try:
        banner = process.stderr.readline()
        assert banner.startswith(f"neocore: serving {tiny.name} on http://127.0.0.1:"), banner
        base = banner.split(" on ")[1].split()[0]
        assert int(base.removesuffix("/v1").rsplit(":", 1)[1]) > 0
        assert httpx.get(base + "/models").json()["data"][0]["id"] == tiny.name
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert neocore_server.served_name("EleutherAI/gpt-neo-125M") == "gpt-neo-125M"
    (tmp_path / "my-model").symlink_to(tiny)  # a link's own name, not its target's
    assert neocore_server.served_name(tmp_path / "my-model") == "my-model"


ORIGIN = "http://localhost:3000"


def test_api_key_and_web_pages_of_an_allowed_origin(tiny):
    with running_server(tiny, "--api-key", "s3cret", "--allow-origin", ORIGIN) as (base, _):
        for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                       {"Authorization": "Bearer  s3cret"}, {"Authorization": "Basic s3cret"}):
            response = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=header)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        lower = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                           headers={"Authorization": "bearer s3cret"})  # the scheme is case-insensitive
        assert lower.status_code == 200
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(base + "/health").status_code == 200  # health needs no key
        # a browser's preflight, before a page's request with the key and OpenAI's own headers
        preflight = httpx.options(base + "/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "x-stainless-os" in preflight.headers["access-control-allow-headers"].lower()
        asked = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                           headers={"Origin": ORIGIN, "Authorization": "Bearer s3cret"})
        assert asked.status_code == 200 and asked.headers["access-control-allow-origin"] == ORIGIN
        refused = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                             headers={"Origin": ORIGIN})  # the page can read why: the error carries the header
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
        other = httpx.options(base + "/v1/completions", headers={
            "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_no_origin_is_allowed_unless_named(server):
    """Without --allow-origin a page of another origin gets no CORS grant: its preflight is
    an unknown method (405), and a request's answer names no origin, so a browser hides it."""
    preflight = httpx.options(server + "/v1/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    asked = httpx.get(server + "/v1/models", headers={"Origin": ORIGIN})
    assert asked.status_code == 200 and "access-control-allow-origin" not in asked.headers


def test_full_queue_gets_429_then_serving_resumes(tiny, model):
    """One place and no queue: of eight requests sent at once, those that find the place taken
    are refused with 429, the others complete; afterwards the server serves again."""
    expected = model.generate(PROMPTS[0], max_new_tokens=150, temperature=0)
    with running_server(tiny, "--max-batch", "1", "--max-queue", "0") as (base, _):
        body = {"prompt": PROMPTS[0], "max_tokens": 150, "temperature": 0}
        start = threading.Barrier(8)
        responses: list[httpx.Response] = []

        def ask() -> None:
            start.wait(30)
            responses.append(httpx.post(base + "/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        refused = [r for r in responses if r.status_code == 429]
        served = [r for r in responses if r.status_code == 200]
        assert len(refused) + len(served) == 8 and refused and served
        for r in refused:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
            assert "(the queue holds 0 of its 0 places; this request needs 1)" in r.json()["error"]["message"]
        assert all(r.json()["choices"][0]["text"] == expected for r in served)
        ok = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and metrics(base)["neocore_requests_rejected_total"] == len(refused)
        # n=2 can never fit one place and no queue: a chat request is refused for that before
        # its messages are read (these would be refused too)
        never = httpx.post(base + "/v1/chat/completions", json={"n": 2, "messages": [{"role": "wizard"}]})
        assert never.status_code == 400 and never.json()["error"]["param"] == "n"


def test_rejected_sequences_are_counted_as_accepted_ones_are(tiny):
    """Both counters count sequences: of eight requests for n=2 sent at once to two places and
    no queue, each accepted one adds 2 to neocore_requests_total, each refused one 2 to
    neocore_requests_rejected_total."""
    with running_server(tiny, "--max-batch", "2", "--max-queue", "0") as (base, _):
        body = {"prompt": "x", "n": 2, "max_tokens": 159, "temperature": 1.0}
        start = threading.Barrier(8)
        statuses: list[int] = []

        def ask() -> None:
            start.wait(30)
            statuses.append(httpx.post(base + "/v1/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(statuses) == 8 and set(statuses) == {200, 429}
        values = metrics(base)
        assert values["neocore_requests_total"] == 2 * statuses.count(200)
        assert values["neocore_requests_rejected_total"] == 2 * statuses.count(429)
        helps = [line for line in httpx.get(base + "/metrics").text.splitlines()
                 if line.startswith("# HELP neocore_requests_")]
        assert len(helps) == 3 and all("sequences" in line.lower() for line in helps)


def test_sigterm_lets_running_requests_finish_and_exits_0(tiny, model):
    expected = model.generate(PROMPTS[3], max_new_tokens=60, temperature=0)
    with running_server(tiny) as (base, process):
        body = {"prompt": PROMPTS[3], "max_tokens": 60, "temperature": 0, "stream": True}
        text = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
            for i, line in enumerate(response.iter_lines()):
                if i == 2:
                    process.send_signal(signal.SIGTERM)
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(text) == expected
        assert process.wait(30) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(base + "/health", timeout=2)


def test_shutdown_timeout_ends_running_requests_with_an_error(tiny):
    """--shutdown-timeout 0: SIGTERM cancels what is running; a non-streamed request gets a 503
    error object, a streamed one an error event and [DONE], and the server logs no traceback."""
    with running_server(tiny, "--shutdown-timeout", "0") as (base, process):
        answers: list[httpx.Response] = []
        events = []
        body = {"prompt": "x", "max_tokens": 159, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
            for i, line in enumerate(response.iter_lines()):
                if i == 0:  # the stream runs: now a request of 8 sequences beside it
                    body = {"prompt": "x", "max_tokens": 159, "n": 8, "temperature": 1.0}
                    thread = threading.Thread(target=lambda: answers.append(
                        httpx.post(base + "/v1/completions", json=body, timeout=60)))
                    thread.start()
                    deadline = time.monotonic() + 30
                    while httpx.get(base + "/health").json()["active"] < 9 and time.monotonic() < deadline:
                        time.sleep(0.005)
                    # the 8 have 159 tokens to go, the stream as many less the few it has made
                    process.send_signal(signal.SIGTERM)
                if line.startswith("data: "):
                    events.append(line[6:])
        thread.join(60)
        assert process.wait(30) == 0
        stderr = process.stderr.read()
    assert answers[0].status_code == 503 and answers[0].json()["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    assert "Traceback" not in stderr and "Exception in ASGI application" not in stderr


@pytest.mark.parametrize("flags, message", [(["--port", "70000"], "--port"), (["--max-queue", "-1"], "--max-queue"),
                                            (["--max-batch", "0"], "--max-batch must be between 1 and 128"),
                                            (["--host", "999.999.999.999"], "--host '999.999.999.999' is not an address")])
def test_bad_serve_flags_are_one_line_errors(tiny, flags, message):
    done = subprocess.run([sys.executable, "-m", "neocore", "serve", "-m", str(tiny), *flags],
                          capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 1 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_echo_of_ids_past_the_tokenizers_is_refused_and_text_never_names_them(padded_vocab):
    """A padded vocabulary (rows that win every argmax): echo needs ids with text (400 before
    anything runs), and a text request's log-probabilities name only ids the tokenizer has."""
    with running_server(padded_vocab) as (base, _):
        bad = httpx.post(base + "/v1/completions", json={"prompt": [5, 50258], "echo": True, "max_tokens": 1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
        body = {"prompt": PROMPTS[0], "echo": True, "logprobs": 5, "max_tokens": 3, "temperature": 0}
        good = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert good.status_code == 200  # a padded id among the top 5 had no name: 400 before
        tops = good.json()["choices"][0]["logprobs"]["top_logprobs"]
        assert tops[0] is None and len(tops) > 3 and all(len(top) in (5, 6) for top in tops[1:])

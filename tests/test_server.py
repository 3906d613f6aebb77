"""`neocore serve` in a subprocess on a free loopback port, spoken to with the official openai
client and raw HTTP: text equal to model.generate, concurrent streams, disconnects, every error
case with its status and OpenAI error object, metrics, and a clean SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

import neocore
from neocore import chat
from neocore.bench_serve import free_port, wait_until_serving

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
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])


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


def test_chat_completion_uses_the_chat_transcript(client, model):
    messages = [{"role": "system", "content": "A conversation."}, {"role": "user", "content": "What is a lighthouse?"}]
    expected = model.generate(chat.transcript(messages), max_new_tokens=24, temperature=0, stop=chat.STOPS).lstrip()
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
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 9}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 1}, "presence_penalty"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 99999999]}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 400}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "seed": 2 ** 63}, "seed"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    # more characters than 160 tokens of at most 128 bytes: refused before tokenizing
    ("/v1/completions", {"prompt": "x" * (160 * 128 + 1)}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
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


def test_malformed_bodies_and_unknown_routes(server, client):
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(server + "/v1/completions", content=content,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["message"]
    response = httpx.get(server + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()
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
             (json.dumps({"prompt": "ab" * 10_000}).encode(), "/v1/completions", "prompt")]
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


def test_api_key(tiny):
    with running_server(tiny, "--api-key", "s3cret") as (base, _):
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
        assert all(r.json()["choices"][0]["text"] == expected for r in served)
        ok = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and metrics(base)["neocore_requests_rejected_total"] == len(refused)


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


@pytest.mark.parametrize("flags, message", [(["--port", "70000"], "--port"), (["--max-queue", "-1"], "--max-queue"),
                                            (["--max-batch", "0"], "max_batch"),
                                            (["--host", "999.999.999.999"], "--host '999.999.999.999' is not an address")])
def test_bad_serve_flags_are_one_line_errors(tiny, flags, message):
    done = subprocess.run([sys.executable, "-m", "neocore", "serve", "-m", str(tiny), *flags],
                          capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 1 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

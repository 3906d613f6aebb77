"""neocore.ray on a local Ray instance (2 CPUs, loopback only, one instance for the module:
Ray's start-up is slow): Ray Data jobs row for row against the model run in this process,
one prompt or text at a time; a Ray Serve application of 2 replicas spoken to with the
official openai client; and `neocore serve --ray-replicas` joining the running instance
through RAY_ADDRESS, as it would join a cluster."""
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
from pathlib import Path

import httpx
import numpy as np
import openai
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray import serve

import neocore
import neocore.ray
from neocore.bench_serve import free_port, wait_until_serving

# Ray's workers are processes of their own: they must import neocore from where this process
# did (the work tree in development, an editable install in CI).
SOURCE_ROOT = Path(neocore.__file__).resolve().parent.parent
START_TIMEOUT = 180   # Ray and Serve start slowly on a busy 2-core machine
KEY = "test-key"
WORDS = ["The old lighthouse keeper", "def fibonacci(n):", "Hello", "In 1887, the city of",
         "import numpy as np\n", "Once upon a time there was a", "x", "The results show that the"]
# 64 prompts, all different, of 1 to 16 tokens
PROMPTS = [f"{a} {b}" if i % 3 else a + b.split()[0]
           for i, (a, b) in enumerate((a, b) for a in WORDS for b in reversed(WORDS))]
SAMPLING = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def local_ray():
    """ray.init(num_cpus=2), shut down at the end of the module even when a test fails. The
    raylet, and so every worker it starts, inherits this process's environment: PYTHONPATH to
    find neocore, and Ray's usage reporting off (nothing leaves the machine)."""
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), saved["PYTHONPATH"]) if p)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def folder(reference_models):
    return str(reference_models("tiny").folder)


@pytest.fixture(scope="module")
def model(folder):
    return neocore.load(folder, threads=1)


def by_id(rows: list[dict]) -> list[dict]:
    """Ray Data does not promise the input's order: rows are matched by their id column."""
    rows = sorted(rows, key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(len(rows)))
    return rows


def generate(dataset, actors: int, batch_size: int, **kwargs) -> list[dict]:
    job = dataset.map_batches(neocore.ray.Generate, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                              compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
    return by_id(job.take_all())


def test_greedy_rows_equal_each_prompt_generated_alone(local_ray, folder, model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    # read before the job: its two actors take both of the instance's CPUs, leaving none to a read task
    prompts = ray.data.read_json(str(data)).materialize()
    rows = generate(prompts, actors=2, batch_size=8, model=folder, max_new_tokens=12, temperature=0)
    assert len(rows) == 64
    for row, prompt in zip(rows, PROMPTS):
        ids = model.tokenizer.encode(prompt)
        alone = model.generate_ids(ids, max_new_tokens=12)
        assert row["error"] is None
        assert row["generated_text"] == model.generate(prompt, max_new_tokens=12, temperature=0)
        assert (row["prompt_tokens"], row["generated_tokens"]) == (len(ids), len(alone))
        assert row["finish_reason"] == ("stop" if alone[-1] == model.config.eos_token_id else "length")
    assert len({r["generated_text"] for r in rows}) > 32


def test_a_seeded_row_does_not_depend_on_batching_or_actor(local_ray, folder, model):
    """Even rows carry their own seed; odd rows have none and take the job's seed."""
    items = [{"id": i, "prompt": p, "seed": 1000 + i if i % 2 == 0 else None} for i, p in enumerate(PROMPTS)]
    expected = [model.generate(p, seed=1000 + i if i % 2 == 0 else 7, **SAMPLING) for i, p in enumerate(PROMPTS)]
    for actors, batch_size in ((2, 8), (1, 5)):
        rows = generate(ray.data.from_items(items), actors, batch_size, model=folder, seed=7, **SAMPLING)
        assert [r["generated_text"] for r in rows] == expected
    assert len(set(expected)) > 32


def test_a_bad_row_gets_an_error_and_the_job_goes_on(local_ray, folder, model):
    bad = {"": "the prompt is empty", None: "the prompt is missing", "word " * 200: "201 tokens long"}
    items = [{"id": 0, "prompt": PROMPTS[0], "seed": 3}]
    items += [{"id": 1 + i, "prompt": p, "seed": 3} for i, p in enumerate(bad)]
    items += [{"id": 4, "prompt": PROMPTS[1], "seed": -1}, {"id": 5, "prompt": PROMPTS[2], "seed": 2.5},
              {"id": 6, "prompt": PROMPTS[3], "seed": 3}]
    rows = generate(ray.data.from_items(items), actors=1, batch_size=4, model=folder, **SAMPLING)
    for row, reason in zip(rows[1:6], list(bad.values()) + ["integer >= 0, got -1", "integer >= 0, got 2.5"]):
        assert reason in row["error"]
        assert [row[c] for c in ("generated_text", "prompt_tokens", "generated_tokens", "finish_reason")] == [None] * 4
    for row in (rows[0], rows[6]):
        assert row["error"] is None
        assert row["generated_text"] == model.generate(row["prompt"], seed=3, **SAMPLING)


def test_score_rows_equal_model_score(local_ray, folder, model):
    context = model.context_length
    # texts of context - 2 and context - 1 tokens: the last that the engine reads whole (after
    # <|endoftext|>, with room for one token) and the first scored in windows; then a long one
    texts = PROMPTS[:20] + [" x" * (context - 2), " x" * (context - 1), " ".join(PROMPTS * 3), "", None]
    assert [len(model.tokenizer.encode(t)) for t in texts[20:22]] == [context - 2, context - 1]
    items = [{"id": i, "text": t} for i, t in enumerate(texts)]
    job = ray.data.from_items(items).map_batches(
        neocore.ray.Score, fn_constructor_kwargs={"model": folder}, batch_size=6,
        compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
    rows = by_id(job.take_all())
    assert len(model.tokenizer.encode(texts[-3])) > 2 * context
    for row, text in zip(rows[:-2], texts[:-2]):
        expected = model.score(text)
        assert row["error"] is None
        assert row["tokens"] == len(expected.tokens)
        # the engine's log-softmax exponentiates in float64, Model.score's in float32
        assert row["log_prob"] == pytest.approx(float(expected.logprobs.sum()), rel=1e-7)
        assert row["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert "the text is empty" in rows[-2]["error"] and "missing" in rows[-1]["error"]
    assert rows[-1]["log_prob"] is None and rows[-1]["tokens"] is None and rows[-1]["perplexity"] is None


def test_an_actor_with_part_of_a_cpu_runs_one_thread(local_ray):
    """Not every core of the node (each such actor would take them all)."""
    @ray.remote(num_cpus=0.5)
    class Actor:
        def threads(self) -> int:
            from neocore.ray import _threads
            return _threads(None)

    actor = Actor.remote()
    try:
        assert ray.get(actor.threads.remote(), timeout=120) == 1
    finally:
        ray.kill(actor)


def test_the_callables_take_pandas_batches_outside_ray(folder, model):
    """Ray Data's pandas batch format, where a null may come as NaN; no Ray needed."""
    import pandas as pd
    rows = neocore.ray.Generate(folder, threads=1, max_new_tokens=8, temperature=0)(
        pd.DataFrame({"prompt": [PROMPTS[0], np.nan, PROMPTS[1]]}))
    # pandas keeps a null in a column of strings as NaN
    assert list(rows["generated_text"].isna()) == [False, True, False] and list(rows["error"].isna()) == [True, False, True]
    assert list(rows["generated_text"][[0, 2]]) == [model.generate(p, max_new_tokens=8, temperature=0)
                                                    for p in PROMPTS[:2]]
    assert rows["error"][1] == "the prompt is missing"
    # pandas' nullable columns hold pd.NA for a null: a missing seed takes the default
    seeded = pd.DataFrame({"prompt": pd.array([PROMPTS[0], None], dtype="string"),
                           "seed": pd.array([pd.NA, 3], dtype="Int64")})
    generator = neocore.ray.Generate(folder, threads=1, max_new_tokens=8, seed=11, huge_pages=False)
    assert generator.model.weight_pages == "in memory (huge pages not asked for)"
    rows = generator(seeded)
    assert rows["generated_text"][0] == model.generate(PROMPTS[0], max_new_tokens=8, seed=11)
    assert rows["error"][1] == "the prompt is missing"
    scorer = neocore.ray.Score(folder, threads=1, huge_pages=False)  # load options reach the load
    assert scorer.model.weight_pages == "in memory (huge pages not asked for)"
    scores = scorer(pd.DataFrame({"text": [PROMPTS[2], 7]}))
    assert scores["tokens"][0] == len(model.tokenizer.encode(PROMPTS[2]))
    assert scores["error"][1] == "the text must be a string, got int"
    # a column of integers with a null comes as floats: one past 2**53 may have lost digits
    rows = neocore.ray.Generate(folder, threads=1, max_new_tokens=8, seed=11)(
        {"prompt": np.array(PROMPTS[:3], object), "seed": np.array([2.0 ** 60, np.nan, 5.0])})
    assert "is a float past 2**53" in rows["error"][0].as_py()
    assert rows["generated_text"][1:].to_pylist() == [model.generate(PROMPTS[1], max_new_tokens=8, seed=11),
                                                      model.generate(PROMPTS[2], max_new_tokens=8, seed=5)]
    # pyarrow's format: a Table, its columns typed (a column of the same name replaced)
    table = neocore.ray.Generate(folder, threads=1, max_new_tokens=8, temperature=0)(
        pa.table({"prompt": [PROMPTS[0], None], "error": ["upstream", "upstream"]}))
    assert table.column_names == ["prompt", "error", *[c for c in neocore.ray.GENERATED if c != "error"]]
    assert table.column("generated_text").to_pylist() == [model.generate(PROMPTS[0], max_new_tokens=8,
                                                                         temperature=0), None]
    assert table.column("error").to_pylist() == [None, "the prompt is missing"]
    assert table.schema.field("prompt_tokens").type == pa.int64()
    with pytest.raises(neocore.NeocoreError, match="the batch has no 'prompt' column \\(its columns: text\\)"):
        neocore.ray.Generate(folder, threads=1)(pd.DataFrame({"text": ["a"]}))
    with pytest.raises(neocore.NeocoreError, match="the batch has no 'text' column \\(its columns: prompt, seed\\)"):
        neocore.ray.Score(folder, threads=1)({"prompt": np.array(["a"]), "seed": np.array([1])})


@pytest.mark.parametrize("batch_format", ["numpy", "pandas", "pyarrow"])
def test_a_block_of_failed_rows_keeps_the_columns_types(local_ray, folder, tmp_path, batch_format):
    """A batch whose rows all fail has only nulls in the new columns: typed, its Parquet file
    has the schema of the others, so pandas and pyarrow read the folder back (not Ray alone)."""
    rows = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1]}, {"prompt": ""}, {"prompt": "word " * 300}]
    out = tmp_path / "out"
    ray.data.from_items(rows, override_num_blocks=2).map_batches(
        neocore.ray.Generate, fn_constructor_kwargs={"model": folder, "threads": 1, "max_new_tokens": 4},
        concurrency=1, num_cpus=1, batch_size=2, batch_format=batch_format).write_parquet(str(out))
    read = pd.read_parquet(out).sort_values("prompt", key=lambda p: p.str.len())
    assert list(read["error"].isna()) == [False, True, True, False]
    assert list(read["generated_tokens"].isna()) == [True, False, False, True]
    assert pq.read_table(out).schema.field("prompt_tokens").type == pa.int64()


def ask_concurrently(client: openai.OpenAI, prompts: list[str]) -> list[tuple[str, str]]:
    """(text, replica header) of each prompt's greedy completion, all asked at once."""
    answers: dict[int, tuple[str, str]] = {}

    def ask(i: int) -> None:
        raw = client.completions.with_raw_response.create(model="tiny", prompt=prompts[i], max_tokens=16,
                                                          temperature=0)
        answers[i] = (raw.parse().choices[0].text, raw.headers["x-neocore-replica"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(answers) == len(prompts), "a request did not finish"
    return [answers[i] for i in range(len(prompts))]


@contextmanager
def served(application):
    """Serve on a free loopback port with this application; Serve is shut down afterwards
    (even on failure) so that a later start may choose its own port."""
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application, name="test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_serve_replicas_answer_the_openai_client_and_share_the_load(local_ray, folder, model):
    origin = "https://chat.example"
    with served(neocore.ray.app(folder, num_replicas=2, threads_per_replica=1, api_key=KEY, name="tiny",
                                allow_origins=[origin])) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        from_page = httpx.get(base + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
        assert from_page.headers["access-control-allow-origin"] == origin
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(0, 64, 4)]
        answers = ask_concurrently(client, prompts)
        assert [text for text, _ in answers] == [model.generate(p, max_new_tokens=16, temperature=0)
                                                 for p in prompts]
        assert len({replica for _, replica in answers}) == 2
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, seed=5)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError, match="context"):
            client.completions.create(model="tiny", prompt="word " * 200, max_tokens=4)


def test_a_replica_runs_as_many_streams_at_once_as_its_engine_takes(local_ray, folder):
    """Serve's own limit (5 requests a replica by default) must not cap the engine's batch:
    8 streams sent at once to one replica with max_batch 8 all begin before any ends."""
    with served(neocore.ray.app(folder, num_replicas=1, threads_per_replica=1, max_batch=8, name="tiny")) as base:
        body = {"prompt": "x", "max_tokens": 150, "temperature": 0, "stream": True}
        start = threading.Barrier(8)
        begun: list[float] = []
        ended: list[float] = []

        def ask() -> None:
            start.wait(30)
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as response:
                lines = response.iter_lines()
                next(line for line in lines if line.startswith("data: {"))
                begun.append(time.monotonic())
                assert [line for line in lines if line][-1] == "data: [DONE]"
                ended.append(time.monotonic())

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert len(ended) == 8, "a stream did not finish"
        assert max(begun) < min(ended)


def test_cli_ray_replicas_join_a_running_instance(local_ray, folder, model, tmp_path):
    """What `ray start --head` + RAY_ADDRESS gives a user, with this module's instance as the
    cluster; SIGTERM takes the application down and the command exits cleanly."""
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": local_ray, "NEOCORE_API_KEY": KEY}
    log = open(tmp_path / "serve.log", "w+")  # a file: Ray's chatter would fill a pipe
    process = subprocess.Popen([sys.executable, "-m", "neocore", "serve", "--ray-replicas", "2", "-m", folder,
                                "--threads", "1", "--port", str(port), "--name", "tiny"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=SOURCE_ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, process, START_TIMEOUT, (tmp_path / "serve.log").read_text)
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        answers = ask_concurrently(client, PROMPTS[:8])
        assert [text for text, _ in answers] == [model.generate(p, max_new_tokens=16, temperature=0)
                                                 for p in PROMPTS[:8]]
        assert all(replica.startswith("SERVE_REPLICA::neocore#") for _, replica in answers)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert "neocore" not in serve.status().applications
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_cli_ray_replicas_that_fail_to_start_say_why_and_leave_nothing(local_ray, tmp_path):
    """Serve reports only that a deployment failed: the command names the replicas' error (a
    model folder they cannot find), and takes down the failed application and its proxy."""
    env = {**os.environ, "RAY_ADDRESS": local_ray}
    done = subprocess.run([sys.executable, "-m", "neocore", "serve", "--ray-replicas", "1", "-m", str(tmp_path / "nope"),
                           "--threads", "1", "--port", str(free_port())], capture_output=True, text=True, env=env,
                          cwd=SOURCE_ROOT, timeout=START_TIMEOUT)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (f"neocore: error: the replicas failed to start: "
                                                    f"neocore.errors.ModelNotFoundError: {tmp_path / 'nope'}: "
                                                    f"no such model folder")
    assert serve.status().applications == {}


def test_cli_ray_replicas_that_need_more_cpus_than_the_cluster_has_are_refused(local_ray, folder):
    """Serve would wait for the CPUs without end, saying so only in its logs."""
    env = {**os.environ, "RAY_ADDRESS": local_ray}
    done = subprocess.run([sys.executable, "-m", "neocore", "serve", "--ray-replicas", "2", "-m", folder,
                           "--threads", "2", "--port", str(free_port())], capture_output=True, text=True, env=env,
                          cwd=SOURCE_ROOT, timeout=START_TIMEOUT)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("neocore: error: 2 replicas of 2 threads need 4 CPUs, and the "
                                                    "Ray cluster has 2 free: ask for fewer replicas or threads")
    assert serve.status().applications == {}


def test_cli_ray_replicas_that_need_cpus_other_work_holds_are_refused(local_ray, folder):
    """CPUs the cluster has but other work holds: Serve would wait for them without end too."""
    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    try:
        ray.get(holder.ready.remote(), timeout=60)
        env = {**os.environ, "RAY_ADDRESS": local_ray}
        done = subprocess.run([sys.executable, "-m", "neocore", "serve", "--ray-replicas", "1", "-m", folder,
                               "--threads", "1", "--port", str(free_port())], capture_output=True, text=True, env=env,
                              cwd=SOURCE_ROOT, timeout=START_TIMEOUT)
    finally:
        ray.kill(holder)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "neocore: error: 1 replicas of 1 threads need 1 CPUs, and the Ray cluster has 0 free (2 of its 2 taken by "
        "other work): ask for fewer replicas or threads")


def test_cli_ray_replicas_leave_an_application_already_serving_alone(local_ray, folder):
    """A second command on the same cluster once redeployed the first one's application in
    place, and on its Ctrl-C deleted it under the first."""
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": local_ray}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(neocore.ray.app(folder, num_replicas=1, threads_per_replica=1, name="first"),
                  name=neocore.ray.APP_NAME, route_prefix="/")
        done = subprocess.run([sys.executable, "-m", "neocore", "serve", "--ray-replicas", "1", "-m", folder,
                               "--threads", "1", "--port", str(port), "--name", "second"], capture_output=True,
                              text=True, env=env, cwd=SOURCE_ROOT, timeout=START_TIMEOUT)
        assert done.returncode == 1
        assert "already runs an application named 'neocore'" in done.stderr.strip().splitlines()[-1]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["first"]  # still the first one's, and still serving
    finally:
        serve.shutdown()


def test_cli_ray_replicas_on_a_port_taken_here_say_so_before_ray_starts(folder):
    """Without RAY_ADDRESS, Ray runs on this machine: a port taken here, or a model folder
    missing here, is the same one line as for `neocore serve`, before Ray starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run([sys.executable, "-m", "neocore", "serve", "--ray-replicas", "1", "-m", folder,
                               "--threads", "1", "--port", str(port)], capture_output=True, text=True, env=env,
                              cwd=SOURCE_ROOT, timeout=60)
    assert done.returncode == 1
    assert done.stderr == f"neocore: error: cannot listen on 127.0.0.1 port {port} (Address already in use)\n"
    missing = subprocess.run([sys.executable, "-m", "neocore", "serve", "--ray-replicas", "1", "-m",
                              "/nonexistent/model", "--threads", "1", "--port", str(free_port())],
                             capture_output=True, text=True, env=env, cwd=SOURCE_ROOT, timeout=60)
    assert missing.returncode == 1 and missing.stderr == "neocore: error: /nonexistent/model: no such model folder\n"


def test_cli_ray_replicas_refuse_a_port_serve_does_not_listen_on(local_ray, folder):
    """Serve already running on the cluster keeps its address; a new port would be ignored."""
    port, other = free_port(), free_port()
    env = {**os.environ, "RAY_ADDRESS": local_ray}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        done = subprocess.run([sys.executable, "-m", "neocore", "serve", "--ray-replicas", "1", "-m", folder,
                               "--threads", "1", "--port", str(other)], capture_output=True, text=True, env=env,
                              cwd=SOURCE_ROOT, timeout=START_TIMEOUT)
        assert neocore.ray._serve_running()  # not the command's to take down
    finally:
        serve.shutdown()
    assert done.returncode == 1
    assert f"Ray Serve on this cluster already listens on 127.0.0.1 port {port}" in done.stderr.strip().splitlines()[-1]


def test_cli_ray_replicas_get_every_load_option(folder, monkeypatch):
    """The replicas load the model themselves: each option the command takes must reach them."""
    from neocore.cli import main
    given: dict = {}
    monkeypatch.setattr(neocore.ray, "run", lambda *args, **options: given.update(options))
    assert main(["serve", "-m", folder, "--ray-replicas", "2", "--compute", "bf16", "--dtype", "float32",
                 "--context", "64", "--max-batch", "4", "--max-queue", "3", "--allow-origin", "*"]) == 0
    assert (given["compute"], given["dtype"], given["context"]) == ("bf16", "float32", 64)
    assert given["allow_origins"] == ["*"]
    assert (given["max_batch"], given["max_queue"]) == (4, 3)


def test_bad_arguments_are_refused_before_ray_starts(folder, capsys):
    from neocore.cli import main
    assert main(["serve", "-m", folder, "--ray-replicas", "-1"]) == 1
    assert main(["serve", "-m", folder, "--ray-replicas", "1", "--threads", "-1"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "neocore: error: --threads must be >= 1, got -1"
    with pytest.raises(neocore.NeocoreError, match="num_replicas"):
        neocore.ray.app(folder, num_replicas=0)
    with pytest.raises(neocore.NeocoreError, match="threads_per_replica"):
        neocore.ray.app(folder, threads_per_replica=0)
    with pytest.raises(neocore.NeocoreError, match="max_batch"):
        neocore.ray.app(folder, max_batch="16")
    with pytest.raises(neocore.NeocoreError, match="max_queue"):
        neocore.ray.app(folder, max_queue=-1)
    with pytest.raises(neocore.NeocoreError, match="max_batch must be an integer between 1 and 128, got 500"):
        neocore.ray.app(folder, max_batch=500)
    with pytest.raises(neocore.NeocoreError, match="allow-origin"):
        neocore.ray.app(folder, allow_origins=["example.com"])
    # numpy's integers are integers; Ray's options take only Python's, so app converts them
    assert neocore.ray.app(folder, num_replicas=np.int64(1), threads_per_replica=np.int32(1), max_batch=np.int64(4),
                           max_queue=np.int64(2)) is not None
    with pytest.raises(neocore.SamplingError, match="temperature"):
        neocore.ray.Generate(folder, temperature=-1)
    with pytest.raises(neocore.NeocoreError, match="max_new_tokens"):
        neocore.ray.Generate(folder, max_new_tokens=0)
    with pytest.raises(neocore.NeocoreError, match="stride"):
        neocore.ray.Score(folder, stride=0)
    for seed in (2 ** 70, float("nan"), -1):
        with pytest.raises(neocore.SamplingError, match="seed"):
            neocore.ray.Generate(folder, seed=seed)
    for stop in ([1], None, b"x"):
        with pytest.raises(neocore.NeocoreError, match="stop must be a string or a list of strings"):
            neocore.ray.Generate(folder, stop=stop)
    with pytest.raises(neocore.NeocoreError, match="num_replicas"):
        neocore.ray.run(folder, 0)  # refused before dividing the cores by it, and before Ray starts
    with pytest.raises(neocore.NeocoreError, match="--port 0 .* is not possible with --ray-replicas"):
        neocore.ray.run(folder, 1, port=0)  # Serve's proxy would listen elsewhere than the banner said
    with pytest.raises(neocore.NeocoreError, match="API key"):
        neocore.ray.app(folder, api_key="s\u00ebcret")  # before any replica loads the model

"""Ray shells around the engine (pip install "neocore[ray]"): Ray Data callables for offline
batch inference, and a Ray Serve application of OpenAI-compatible replicas. Every byte of
model work is still done by each process's own Engine; Ray only places the processes and moves
rows and requests to them.

Ray Data (one model per actor, loaded once; the batch a call gets is decoded together):

    ds = ray.data.read_parquet("prompts.parquet")
    ds = ds.map_batches(neocore.ray.Generate, fn_constructor_kwargs={"model": "/models/gpt-neo-125M",
                        "max_new_tokens": 64}, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1,
                        batch_size=64)

Ray Serve: `serve.run(neocore.ray.app("/models/gpt-neo-125M", num_replicas=2))`, or
`neocore serve --ray-replicas 2`.

Weights are mapped read-only from a bfloat16 safetensors file (a `neocore convert`ed folder),
so every actor or replica on a node shares one copy in the page cache; other formats are
converted by each process into its own memory."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from typing import Any, Sequence

import numpy as np

from .engine import Engine, Request, check_stops
from .errors import NeocoreError, shown
from .generate import check_stride
from .model import Model, load, usable_cores
from .resolve import resolve_model
from .sampling import SamplingParams, check_seed, is_integer

try:
    import ray
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise NeocoreError('neocore.ray needs Ray: pip install "neocore[ray]"') from exc

GREEDY = SamplingParams(temperature=0)
APP_NAME = "neocore"  # the Serve application `neocore serve --ray-replicas` deploys: one a cluster
SERVICE_REQUESTS = 8  # a replica's places beyond its engine's: /health, /metrics, /v1/models, 429s
GENERATED = ("generated_text", "prompt_tokens", "generated_tokens", "finish_reason", "error")  # Generate's columns
# the type of every column the callables add: each block of a data set then has one schema (a
# block of nulls alone would be Arrow's null type, which pandas and pyarrow cannot read beside
# the string blocks of the same Parquet folder)
COLUMN_TYPES = {"generated_text": "string", "prompt_tokens": "int64", "generated_tokens": "int64",
                "finish_reason": "string", "error": "string", "log_prob": "float64", "tokens": "int64",
                "perplexity": "float64"}


def _check_count(what: str, value: Any, least: int) -> None:
    if not is_integer(value) or value < least:
        raise NeocoreError(f"{what} must be an integer >= {least}, got {shown(value)}")


def _threads(threads: int | None) -> int:
    """threads if given, else the CPUs Ray reserved for this actor (num_cpus), else every
    usable core: an actor's process sees all of the node's cores, and taking them all in each
    of several actors would oversubscribe them."""
    if threads is not None:
        return threads
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:  # in an actor
        reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        if reserved > 0:  # a fraction of a CPU (num_cpus=0.5) is one thread, not every core
            return max(1, int(reserved))
    return usable_cores()


def _load(model: str | os.PathLike, threads: int | None, dtype: str | None, max_batch: int,
          compute: str | None, huge_pages: bool | None) -> tuple[Model, Engine]:
    loaded = load(model, dtype=dtype, threads=_threads(threads), compute=compute, huge_pages=huge_pages)
    if loaded.tokenizer is None:
        raise NeocoreError(f"{loaded.path}: no tokenizer files (vocab.json + merges.txt or tokenizer.json)")
    return loaded, loaded.start_engine(max_batch)


def _missing(value: Any) -> bool:
    """A null cell: None, the NaN that NumPy and pandas put for one in a column of numbers (or
    in a column of nothing but nulls), or pandas' NA (its nullable columns' null)."""
    if value is None or isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    pandas = sys.modules.get("pandas")  # a pd.NA can only come from a pandas already imported
    return pandas is not None and value is pandas.NA


def _text_of(value: Any, what: str) -> str:
    """A row's text; a missing or empty one is the row's error (in a data set an empty cell is
    a missing value, so it is not read as model.generate's "start from <|endoftext|>")."""
    if _missing(value):
        raise NeocoreError(f"the {what} is missing")
    if not isinstance(value, str):
        raise NeocoreError(f"the {what} must be a string, got {type(value).__name__}")
    if not value:
        raise NeocoreError(f"the {what} is empty")
    return value


FLOAT_EXACT_INTEGERS = 2 ** 53  # past it a float64 column may have rounded a seed


def _seed_of(value: Any, default: int | None) -> int | None:
    """A row's seed: an integer in [0, 2**63) (a column with a null holds them as floats, 3.0,
    exact below 2**53); a missing one takes the default."""
    if _missing(value):
        return default
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        seed = int(value)  # not through float(): an int past float's range would overflow it
    elif isinstance(value, (float, np.floating)) and float(value).is_integer() and value >= 0:
        if value >= FLOAT_EXACT_INTEGERS:
            raise NeocoreError(f"the seed {float(value)} is a float past 2**53, where it may have lost digits "
                               "(a column of integers with a null turns into floats): give every row a seed, "
                               "or keep seeds below 2**53")
        seed = int(value)
    else:
        shown = value if isinstance(value, (int, float, np.number)) else repr(value)  # a number as its value, '3' quoted
        raise NeocoreError(f"the seed must be an integer >= 0, got {shown}")
    check_seed(seed)
    return seed


def _column(batch: Any, name: str, required: bool = True) -> list | None:
    """The values of the batch's column name (a list); where there is none, None, or a
    NeocoreError naming the columns it has when it is required."""
    import pyarrow as pa
    names = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    if name not in names:
        if required:
            raise NeocoreError(f"the batch has no {name!r} column (its columns: {', '.join(map(str, names))})")
        return None
    return batch.column(name).to_pylist() if isinstance(batch, pa.Table) else list(batch[name])


def _with_columns(batch: Any, columns: dict[str, list]) -> Any:
    """The batch (Ray Data's numpy, pandas or pyarrow format: a dict of NumPy arrays, a pandas
    DataFrame, a pyarrow Table) with these columns added, a column of the same name replaced,
    each typed as COLUMN_TYPES says, nulls among the values: an Arrow array in a Table and in
    a dict (NumPy has no type for strings or integers with nulls; Ray Data takes the array as
    it is), pandas' ArrowDtype in a DataFrame."""
    import pandas as pd
    import pyarrow as pa
    for name, values in columns.items():
        typed = pa.array(values, type=COLUMN_TYPES[name])
        if isinstance(batch, pa.Table):
            at = batch.schema.get_field_index(name)
            batch = batch.set_column(at, name, typed) if at >= 0 else batch.append_column(name, typed)
        elif isinstance(batch, pd.DataFrame):
            batch[name] = pd.arrays.ArrowExtensionArray(typed)  # by position, whatever the index
        else:
            batch[name] = typed
    return batch


class Generate:
    """Ray Data callable class: adds generated_text, prompt_tokens, generated_tokens,
    finish_reason and error columns to a batch with a prompt column.

    model: a folder every node can read (or a hub repo id); threads: OpenMP threads (default:
    the actor's num_cpus); max_batch: sequences one actor decodes at once; dtype, compute,
    huge_pages: as neocore.load takes them. Sampling as in
    Model.generate. Every row samples with the generator of (its seed, 0): the batch's seed
    column where present, else seed, so a seeded row's text does not depend on the rows beside
    it, on how the data set was cut into batches, or on which actor ran it. A row that cannot
    run (a missing, empty or too long prompt, a bad seed) gets its reason in error and nulls
    in the other new columns; the job goes on."""

    def __init__(self, model: str | os.PathLike, threads: int | None = None, dtype: str | None = None,
                 max_batch: int = 64, max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | str = (), compute: str | None = None, huge_pages: bool | None = None):
        # arguments are checked before the slow load
        self.params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        _check_count("max_new_tokens", max_new_tokens, 1)
        self.max_new_tokens = max_new_tokens
        check_seed(seed)
        self.seed = None if seed is None else int(seed)
        self.stop = check_stops(stop)
        self.model, self.engine = _load(model, threads, dtype, max_batch, compute, huge_pages)

    def __call__(self, batch: Any) -> Any:
        """batch: a dict of NumPy arrays, a pandas DataFrame or a pyarrow Table (Ray Data's
        batch formats); returned with the new columns."""
        prompts = _column(batch, "prompt")
        seeds = _column(batch, "seed", required=False) or [None] * len(prompts)
        new = {name: [None] * len(prompts) for name in GENERATED}
        running = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            try:
                ids = self.model.tokenizer.encode(_text_of(prompt, "prompt"))
                request = Request(ids, self.params, self.max_new_tokens, _seed_of(seed, self.seed), 0, self.stop)
                running.append((i, self.engine.submit(request, asynchronous=False)))  # all queued first: decoded together
            except NeocoreError as exc:
                new["error"][i] = str(exc)
        for i, stream in running:
            try:
                done = stream.result()
            except NeocoreError as exc:
                new["error"][i] = str(exc)
                continue
            for name, value in zip(GENERATED, (done.text, done.prompt_tokens, len(done.tokens), done.finish_reason)):
                new[name][i] = value
        return _with_columns(batch, new)


class Score:
    """Ray Data callable class: adds log_prob (the natural log-probability of the whole text),
    tokens, perplexity and error columns to a batch with a text column; each row as
    Model.score gives it (every token predicted from <|endoftext|> and the text before it).

    Texts that fit in the context are read together by the engine (their prompt
    log-probabilities); longer ones are scored alone, in Model.score's windows (stride: their
    advance). A missing or empty text gets its reason in error and nulls elsewhere. The other
    arguments as Generate takes them."""

    def __init__(self, model: str | os.PathLike, threads: int | None = None, dtype: str | None = None,
                 max_batch: int = 64, stride: int | None = None, compute: str | None = None,
                 huge_pages: bool | None = None):
        self.model, self.engine = _load(model, threads, dtype, max_batch, compute, huge_pages)
        if stride is not None:
            check_stride(stride, self.model.context_length)
        self.stride = stride

    def _logprobs(self, texts: list[Any]) -> list[np.ndarray | str]:
        """Each text's token log-probabilities, or the reason it has none."""
        model = self.model
        out: list[np.ndarray | str] = [""] * len(texts)
        running, long = [], []
        for i, value in enumerate(texts):
            try:
                ids = [model.tokenizer.eos_id] + model.tokenizer.encode(_text_of(value, "text"))
            except NeocoreError as exc:
                out[i] = str(exc)
                continue
            if len(ids) <= model.context_length:  # one window: the engine scores it
                request = Request(ids, GREEDY, 0, text=False, stop_at_eos=False, prompt_logprobs=True)
                running.append((i, self.engine.submit(request, asynchronous=False)))
            else:
                long.append(i)
        for i, stream in running:
            try:
                entries = stream.result().prompt_logprobs[1:]  # the first token, <|endoftext|>, is given
                out[i] = np.array([e.logprob for e in entries], np.float64)
            except NeocoreError as exc:
                out[i] = str(exc)
        for i in long:
            try:
                out[i] = model.score(texts[i], self.stride).logprobs
            except NeocoreError as exc:
                out[i] = str(exc)
        return out

    def __call__(self, batch: Any) -> Any:
        results = self._logprobs(_column(batch, "text"))
        scored = [not isinstance(r, str) for r in results]
        return _with_columns(batch, {
            "log_prob": [float(r.sum()) if ok else None for r, ok in zip(results, scored)],
            "tokens": [r.size if ok else None for r, ok in zip(results, scored)],
            "perplexity": [math.exp(-float(r.mean())) if ok else None for r, ok in zip(results, scored)],
            "error": [None if ok else r for r, ok in zip(results, scored)],
        })


# ---- Ray Serve ----------------------------------------------------------------------------------
# A replica is one Ray actor process, holding one model. Its constructor loads the model; the
# app builder, called by Serve in the same process right after, hands it to the routes.
_replica_served: Any = None


def _replica_app() -> Any:
    from .server import build_app
    return build_app(_replica_served)


@serve.ingress(_replica_app)
class Replica:
    """One Serve replica: the model, its engine, and `neocore serve`'s routes over them; every
    response names the replica in an x-neocore-replica header."""

    def __init__(self, model: str, max_batch: int, max_queue: int | None, api_key: str | None, name: str,
                 allow_origins: tuple[str, ...], load_options: dict[str, Any]):
        global _replica_served
        from .server import Served
        loaded = load(model, **load_options)
        if loaded.tokenizer is None:
            raise NeocoreError(f"{loaded.path}: no tokenizer files: the server needs one")
        engine = loaded.start_engine(max_batch, max_queue)
        replica = serve.get_replica_context().replica_id.to_full_id_str()
        _replica_served = Served(loaded, engine, name, api_key, replica, allow_origins)


def _local_path(path: Any) -> Any:
    """A local file or folder named absolutely (replicas do not run in this process's
    directory); anything else (a hub repo id, a path on the other nodes) as given."""
    return os.path.abspath(path) if path is not None and os.path.exists(path) else path


def app(model: str | os.PathLike, num_replicas: int = 2, threads_per_replica: int = 1,
        max_batch: int = 16, max_queue: int | None = 64, api_key: str | None = None,
        name: str | None = None, shutdown_timeout: float = 30.0, allow_origins: Sequence[str] = (),
        **load_options: Any) -> Any:
    """A Ray Serve application of num_replicas replicas, each serving the OpenAI routes of
    `neocore serve` from its own copy of the model with threads_per_replica threads (and as
    many CPUs reserved). model: a folder every node can read, or a hub repo id; load_options:
    neocore.load's keywords (dtype, context, config, overrides). A replica taken down lets its
    running requests finish for at most shutdown_timeout seconds; allow_origins: web pages that
    may call it (CORS, as `neocore serve --allow-origin`). Run it with serve.run(app(...))."""
    for what, value, least in (("num_replicas", num_replicas, 1), ("threads_per_replica", threads_per_replica, 1),
                               ("max_batch", max_batch, 1), ("max_queue", 0 if max_queue is None else max_queue, 0)):
        _check_count(what, value, least)
    # numpy's integers pass the check; Ray's own options take Python ints
    num_replicas, threads_per_replica, max_batch = int(num_replicas), int(threads_per_replica), int(max_batch)
    max_queue = None if max_queue is None else int(max_queue)
    Engine.check_limits(max_batch, max_queue)  # here, not in each replica after its load
    from .server import check_api_key, check_origins, served_name
    check_api_key(api_key)  # here, not in each replica after its load
    allow_origins = check_origins(allow_origins)
    spec = os.fspath(_local_path(model))
    load_options = {**load_options, "threads": threads_per_replica}
    if "config" in load_options:
        load_options["config"] = _local_path(load_options["config"])
    # Serve would hold a replica to 5 requests at a time (its default) and queue the rest
    # itself, unbounded: the replica's engine takes what it runs and queues, and answers 429
    # past that; a few more places keep /health and /metrics answering beside them. With no
    # max_queue, a replica takes as many again as it runs, and Serve queues the rest.
    ongoing = max_batch + (max_queue if max_queue is not None else max_batch) + SERVICE_REQUESTS
    deployment = serve.deployment(Replica, name="neocore", num_replicas=num_replicas,
                                  ray_actor_options={"num_cpus": threads_per_replica},
                                  graceful_shutdown_timeout_s=shutdown_timeout, max_ongoing_requests=ongoing)
    return deployment.bind(spec, max_batch, max_queue, api_key, name or served_name(spec), allow_origins,
                           load_options)


class _Stopped(Exception):
    """SIGTERM, raised wherever the command waits: in serve.run too, which a flag would not end."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped


def run(model: str | os.PathLike, num_replicas: int, threads_per_replica: int | None = None,
        host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """`neocore serve --ray-replicas N`: joins the cluster at $RAY_ADDRESS (else, as Ray does,
    one `ray start` began on this machine, else starts Ray here), serves app(...) on host:port
    until SIGINT/SIGTERM, then takes it down. threads_per_replica defaults to this machine's
    cores shared among the replicas."""
    from .server import check_can_listen
    _check_count("num_replicas", num_replicas, 1)  # before dividing by it
    if port == 0:  # Serve's proxy listens where it is told; the banner could not name the port
        raise NeocoreError("--port 0 (any free port) is not possible with --ray-replicas: name a port")
    threads = threads_per_replica or max(1, usable_cores() // num_replicas)
    application = app(model, num_replicas, threads, **options)
    if not os.environ.get("RAY_ADDRESS"):  # Ray on this machine: what its replicas and proxy meet, met here first
        check_can_listen(host, port)
        resolve_model(model)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    signal.signal(signal.SIGTERM, _stop)
    serve_was_running = _serve_running()
    deployed = False
    try:
        _check_cpus(num_replicas, threads)
        serve.start(http_options={"host": host, "port": port})
        _check_listening_on(host, port)
        if APP_NAME in serve.status().applications:  # serve.run would take it over in place
            raise NeocoreError(f"Ray Serve on this cluster already runs an application named '{APP_NAME}' (another "
                               f"`neocore serve --ray-replicas`?): stop that one first")
        deployed = True  # from here the application is ours to take down, failed or not
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except RuntimeError:  # Serve says only that the deployment failed; its status says why
            raise NeocoreError(f"the replicas failed to start: {_deploy_failure(APP_NAME)}") from None
        print(f"neocore: serving on http://{host}:{port}/v1 from {num_replicas} Ray Serve replicas "
              f"({threads} threads each)", file=sys.stderr, flush=True)
        threading.Event().wait()  # until SIGINT or SIGTERM
    except _Stopped:
        pass
    finally:
        # a cluster keeps an application, failed ones too, after its driver leaves; and Serve
        # itself, when this command started it and no other application uses it now
        with contextlib.suppress(Exception):
            if deployed:
                serve.delete(APP_NAME)
            if not serve_was_running and not serve.status().applications:
                serve.shutdown()
        ray.shutdown()


def _check_cpus(num_replicas: int, threads: int) -> None:
    """Serve waits without end for CPUs a cluster does not have free (saying so only in its
    logs): refuse replicas that need more than the cluster's free CPUs now."""
    cpus, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
    if num_replicas * threads > free:
        busy = f" ({cpus - free:g} of its {cpus:g} taken by other work)" if free < cpus else ""
        raise NeocoreError(f"{num_replicas} replicas of {threads} threads need {num_replicas * threads} CPUs, "
                           f"and the Ray cluster has {free:g} free{busy}: ask for fewer replicas or threads")


def _serve_running() -> bool:
    """Whether Serve runs on the cluster already (started by someone else)."""
    try:  # an internal of Ray Serve 2.x; where it lacks it, Serve is taken as someone else's
        from ray.serve.context import _get_global_client
        return _get_global_client(raise_if_no_controller_running=False) is not None
    except (ImportError, AttributeError, TypeError):
        return True


def _check_listening_on(host: str, port: int) -> None:
    """Serve started earlier on a cluster keeps its HTTP address, and serve.start only warns
    that a new one is ignored: refuse rather than announce an address nothing listens on."""
    try:  # the address Serve's controller holds (an internal of Ray Serve 2.x: unchecked where it lacks it)
        from ray.serve.context import _get_global_client
        config = _get_global_client().http_config
    except (ImportError, AttributeError):
        return
    if (config.host, config.port) != (host, port):
        raise NeocoreError(f"Ray Serve on this cluster already listens on {config.host} port {config.port}, "
                           f"started before with those options: serve there (--host {config.host} --port "
                           f"{config.port}), or shut Serve down first (`serve shutdown`)")


def _deploy_failure(name: str) -> str:
    """The last line of what Serve's status says about a failed application (its exception)."""
    try:
        status = serve.status().applications[name]
        messages = [status.message] + [d.message for d in status.deployments.values()]
    except Exception:  # noqa: BLE001 - the status is a courtesy; the failure is reported anyway
        return "Ray Serve gave no reason"
    lines = [line.strip() for message in messages if message for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "Ray Serve gave no reason"

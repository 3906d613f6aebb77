"""The command line, run as a user runs it: in a subprocess (in this process where a test
must reach inside: to script the model's answers, or to interrupt a step)."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import neocore
from neocore import _core, chat
from neocore.cli import main as cli_main
from neocore.model import Model, decode_prefetch
from neocore.sampling import Sampler

PROMPT = "The old lighthouse keeper climbed the stairs"


def run_cli(*args: str, stdin: str | bytes | None = None, env: dict | None = None, timeout: float = 120):
    """The finished process; its output is bytes when stdin is."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "neocore", *args], input=stdin, capture_output=True,
                          text=not isinstance(stdin, bytes), timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def tiny(reference_models, gpt2_tokenizer_dir) -> Path:
    return reference_models("tiny").folder


def assert_one_line_error(proc, pattern: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert pattern in lines[0], lines[0]


def test_generate_greedy_matches_the_api(tiny):
    proc = run_cli("generate", "-m", str(tiny), PROMPT, "--max-tokens", "30", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = neocore.load(tiny).generate(PROMPT, max_new_tokens=30, temperature=0)
    assert proc.stdout == expected + "\n"


def test_prompt_from_file_and_stdin(tiny, tmp_path):
    (tmp_path / "prompt.txt").write_text(PROMPT)
    args = ["--max-tokens", "20", "--temperature", "0.9", "--seed", "5"]
    from_arg = run_cli("generate", "-m", str(tiny), PROMPT, *args)
    from_file = run_cli("generate", "-m", str(tiny), "-f", str(tmp_path / "prompt.txt"), *args)
    from_stdin = run_cli("generate", "-m", str(tiny), *args, stdin=PROMPT)
    assert from_arg.returncode == 0 and from_arg.stdout.strip()
    assert from_arg.stdout == from_file.stdout == from_stdin.stdout


def test_stats_go_to_stderr(tiny):
    proc = run_cli("generate", "-m", str(tiny), PROMPT, "--max-tokens", "10", "--stats")
    assert proc.returncode == 0
    assert "load:" in proc.stderr and "tokens/s" in proc.stderr and "tokens/s" not in proc.stdout
    ids = neocore.load(tiny).tokenizer.encode(PROMPT)
    nothing = run_cli("generate", "-m", str(tiny), PROMPT, "--max-tokens", "0", "--stats")  # nothing to time
    assert nothing.returncode == 0 and "nan" not in nothing.stderr
    assert f"prompt: {len(ids)} tokens, not timed; generated: 0 tokens, not timed" in nothing.stderr


def test_output_streams_before_the_process_ends(reference_models, gpt2_tokenizer_dir):
    """With the 125M shape, 400 tokens take many seconds: text must arrive well before the end."""
    folder = reference_models("gpt-neo-125M").folder
    proc = subprocess.Popen([sys.executable, "-m", "neocore", "generate", "-m", str(folder), PROMPT,
                             "--max-tokens", "400", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read1(64)
        assert first, "no output"
        assert proc.poll() is None, "the process ended before its first output was read"
    finally:
        proc.kill()
        proc.wait()


def test_chat_through_piped_stdin(tiny):
    proc = run_cli("chat", "-m", str(tiny), "--max-tokens", "20", "--seed", "1",
                   stdin="Hello there\nWhat is the weather like?\n")
    assert proc.returncode == 0, proc.stderr
    answers = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2
    assert proc.stderr == ""  # the keys banner is for a terminal


def test_chat_skips_a_message_too_long_for_the_context_and_goes_on(tiny):
    proc = run_cli("chat", "-m", str(tiny), "--max-tokens", "10", "--seed", "1",
                   stdin="Hello there\n" + "word " * 300 + "\nAnd now?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("not sent") == 1 and len(proc.stderr.splitlines()) == 1
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) == 2


def test_chat_sends_a_message_whose_answer_just_fits(tiny):
    """A transcript of L tokens and an answer of n fit when L + n - 1 <= context: the answer's
    last token is never fed."""
    from neocore import chat
    model = neocore.load(tiny)
    message = "Hello there, how are you"
    length = len(chat.encode(model.tokenizer, chat.transcript([{"role": "user", "content": message}])))
    for max_tokens, sent in ((model.context_length - length + 1, True), (model.context_length - length + 2, False)):
        proc = run_cli("chat", "-m", str(tiny), "--max-tokens", str(max_tokens), "--seed", "1", stdin=message + "\n")
        assert proc.returncode == 0, proc.stderr
        assert ("not sent" not in proc.stderr) == sent, (max_tokens, proc.stderr)


def test_chat_trims_a_transcript_longer_than_the_context(tiny):
    lines = "".join(f"Tell me about item number {i} in the long list please\n" for i in range(12))
    proc = run_cli("chat", "-m", str(tiny), "--max-tokens", "40", "--seed", "2", stdin=lines)
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) >= 12


@pytest.mark.parametrize("stdin_encoding", [{"PYTHONUTF8": "1"}, {"PYTHONIOENCODING": "utf-8:strict"}])
def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(tiny, stdin_encoding):
    """A byte that is not UTF-8 refuses its line alone, as an over-long line is refused: the next
    line is answered as if the bad one had never been sent. Whether standard input passes such a
    byte on (UTF-8 mode, the C.UTF-8 locale) or would raise at it (a strict decoder, as a
    UTF-8 locale such as en_US.UTF-8 gives)."""
    args = ["chat", "-m", str(tiny), "--max-tokens", "10", "--seed", "1"]
    proc = run_cli(*args, stdin=b"caf\xff\nok\n", env=stdin_encoding)
    clean = run_cli(*args, stdin=b"ok\n", env=stdin_encoding)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().splitlines() == ["neocore: the text is not valid UTF-8: it holds the byte 0xFF: not sent"]
    assert proc.stdout == clean.stdout and clean.stdout.strip()


def test_chat_reads_a_byte_order_mark_as_no_text(tiny):
    args = ["chat", "-m", str(tiny), "--max-tokens", "10", "--seed", "1"]
    assert run_cli(*args, stdin="\ufeffok\n").stdout == run_cli(*args, stdin="ok\n").stdout


def test_chat_after_ctrl_c_within_a_step_answers_as_a_fresh_model(tiny, monkeypatch, capsys):
    """SIGINT can land after the C step inside model.append has cached a token and before the
    chat recorded it: the next answer must still be the one a fresh model gives the transcript."""
    append, calls = Model.append, []

    def interrupted_append(self, ids, all_logits=False):
        logits = append(self, ids, all_logits)
        calls.append(ids)
        if len(calls) == 2:  # the first answer's first token, fed: Ctrl-C before append returns
            raise KeyboardInterrupt
        return logits

    monkeypatch.setattr(Model, "append", interrupted_append)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd then?\n"))
    assert cli_main(["chat", "-m", str(tiny), "--temperature", "0", "--max-tokens", "8"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith(" [stopped]")
    monkeypatch.undo()
    messages = [{"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": first.removesuffix(" [stopped]")},
                {"role": "user", "content": "And then?"}]
    expected = neocore.load(tiny).generate(chat.transcript(messages), max_new_tokens=8, temperature=0, stop=chat.STOPS)
    assert second == expected.strip()


def test_chat_feeds_the_transcript_the_server_feeds(tiny, monkeypatch, capsys):
    """The conversation is written out as the server writes it: an answer without the whitespace
    at its ends (one ending in a newline leaves no blank line, printed or fed), and what the user
    or the model wrote is text, '<|endoftext|>' too, not the token that ends a document. The
    model's answers are scripted; what it is fed is checked against the transcript written by hand."""
    tokenizer = neocore.Tokenizer.gpt2()
    first, second = (tokenizer.encode(text, allow_special=False) for text in (" Hi <|endoftext|>\n", " Bye"))
    script, fed = iter([*first, *second, tokenizer.eos_id]), []

    def choose(self, logits, previous):
        fed.append(list(previous))
        return next(script)

    monkeypatch.setattr(Sampler, "choose", choose)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb <|endoftext|>\n"))
    assert cli_main(["chat", "-m", str(tiny), "--max-tokens", str(len(first))]) == 0  # the first answer ends at "\n"
    assert capsys.readouterr().out == "Hi <|endoftext|>\nBye\n"
    transcripts = ["You: a\nNeo:", "You: a\nNeo: Hi <|endoftext|>\nYou: b <|endoftext|>\nNeo:"]
    assert [fed[0], fed[len(first)]] == [tokenizer.encode(t, allow_special=False) for t in transcripts]
    assert tokenizer.eos_id not in fed[-1]


def test_score_and_info(tiny, tmp_path):
    text = "Once upon a time, there was a small village by the sea."
    (tmp_path / "text.txt").write_text(text)
    proc = run_cli("score", "-m", str(tiny), str(tmp_path / "text.txt"))
    assert proc.returncode == 0, proc.stderr
    expected = neocore.load(tiny).score(text).perplexity
    assert f"perplexity: {expected:.4f}" in proc.stdout
    (tmp_path / "bom.txt").write_text(text, encoding="utf-8-sig")  # as Notepad saves it
    for source, stdin in ((str(tmp_path / "bom.txt"), None), ("-", "\ufeff" + text)):
        with_bom = run_cli("score", "-m", str(tiny), source, stdin=stdin)
        assert with_bom.returncode == 0 and with_bom.stdout == proc.stdout.replace(str(tmp_path / "text.txt"), source)
    # Windows line endings are part of the text, read from a file or from standard input alike
    crlf = "Line one,\r\nline two.\r\n"
    (tmp_path / "crlf.txt").write_bytes(crlf.encode())
    expected = f"perplexity: {neocore.load(tiny).score(crlf).perplexity:.4f}".encode()
    for source, stdin in ((str(tmp_path / "crlf.txt"), b""), ("-", crlf.encode())):
        scored = run_cli("score", "-m", str(tiny), source, stdin=stdin)
        assert scored.returncode == 0 and expected in scored.stdout, (source, scored.stdout)
    # standard input is UTF-8 as files are, whatever the locale's encoding
    accented = "Caf\u00e9 cr\u00e8me, na\u00efve \u00fcber."
    expected = f"perplexity: {neocore.load(tiny).score(accented).perplexity:.4f}".encode()
    for encoding in ("latin-1", "ascii"):
        scored = run_cli("score", "-m", str(tiny), "-", stdin=accented.encode(), env={"PYTHONIOENCODING": encoding})
        assert scored.returncode == 0 and expected in scored.stdout, (encoding, scored.stdout, scored.stderr)
    info = run_cli("info", "-m", str(tiny), "--threads", "1")
    assert info.returncode == 0
    assert "hidden size:     64" in info.stdout and "threads:         1" in info.stdout
    model = neocore.load(tiny)
    assert f"kernel path:     {model.isa} " in info.stdout
    assert f"weight pages:    {model.weight_pages}\n" in info.stdout
    plain = run_cli("info", "-m", str(tiny), "--huge-pages", "no")
    assert "weight pages:    in memory (huge pages not asked for)\n" in plain.stdout  # converted at load
    assert f"decode kernel:   {_core.decode_kernel(model.isa, model.dtype)} " in info.stdout
    prefetch = decode_prefetch(model.isa, model.dtype, model.config, model.compute)
    assert f"decode prefetch: {prefetch} (one sequence; tuned for {_core.cpu_kind()})" in info.stdout
    fetch = _core.attention_fetch(model.isa)
    assert f"attention fetch: {fetch} (decode rows; tuned for {_core.cpu_kind()})" in info.stdout


@pytest.mark.parametrize("args, stdin, message", [
    (["generate", "-m", "/nonexistent/model", "hi"], None, "no such model folder"),
    (["generate", "-f", "/nonexistent/prompt.txt"], None, "cannot read the prompt file"),
    (["generate", "--top-p", "2", "hi"], None, "top_p must be in [0, 1]"),
    (["generate", "--temperature", "-1", "hi"], None, "temperature must be"),
    (["generate", "--top-k", "-3", "hi"], None, "top_k must be"),
    (["generate", "--max-tokens", "-3", "hi"], None, "--max-tokens must be"),
    (["generate", "--top-p", "abc", "hi"], None, "invalid float value"),
    (["generate", "word " * 300], None, "the prompt is 301 tokens long; the context holds 160"),
    (["score", "/nonexistent/text.txt"], None, "cannot read the text file"),
    (["generate", "--threads", "0", "hi"], None, "threads must be an integer between 1 and 1024"),
    (["generate", "--threads", str(2 ** 40), "hi"], None, "threads must be an integer between 1 and 1024"),
    (["generate", "--seed", "-1", "hi"], None, "seed must be an integer in [0, 2**63)"),
    (["chat", "--seed", "-1"], "hi\n", "seed must be an integer in [0, 2**63)"),
    (["generate", "-f", "/dev/zero"], None, "longer than 64 Mi characters"),
    (["score", "-"], "", "standard input: the text is empty"),
    (["score", "--context", "1", "-"], "some text", "scoring needs a context of at least 2"),
    (["serve", "--shutdown-timeout", "nan"], None, "--shutdown-timeout must be"),
    (["serve", "--api-key", ""], None, "must be printable ASCII, not empty"),
    (["serve", "--api-key", "s\u00ebcret"], None, "the API key (--api-key, $NEOCORE_API_KEY) must be printable ASCII"),
    (["serve", "--api-key", " key"], None, "without leading or trailing spaces"),
    # checked before the load (a missing model folder would be found there)
    (["serve", "-m", "/nonexistent/model", "--max-batch", "0"], None, "--max-batch must be between 1 and 128, got 0"),
    (["serve", "-m", "/nonexistent/model", "--max-batch", "500"], None, "--max-batch must be between 1 and 128"),
    (["serve", "-m", "/nonexistent/model", "--allow-origin", "http://localhost:3000/"], None,
     "--allow-origin 'http://localhost:3000/': give '*' or scheme://host[:port]"),
    (["serve", "-m", "/nonexistent/model", "--allow-origin", "localhost"], None, "--allow-origin 'localhost'"),
    (["score", "-m", "/nonexistent/model", "--stride", "0", "-"], "some text", "--stride must be >= 1"),
    (["generate", "-m", "/nonexistent/model", "--seed", "-1", "hi"], None, "seed must be an integer"),
    (["chat", "--max-tokens", "500"], "hi\n", "--max-tokens 500 leaves no room"),
    (["bench", "--threads", "two"], None, "--threads takes comma-separated whole numbers"),
    (["bench", "--repeats", "0"], None, "--repeats must be >= 1"),
    (["info", "--num-heads", "0"], None, "override: num_heads must be an integer"),
    (["info", "-m", "~no-such-user-here/model"], None, "no such home directory"),
    (["info", "-m", ""], None, "-m/--model is empty"),  # not the current folder, nor the default model
    (["generate", "-f", ""], "a prompt on stdin", "'': cannot read the prompt file"),
    (["bench", "-m", "/nonexistent/model"], None, "no such model folder (bench takes a local folder)"),
])
def test_bad_input_is_one_line_and_a_failure(tiny, args, stdin, message):
    if "-m" not in args:
        args = [args[0], "-m", str(tiny), *args[1:]]
    assert_one_line_error(run_cli(*args, stdin=stdin), message)


def test_a_kernel_path_this_cpu_cannot_run_is_one_line_and_a_failure(tiny, monkeypatch, capsys):
    """As on a CPU without AVX2: the CPU's answer is replaced, so that every CPU runs this case."""
    monkeypatch.setattr(neocore.model._core, "isa_runs_here", lambda isa: isa in ("generic", "scalar"))
    monkeypatch.setenv("NEOCORE_ISA", "avx2")
    assert cli_main(["info", "-m", str(tiny)]) != 0
    assert capsys.readouterr().err == ("neocore: error: the avx2 kernel path was requested, but this CPU "
                                       "cannot run it (it needs AVX2+FMA)\n")


def test_serve_on_a_taken_port_fails_before_the_load():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the missing model folder would be found by the load: the port is checked first
        proc = run_cli("serve", "-m", "/nonexistent/model", "--port", str(port))
    assert_one_line_error(proc, f"cannot listen on 127.0.0.1 port {port} (Address already in use)")


def test_chat_reading_dev_zero_stops_at_the_line_limit(tiny):
    with open("/dev/zero", "rb") as zero:
        proc = subprocess.run([sys.executable, "-m", "neocore", "chat", "-m", str(tiny), "--max-tokens", "5"], stdin=zero,
                              capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "standard input: a line longer than 64 Mi characters")


def test_closed_standard_streams_are_named(tiny):
    closed_stdin = subprocess.run([sys.executable, "-m", "neocore", "generate", "-m", str(tiny)],
                                  capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert_one_line_error(closed_stdin, "standard input is closed")
    closed_stdout = subprocess.run([sys.executable, "-m", "neocore", "info", "-m", str(tiny)], stderr=subprocess.PIPE,
                                   text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert_one_line_error(closed_stdout, "standard output is closed")


def test_a_config_that_is_not_a_regular_file_is_refused_not_read(tiny, tmp_path):
    folder = tmp_path / "fifo-config"
    folder.mkdir()
    for item in tiny.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    os.mkfifo(folder / "config.json")  # reading it would block for ever
    assert_one_line_error(run_cli("info", "-m", str(folder), timeout=60), "config.json: not a regular file")


def test_make_model_never_writes_into_a_folder_that_holds_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("bench", "--make-model", "125M", "--out", str(tmp_path)), "not an empty folder")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_library_warnings_are_lines_of_their_own_kind(reference_models, write_bin, tmp_path):
    import copy
    model = copy.deepcopy(reference_models("tiny").torch_model)  # (skipped without torch: Python 3.9)
    import torch
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3  # no longer a bfloat16 value
    folder = write_bin(model, tmp_path / "fp32")
    proc = run_cli("info", "-m", str(folder))
    assert proc.returncode == 0
    assert proc.stderr.startswith("neocore: warning: 1 weight tensor(s) were not exactly representable")


def test_unknown_repo_id_offline(tmp_path):
    proc = run_cli("generate", "-m", "nobody/no-such-model", "hi", env={"HF_HUB_CACHE": str(tmp_path)})
    assert_one_line_error(proc, "nobody/no-such-model: not a local folder")


def test_repo_id_from_a_prefilled_hub_cache(tiny, tmp_path):
    """The hub's cache layout: models--owner--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--EleutherAI--gpt-neo-tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        shutil.copy(tiny / name, snapshot / name)
    proc = run_cli("generate", "-m", "EleutherAI/gpt-neo-tiny", PROMPT, "--max-tokens", "12", "--temperature", "0",
                   env={"HF_HUB_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == neocore.load(tiny).generate(PROMPT, max_new_tokens=12, temperature=0) + "\n"
    via_env = run_cli("generate", PROMPT, "--max-tokens", "12", "--temperature", "0",
                      env={"HF_HUB_CACHE": str(tmp_path), "NEOCORE_MODEL": "EleutherAI/gpt-neo-tiny"})
    assert via_env.stdout == proc.stdout


def test_missing_hub_library_says_what_to_install(tmp_path):
    blocker = tmp_path / "huggingface_hub"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')")
    proc = run_cli("info", "-m", "EleutherAI/gpt-neo-125M",
                   env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert_one_line_error(proc, "pip install 'neocore[hub]'")


def test_no_network_is_one_quick_line(tmp_path):
    """Not offline by setting, but the hub cannot be reached: no retries, one line."""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid", "HF_HUB_CACHE": str(tmp_path)}
    started = time.monotonic()
    proc = run_cli("generate", "-m", "EleutherAI/gpt-neo-125M", "hi", env=env)
    assert time.monotonic() - started < 30
    assert_one_line_error(proc, "the hub cannot be reached")


def test_cached_repo_is_used_without_network(tiny, tmp_path):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "models--someone--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        shutil.copy(tiny / name, repo / "snapshots" / commit / name)
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid", "HF_HUB_CACHE": str(tmp_path)}
    proc = run_cli("generate", "-m", "someone/tiny", PROMPT, "--max-tokens", "5", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    import select
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_chat_on_a_terminal_ctrl_c_stops_the_answer_and_ctrl_d_quits(reference_models, gpt2_tokenizer_dir):
    """Through a pseudo-terminal, as a person types: the loading bar shows, Ctrl-C (SIGINT)
    ends the current answer but not the program, Ctrl-D at the prompt quits cleanly."""
    import pty
    import signal
    folder = reference_models("gpt-neo-125M").folder
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "neocore", "chat", "-m", str(folder), "--threads", "1",
                             "--max-tokens", "1000", "--seed", "3", "--stop", "never-stop"],
                            stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(terminal)
    try:
        banner = _read_until(controller, b"You: ", 60)
        assert b"loading [" in banner and b"Ctrl-D quits" in banner
        os.write(controller, b"Tell me a long story\n")
        _read_until(controller, b"Neo:", 30)
        time.sleep(1.0)  # some of the answer streams out
        proc.send_signal(signal.SIGINT)
        after = _read_until(controller, b"You: ", 30)
        assert b"[stopped]" in after and proc.poll() is None
        os.write(controller, b"\x04")  # Ctrl-D at an empty prompt
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)


@pytest.mark.parametrize("args, stdin", [(["generate", "--dtype", "float32", "hi"], None),
                                         (["generate", "--temperature", "0", "hi"], None),
                                         (["chat", "--temperature", "0", "--max-tokens", "8"], "hi\n"),
                                         (["score", "-"], "some text to score")])
def test_nan_weights_are_one_line_and_a_failure(tiny, tmp_path, edited_copy, args, stdin):
    def poison(tensors):
        tensors["transformer.ln_f.weight"][7] = float("nan")

    folder = edited_copy(tiny, tmp_path / "nan", poison)
    proc = run_cli(args[0], "-m", str(folder), *args[1:], stdin=stdin)
    assert_one_line_error(proc, "logits are NaN or infinite: its weights hold NaN or infinity")


def test_convert_stopped_by_sigterm_leaves_nothing(reference_models, tmp_path, sigterm_when):
    """SIGTERM (a service manager, `kill`) unwinds a command as Ctrl-C does: a convert stopped
    while it writes removes its partial weights and the folder it made, and exits 143."""
    folder = reference_models("gpt-neo-125M").folder
    dst = tmp_path / "out"
    command = [sys.executable, "-m", "neocore", "convert", str(folder), str(dst), "--dtype", "int8"]
    assert sigterm_when(command, lambda: any(tmp_path.rglob("*.partial"))) == 143
    assert not dst.exists() and not list(tmp_path.rglob("*.partial"))

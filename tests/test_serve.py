"""`mistral-lightning serve` through the `openai` client, against independent references: mistral-common's
chat prompt ids, transformers' greedy decoding of the same weights, and `mistral-lightning generate`.

One server (a tiny random model with the v3 tokenizer, batching on, an API key from the environment) runs
in its own session for the module and is stopped with SIGTERM at the end; the test fails if any of its
processes is left behind or its log shows a traceback.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
import transformers
from helpers.models import random_model
from helpers.processes import free_port
from helpers.tokenizer_references import SHIPPED, prompt_ids, reference

from mistral_lightning.cli import generate as generate_cli
from mistral_lightning.cli.serve import API_KEY_ENV

CONTEXT = 4096  # room for a decoding long enough to notice whether a disconnect stops it
NAME = "tiny-v3"  # the served model name: the folder's
API_KEY = "sk-test-0123"
MAX_REQUEST_BYTES = 4_000_000  # a prompt this long takes about a second to tokenize
MAX_PROMPT_TOKENS = 2048
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name three colours."},
]
PROMPT = "The capital of France is"
EOS = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random Mistral (window 8, context 4096) with the v3 tokenizer, as an HF folder."""
    model = random_model(8, vocab_size=32768, max_seq_length=CONTEXT)
    path = model.save_pretrained(tmp_path_factory.mktemp("served") / NAME)
    shutil.copy(SHIPPED["v3"], path / "tokenizer.model.v3")
    return path


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """`serve` on a free port in its own session; its start overlaps the references the tests compute."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    command = [
        sys.executable,
        "-m",
        "mistral_lightning",
        "serve",
        "--checkpoint",
        str(folder),
        "--device",
        "cpu",
    ]
    command += [
        "--port",
        str(port),
        "--max-batch-size",
        "4",
        "--batch-timeout",
        "0.05",
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--max-prompt-tokens",
        str(MAX_PROMPT_TOKENS),
        "--log-level",
        "warning",
    ]
    environment = {**os.environ, API_KEY_ENV: API_KEY}
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )
    try:
        yield Server(process, port, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        finally:
            leftovers = _session_alive(process.pid)
            if leftovers:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, log.read_text()
    assert not leftovers, "the server left processes behind after SIGTERM"
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def client(server):
    _wait_until_healthy(server.process, server.port, server.log)
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=API_KEY, max_retries=0, timeout=60
    )


def _wait_until_healthy(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the server was not healthy within 120 s:\n{log.read_text()}")


def _session_alive(session: int, grace: float = 10.0) -> bool:
    """Whether a process of the session is still there `grace` seconds after its leader exited (the
    resource tracker and the manager exit just after it)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def transformers_greedy(folder):
    """transformers' greedy continuation of prompt ids, decoded by mistral-common's v3 tokenizer."""
    theirs = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    decoder = reference("v3")

    def continuation(ids: list[int], new_tokens: int) -> tuple[str, list[int]]:
        output = theirs.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0
        )
        tokens = output[0, len(ids) :].tolist()
        return decoder.decode(tokens), tokens

    return continuation


def _finish_reason(tokens: list[int]) -> str:
    return "stop" if tokens[-1] == EOS else "length"


def _encode(text: str) -> list[int]:
    return reference("v3").instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False)


def _generate_command(folder: Path, capsys, *args: str) -> str:
    assert generate_cli.main(["--checkpoint", str(folder), "--device", "cpu", *args]) == 0
    return capsys.readouterr().out.removesuffix("\n")


@pytest.mark.processes
def test_greedy_chat_is_the_models_chat_format_and_equals_transformers_and_generate(
    server, transformers_greedy, client, folder, capsys
):
    ids = prompt_ids("v3", MESSAGES)
    expected, tokens = transformers_greedy(ids, 12)
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == _finish_reason(tokens)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(tokens))
    # `generate --chat` takes one user turn, so compare it on that turn alone.
    single = [MESSAGES[1]]
    command = _generate_command(
        folder, capsys, "--chat", "--prompt", single[0]["content"], "--max-new-tokens", "9"
    )
    served = client.chat.completions.create(model=NAME, messages=single, temperature=0, max_tokens=9)
    assert served.choices[0].message.content == command == transformers_greedy(prompt_ids("v3", single), 9)[0]


@pytest.mark.processes
def test_streamed_chunks_concatenate_to_the_same_text(client, transformers_greedy):
    ids = prompt_ids("v3", MESSAGES)
    expected, tokens = transformers_greedy(ids, 12)
    *chunks, usage = client.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == _finish_reason(tokens)
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    assert (usage.choices, usage.usage.prompt_tokens, usage.usage.completion_tokens) == (
        [],
        len(ids),
        len(tokens),
    )


@pytest.mark.processes
def test_completions_equal_transformers_and_generate_streaming_or_not(
    client, folder, transformers_greedy, capsys
):
    ids = _encode(PROMPT)
    expected, tokens = transformers_greedy(ids, 10)
    reply = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=10)
    assert (
        reply.choices[0].text
        == expected
        == _generate_command(folder, capsys, "--prompt", PROMPT, "--max-new-tokens", "10")
    )
    assert reply.choices[0].finish_reason == _finish_reason(tokens)
    stream = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=10, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected


@pytest.mark.processes
def test_stop_cuts_the_text_as_generate_does(client, folder, transformers_greedy, capsys):
    full, _ = transformers_greedy(prompt_ids("v3", [MESSAGES[1]]), 12)
    stop = full[4:7]
    command = _generate_command(
        folder, capsys, "--chat", "--prompt", MESSAGES[1]["content"], "--max-new-tokens", "12", "--stop", stop
    )
    assert command == full[: full.index(stop)]
    messages = [MESSAGES[1]]
    reply = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=12, stop=[stop]
    )
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (command, "stop")
    stream = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=12, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == command


@pytest.mark.processes
def test_seeded_sampling_equals_generate_with_that_seed_while_greedy_requests_share_the_batch(
    client, folder, transformers_greedy, capsys
):
    options = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "7", "--max-new-tokens", "10"]
    sampled = _generate_command(folder, capsys, "--prompt", PROMPT, *options)
    greedy_prompts = ["Once upon a time", "def main():", "1, 2, 3,"]
    expected = [transformers_greedy(_encode(p), 8)[0] for p in greedy_prompts]

    def sample() -> str:
        reply = client.completions.create(
            model=NAME, prompt=PROMPT, temperature=0.9, top_p=0.95, seed=7, max_tokens=10
        )
        return reply.choices[0].text

    def greedy(prompt: str) -> str:
        return (
            client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8).choices[0].text
        )

    with ThreadPoolExecutor(4) as pool:  # arrive together, within the server's batch timeout
        futures = [pool.submit(sample)] + [pool.submit(greedy, prompt) for prompt in greedy_prompts]
        results = [future.result() for future in futures]
    assert results == [sampled, *expected]
    assert sampled != transformers_greedy(_encode(PROMPT), 10)[0]


BAD_REQUESTS = [
    ({"messages": [{"role": "tool", "content": "x"}]}, "message 0 has role 'tool'"),
    ({"messages": []}, "conversation has no messages"),
    ({"max_tokens": CONTEXT}, f"exceed the model's context of {CONTEXT} tokens"),
    ({"temperature": 2.5}, "temperature: must be between 0 and 2"),
    ({"top_p": 0}, "top_p: must be in (0, 1]"),
    ({"stop": ""}, 'stop: "" would stop'),
    ({"n": 2}, "one choice per request"),
]


@pytest.mark.processes
def test_bad_requests_get_400_with_the_reason_and_the_server_keeps_serving(client, transformers_greedy):
    request = {"model": NAME, "messages": [MESSAGES[1]], "temperature": 0, "max_tokens": 4}
    for change, message in BAD_REQUESTS:
        for stream in (False, True):  # a streaming request is refused before its stream starts
            with pytest.raises(openai.BadRequestError) as error:
                client.chat.completions.create(**{**request, **change, "stream": stream})
            assert error.value.status_code == 400
            assert message in error.value.message, (change, stream)
    reply = client.chat.completions.create(**request)
    assert reply.choices[0].message.content == transformers_greedy(prompt_ids("v3", [MESSAGES[1]]), 4)[0]


@pytest.mark.processes
def test_a_body_that_does_not_parse_gets_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature="hot")
    assert "temperature: Input should be a valid number" in error.value.message


def _completion(client: openai.OpenAI, prompt: str, **options) -> tuple[int, str]:
    """The status and the text (or the server's error message) of a completion."""
    try:
        reply = client.completions.create(model=NAME, prompt=prompt, **options)
    except openai.APIStatusError as error:
        return error.status_code, error.message.removeprefix(f"Error code: {error.status_code} - ")
    return 200, reply.choices[0].text


def _timed_completion(client: openai.OpenAI) -> float:
    """Seconds a small greedy completion takes."""
    start = time.monotonic()
    client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=8)
    return time.monotonic() - start


@pytest.mark.processes
def test_a_bad_request_arriving_with_others_gets_400_and_they_get_their_text(client, transformers_greedy):
    """A seed beyond 64 bits used to fail its whole batch with 500; a tiny temperature too."""
    prompts = ["Once upon a time", "def main():", "1, 2, 3,"]
    expected = [transformers_greedy(_encode(prompt), 8)[0] for prompt in prompts]
    with ThreadPoolExecutor(4) as pool:  # arrive together, within the server's batch timeout
        futures = [
            pool.submit(_completion, client, PROMPT, temperature=0.9, seed=2**64, max_tokens=8),
            pool.submit(_completion, client, prompts[0], temperature=1e-300, seed=3, max_tokens=8),
            pool.submit(_completion, client, prompts[1], temperature=0, max_tokens=8),
            pool.submit(_completion, client, prompts[2], temperature=0, max_tokens=8),
        ]
        results = [future.result() for future in futures]
    assert results[0] == (400, "seed: must fit in 64 bits (from -2**63 to 2**64 - 1)")
    assert results[1:] == [(200, text) for text in expected]


@pytest.mark.processes
def test_a_large_prompt_does_not_hold_up_a_small_request(client):
    """The large prompt is tokenized off the event loop (then refused: over --max-prompt-tokens), which
    takes about a second here: a small request sent while it is under way is answered before it. Before,
    tokenizing on the event loop, the small request waited for it (11.7x to 32x its own time). The order is
    asserted, not a ratio of times: with the other tests on the same two cores a small request alone takes
    0.07-1.2 s, and the ratio read 6.7x-22x under the full suite."""
    large = "lorem ipsum " * (MAX_REQUEST_BYTES // 12 - 100)
    orders = []
    for _ in range(3):
        with ThreadPoolExecutor(1) as pool:
            refused = pool.submit(lambda: (_completion(client, large, max_tokens=1), time.monotonic()))
            time.sleep(0.2)  # its body is in, its tokenization under way
            _timed_completion(client)
            small_answered = time.monotonic()
            (status, message), large_answered = refused.result()
        orders.append(small_answered < large_answered)
        if orders[-1]:
            break
    assert any(orders), "the small request was answered only after the large prompt"
    assert status == 400 and message.endswith(
        f" tokens, more than this server's --max-prompt-tokens {MAX_PROMPT_TOKENS}; shorten the prompt"
    )
    assert _completion(client, large + "x" * 2000, max_tokens=1) == (
        413,
        f"request body: larger than this server's --max-request-bytes {MAX_REQUEST_BYTES}; "
        "send a shorter prompt",
    )


@pytest.mark.processes
def test_a_client_that_disconnects_stops_its_decoding(client):
    """Streaming or not: the next request is answered within a few seconds, not after the rest of a decoding
    of 4000 tokens (26 s after a closed stream and 41 s after a client timeout before decoding stopped; the
    bound leaves room for a machine busy with other tests, where one small request took 1.8 s)."""
    long = {"model": NAME, "prompt": PROMPT, "temperature": 0, "max_tokens": CONTEXT - 16}
    alone = statistics.median(_timed_completion(client) for _ in range(3))
    stream = client.completions.create(**long, stream=True)
    for _ in itertools.islice(stream, 20):  # decoding is under way
        pass
    stream.close()
    after_stream = _timed_completion(client)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(**long)
    after_timeout = _timed_completion(client)
    assert max(after_stream, after_timeout) < 4.0 + 3 * alone, (after_stream, after_timeout, alone)


def _get(port: int, path: str, headers: dict) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.processes
def test_the_api_key_the_model_name_and_the_host_are_checked(server, client):
    """OpenAI clients send the key as `Authorization: Bearer`; LitServe's own X-API-Key header is not it.
    Another model name is 404 in OpenAI's error object; a foreign Host (DNS rebinding) is refused."""
    stranger = client.with_options(api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as error:
        stranger.completions.create(model=NAME, prompt=PROMPT, max_tokens=2)
    assert "--api-key" in error.value.message and error.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    for headers in ({}, {"X-API-Key": API_KEY}):
        status, body = _get(server.port, "/v1/models", headers)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert [model.id for model in client.models.list()] == [NAME]
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[MESSAGES[1]], max_tokens=2)
    assert error.value.code == "model_not_found" and f"`{NAME}`" in error.value.message
    assert _get(server.port, "/health", {"Host": "attacker.example"})[0] == 400
    assert _get(server.port, "/health", {"Host": f"localhost:{server.port}"})[0] == 200


def test_serving_beyond_loopback_without_a_key_warns_in_one_line(tmp_path, capsys, monkeypatch):
    from mistral_lightning import cli

    missing = tmp_path / "missing"
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert cli.main(["serve", "--checkpoint", str(missing), "--host", "0.0.0.0", "--port", "8123"]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning == (
        "mistral-lightning serve: warning: --host 0.0.0.0 without --api-key: anyone who reaches port 8123 "
        f"can use the model; set {API_KEY_ENV} (or --api-key)"
    )
    assert error.startswith(f"mistral-lightning serve: error: {missing}: no such file or folder")
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    assert cli.main(["serve", "--checkpoint", str(missing), "--host", "0.0.0.0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert cli.main(["serve", "--checkpoint", str(missing), "--api-key", " "]) == 2
    assert capsys.readouterr().err.strip() == (
        "mistral-lightning serve: error: --api-key: is empty; give the key clients must send, or leave the "
        "option out"
    )


def test_a_wrong_checkpoint_or_device_is_one_line_before_anything_starts(folder, tmp_path, capsys):
    from mistral_lightning import cli

    assert cli.main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mistral-lightning serve: error: {tmp_path / 'missing'}: no such file or folder; pass an HF model folder "
        "(config.json + *.safetensors) or a checkpoint written by `fit` (a DCP folder or a .ckpt file)"
    ]
    assert cli.main(["serve", "--checkpoint", str(folder), "--batch-timeout", "-1"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "mistral-lightning serve: error: --batch-timeout -1: give a number of seconds >= 0"
    )


def test_a_mixed_batch_decodes_each_request_as_it_would_alone(folder, transformers_greedy):
    """What the worker does with a batch LitServe collects: greedy rows together, the sampled row alone,
    each with its own max_tokens and stop strings."""
    from mistral_lightning.generation import generate
    from mistral_lightning.generation.loading import load_model, load_tokenizer
    from mistral_lightning.serving.decoding import decode_requests
    from mistral_lightning.serving.requests import DecodingRequest

    model, tokenizer = load_model(folder), load_tokenizer(None, folder)
    long_text, _ = transformers_greedy(_encode("def main():"), 12)
    stop = long_text[5:8]
    batch = [
        DecodingRequest(_encode("Once upon a time"), 5, 0.0, 1.0, None, []),
        DecodingRequest(_encode(PROMPT), 10, 0.9, 0.95, 7, []),
        DecodingRequest(_encode("def main():"), 12, 0.0, 1.0, None, ["zzz", stop]),
        DecodingRequest(_encode("1, 2, 3,"), 8, 0.0, 1.0, None, []),
    ]
    steps = list(decode_requests(model, tokenizer, batch))
    texts = ["".join(step[row]["text"] for step in steps if step[row]) for row in range(len(batch))]
    reasons = [[step[row]["finish_reason"] for step in steps if step[row]][-1] for row in range(len(batch))]
    sampled = generate(
        model, [_encode(PROMPT)], 10, temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(7)
    )
    assert texts == [
        transformers_greedy(_encode("Once upon a time"), 5)[0],
        tokenizer.decode(sampled[0]),
        long_text[: long_text.index(stop)],
        transformers_greedy(_encode("1, 2, 3,"), 8)[0],
    ]
    assert reasons == ["length", "stop" if sampled[0][-1] == EOS else "length", "stop", "length"]


def _monitor_crash(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        return logging.LogRecord(
            "litserve.server", logging.ERROR, "server.py", 1, "Monitoring worker crashed", (), sys.exc_info()
        )


def test_only_the_shutdown_race_of_litserves_monitor_is_dropped_from_the_log():
    """The manager that holds LitServe's shutdown flag may exit before its monitoring thread's last poll (an
    EOFError at SIGTERM, seen once in a full suite); a real crash of that thread still reaches the log."""
    from mistral_lightning.cli.serve import _ManagerGoneAtShutdown

    dropped = _ManagerGoneAtShutdown()
    assert not dropped.filter(_monitor_crash(EOFError()))
    assert not dropped.filter(_monitor_crash(ConnectionResetError()))
    assert dropped.filter(_monitor_crash(ValueError("a real crash")))

"""`flashllm serve` started for real in a subprocess on a free port, driven over HTTP with the standard
library: the OpenAI routes, streaming, stop strings, usage, errors as OpenAI JSON with 4xx, the API key."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from flashllm.bundle.writer import convert  # noqa: E402
from tests.tiny import tiny_llama, tiny_tokenizer  # noqa: E402

KEY = "sekrit"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    source = tiny_llama(root / "src", vocab_size=300, max_position_embeddings=8192)
    tiny_tokenizer(source, 300)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}<assistant>"
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    convert(source, root / "bundle", dtype="float32")
    process, url = start_server(root / "bundle", "--dram-budget", "1GB", "--api-key", KEY, "--context", "4096")
    yield url
    process.terminate()
    process.wait(timeout=30)


def start_server(bundle, *args):
    """`flashllm serve BUNDLE ARGS` in a subprocess on a free port, once it answers: (process, base url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "flashllm", "serve", str(bundle), "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            request("GET", url + "/models")
            return process, url
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stderr.read()[-800:]}")
            time.sleep(0.3)
    process.kill()
    pytest.fail("the server did not answer within 300 s")


def request(method, url, body=None, key=KEY, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_models_and_completions(server):
    status, text = request("GET", server + "/models")
    assert status == 200 and json.loads(text)["data"][0]["id"] == "bundle"
    body = {"model": "bundle", "prompt": "the cat sat", "max_tokens": 6, "temperature": 0}
    status, text = request("POST", server + "/completions", body)
    out = json.loads(text)
    assert status == 200 and out["object"] == "text_completion"
    assert out["usage"]["completion_tokens"] <= 6 and out["usage"]["prompt_tokens"] > 0
    assert out["flashllm"]["budget_bytes"] == 10**9
    again = json.loads(request("POST", server + "/completions", body)[1])
    assert again["choices"][0]["text"] == out["choices"][0]["text"]  # greedy: the same text


def test_chat_stream_matches_whole(server):
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, "temperature": 0}
    whole = json.loads(request("POST", server + "/chat/completions", body)[1])
    status, text = request("POST", server + "/chat/completions", body | {"stream": True})
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]
    stats = json.loads(request("GET", server + "/stats")[1])
    assert stats["requests"] >= 2 and stats["peak_rss_bytes"] > 0


def test_stop_strings_cut_the_text(server):
    from flashllm.serve import _StopFilter

    f = _StopFilter(["END", "\n\n"])  # pieces as a stream delivers them: a stop may span pieces
    out = "".join(f.push(p) for p in ["Hello E", "N", "x wor", "ld\n", "\nmore"]) + f.flush()
    assert out == "Hello ENx world" and f.stopped
    f = _StopFilter(["END"])
    assert "".join(f.push(p) for p in ["ab", "EN"]) + f.flush() == "abEN" and not f.stopped
    body = {"prompt": "the cat sat", "max_tokens": 4, "temperature": 0, "stop": ["zzz"]}
    status, text = request("POST", server + "/completions", body)
    assert status == 200 and json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("case, status, fragment", [
    ("no key", 401, "API key"), ("bad json", 400, "not valid JSON"), ("negative", 400, "max_tokens"),
    ("model", 404, "does not exist"), ("long", 400, "exceed the context"), ("messages", 400, "messages")])
def test_bad_requests_get_openai_errors(server, case, status, fragment):
    url, body, key, raw = server + "/completions", {"prompt": "hi", "max_tokens": 4}, KEY, None
    if case == "no key":
        key = None
    elif case == "bad json":
        raw = b"{not json"
    elif case == "negative":
        body["max_tokens"] = -3
    elif case == "model":
        body["model"] = "gpt-4"
    elif case == "long":
        body["prompt"] = "the cat sat on the mat " * 1000
    elif case == "messages":
        url, body = server + "/chat/completions", {"messages": "hi"}
    got, text = request("POST", url, body, key=key, raw=raw)
    assert got == status and fragment in json.loads(text)["error"]["message"]
    assert request("GET", server + "/models")[0] == 200  # the server is still up


def test_a_client_that_disconnects_frees_the_engine(server):
    """A stream of thousands of tokens, dropped after its first event: the next request is served at
    once, and the dropped one never completes (it is not in the running totals)."""
    import http.client
    from urllib.parse import urlparse

    before = json.loads(request("GET", server + "/stats")[1])
    u = urlparse(server)
    connection = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"prompt": "the cat sat", "max_tokens": 4000, "temperature": 1.0, "seed": 1, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event has started: the engine is busy with this request
    connection.sock.close()
    connection.close()
    status, text = request("POST", server + "/completions", {"prompt": "the cat", "max_tokens": 3})
    assert status == 200
    after = json.loads(request("GET", server + "/stats")[1])
    assert after["requests"] == before["requests"] + 1  # only the second one: the first was dropped
    assert after["completion_tokens"] - before["completion_tokens"] <= 3


@pytest.mark.realmodel
def test_real_smollm2_server_answers_the_chat_question(smollm2_bundle):
    """The real SmolLM2-135M bundle behind the server, under a budget: the greedy chat answer."""
    process, url = start_server(smollm2_bundle, "--dram-budget", "70%")
    try:
        body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
                "temperature": 0}
        status, text = request("POST", url + "/chat/completions", body, key=None)
        out = json.loads(text)
        assert status == 200 and out["choices"][0]["message"]["content"].startswith("The capital of France is Paris")
        stats = out["flashllm"]
        assert stats["peak_rss_bytes"] <= stats["budget_bytes"] + stats["overhead_bytes"]
    finally:
        process.terminate()
        process.wait(timeout=30)

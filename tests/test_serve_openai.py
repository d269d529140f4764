"""`flashllm serve` on the real SmolLM2 bundle under a DRAM budget, started in a subprocess on a free port
and driven with the official `openai` client: the greedy text is `flashllm generate`'s, errors are the
client's exceptions with their 4xx status, a stream closed early leaves the server answering, and the
budget promise (peak RSS within budget + overhead) holds over a run of 20 requests."""

import json
import subprocess
import sys

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from flashllm.tokenizer import Tokenizer
from tests.test_serve import request, start_server

pytestmark = pytest.mark.realmodel
KEY, BUDGET = "sekrit", "70%"
CHAT, PROMPT = "What is the capital of France?", "The capital of France is"


@pytest.fixture(scope="module")
def generated(smollm2_bundle):
    """`flashllm generate`'s greedy text for the chat question and the plain prompt, 16 tokens, same budget;
    both started at once, and read when a test first needs them (they run while the server starts)."""
    runs = {name: subprocess.Popen([sys.executable, "-m", "flashllm", "generate", str(smollm2_bundle), prompt,
                                    "-n", "16", "--dram-budget", BUDGET, "--stats", "none", *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, prompt, args in (("chat", CHAT, ["--chat"]), ("completion", PROMPT, []))}
    texts = {}

    def text(name: str) -> str:
        if name not in texts:
            out, err = runs[name].communicate(timeout=600)
            assert runs[name].returncode == 0, err[-800:]
            assert out.endswith("\n")  # generate ends its text with a newline of its own
            texts[name] = out[:-1]
        return texts[name]

    yield text
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.wait()


@pytest.fixture(scope="module")
def served(smollm2_bundle, generated):
    """The server on the bundle under the budget, with an API key: (process, base url, model id)."""
    process, url = start_server(smollm2_bundle, "--dram-budget", BUDGET, "--api-key", KEY)
    yield process, url, smollm2_bundle.name
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a request that never ends keeps uvicorn from shutting down
        process.kill()
        raise


def client(url, key=KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def test_streamed_chat_matches_generate(served, generated, smollm2_bundle):
    _, url, model = served
    stream = client(url).chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT}],
                                                 max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == generated("chat") and text.startswith("The capital of France is Paris")
    tokenizer = Tokenizer.from_folder(smollm2_bundle)  # the prompt generate --chat renders, to the token
    assert chunks[-1].usage.prompt_tokens == len(tokenizer.encode(tokenizer.render_chat([{"role": "user",
                                                                                          "content": CHAT}])))


def test_completion_matches_generate(served, generated, smollm2_bundle):
    _, url, model = served
    out = client(url).completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert out.choices[0].text == generated("completion") and out.choices[0].text.startswith(" Paris")
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(Tokenizer.from_folder(smollm2_bundle).encode(PROMPT))


def test_a_wrong_api_key_gets_401(served):
    _, url, model = served
    with pytest.raises(openai.AuthenticationError) as error:
        client(url, key="wrong").completions.create(model=model, prompt=PROMPT, max_tokens=2)
    assert error.value.status_code == 401 and "API key" in error.value.message


@pytest.mark.parametrize("bad, error, status", [({"max_tokens": -1}, openai.BadRequestError, 400),
                                                ({"model": "gpt-4"}, openai.NotFoundError, 404)])
def test_a_bad_request_gets_a_4xx_and_the_next_one_is_served(served, generated, bad, error, status):
    _, url, model = served
    with pytest.raises(error) as raised:
        client(url).completions.create(**({"model": model, "prompt": PROMPT, "max_tokens": 16} | bad))
    assert raised.value.status_code == status and raised.value.body["type"] == "invalid_request_error"
    out = client(url).completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.choices[0].text and generated("completion").startswith(out.choices[0].text)


def test_a_stream_closed_early_leaves_the_server_answering(served, generated):
    _, url, model = served
    before = json.loads(request("GET", url + "/stats", key=KEY)[1])
    stream = client(url).completions.create(model=model, prompt=PROMPT, max_tokens=400, temperature=0, stream=True)
    for chunk in stream:
        assert chunk.choices[0].text  # the first piece: the engine is busy with this request
        break
    stream.response.close()
    out = client(url).chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT}],
                                              max_tokens=16, temperature=0)
    assert out.choices[0].message.content == generated("chat")
    after = json.loads(request("GET", url + "/stats", key=KEY)[1])
    assert after["requests"] == before["requests"] + 1  # the closed stream never completed


def peak_rss(pid: int) -> int:
    """The process's peak RSS (VmHWM), read from outside it."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_the_budget_holds_over_20_requests(served):
    """Chat and completions, streamed and whole, 20 in a row: the server's peak RSS, as it reports it and as
    the kernel counts it for the process, stays within the budget + the overhead the engine measured."""
    process, url, model = served
    c, before = client(url), json.loads(request("GET", url + "/stats", key=KEY)[1])
    for i in range(20):
        prompt, stream = f"{PROMPT} {i}", i % 4 >= 2
        if i % 2:
            out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=3, temperature=0.7, seed=i, stream=stream)
        else:
            out = c.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0.7, seed=i,
                                       stream=stream)
        if stream:
            assert list(out)[-1].choices[0].finish_reason in ("stop", "length")
        else:
            assert out.usage.completion_tokens > 0
    stats = json.loads(request("GET", url + "/stats", key=KEY)[1])
    assert stats["requests"] == before["requests"] + 20
    limit = stats["budget_bytes"] + stats["overhead_bytes"]
    assert 0 < stats["peak_rss_bytes"] <= limit
    kernel_peak = peak_rss(process.pid)
    print(f"\n{stats['requests']} requests: peak RSS {stats['peak_rss_bytes'] / 1e6:.1f} MB (the server's "
          f"VmHWM {kernel_peak / 1e6:.1f} MB), budget + overhead {limit / 1e6:.1f} MB")
    assert kernel_peak <= limit, f"the server's VmHWM is {(kernel_peak - limit) / 1e6:.1f} MB above budget + overhead"

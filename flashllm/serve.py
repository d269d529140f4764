"""`flashllm serve`: an OpenAI-compatible HTTP server over one model under one DRAM budget (Starlette and
uvicorn: the optional extra `pip install -e ".[serve]"`).

/v1/models, /v1/completions, /v1/chat/completions (the checkpoint's chat template), with `stream: true`
as server-sent events or without; max_tokens, temperature, top_p, seed, stop; usage counts, and the
request's engine statistics under "flashllm". /v1/stats holds the running totals. Requests are served
one at a time in arrival order (a FIFO lock); a streaming client that disconnects frees the engine at
the next token. Bad requests get OpenAI's JSON error with a 4xx status; with an API key, a request
without it gets 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from flashllm.errors import FlashLLMError

if TYPE_CHECKING:
    from flashllm.api import Model

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.kind, self.param = message, status, kind, param


def _error(exc: BadRequest):
    from starlette.responses import JSONResponse

    body = {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": None}}
    return JSONResponse(body, status_code=exc.status)


def _options(body: dict) -> dict:
    """Sampling options from an OpenAI request body, checked."""
    def number(name, default, low, high=None, integer=False):
        value = body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}", param=name)
        if value < low or (high is not None and value > high):
            raise BadRequest(f"{name} {value} is out of range ({low}..{high if high is not None else ''})", param=name)
        return value

    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", param="stop")
    return {"max_tokens": number("max_tokens", DEFAULT_MAX_TOKENS, 1, integer=True),
            "temperature": float(number("temperature", 1.0, 0.0, 2.0)),
            "top_p": float(number("top_p", 1.0, 0.0, 1.0)),
            "seed": number("seed", None, 0, integer=True), "stop": stop}


class _StopFilter:
    """Cuts the text at the first stop string; holds back a tail that could still begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def push(self, piece: str) -> str:
        self.text += piece
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, end = True, min(cuts)
        else:
            end = len(self.text) - max((len(s) - 1 for s in self.stops), default=0)
        out, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return out

    def flush(self) -> str:
        out = "" if self.stopped else self.text[self.sent:]
        self.sent = len(self.text)
        return out


def create_app(model: Model, model_id: str, api_key: str | None = None):
    import anyio
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    lock = asyncio.Lock()  # FIFO: requests are served one at a time, in arrival order
    totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "decode_seconds": 0.0,
              "bytes_read": 0, "neurons_needed": 0, "neurons_hit": 0, "peak_rss_bytes": 0,
              "budget_bytes": model.budget_bytes, "overhead_bytes": model.flash.overhead_bytes}

    def check_key(request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise BadRequest("a valid API key is required (Authorization: Bearer KEY)", 401, "invalid_api_key")

    async def parse(request) -> dict:
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("model", model_id) != model_id:
            raise BadRequest(f"model {body.get('model')!r} does not exist (this server has {model_id!r})", 404,
                             param="model")
        return body

    def account(usage: dict) -> None:
        s = model.stats
        totals["requests"] += 1
        totals["prompt_tokens"] += usage["prompt_tokens"]
        totals["completion_tokens"] += usage["completion_tokens"]
        totals["decode_seconds"] += s.tokens / s.tokens_per_s if s.tokens_per_s else 0.0
        totals["bytes_read"] += s.bytes_read
        totals["neurons_needed"] += s.neurons_needed
        totals["neurons_hit"] += s.neurons_hit
        totals["peak_rss_bytes"] = max(totals["peak_rss_bytes"], s.peak_rss_bytes)

    async def run(request, prompt: str, options: dict, chat: bool):
        """The response: whole JSON, or server-sent events with `stream`."""
        stops = _StopFilter(options.pop("stop"))
        stream = bool(options.pop("stream", False))
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model_id, "choices": [choice]}

        def finish_reason() -> str:
            return "length" if model.usage["completion_tokens"] >= options["max_tokens"] and not stops.stopped \
                else "stop"

        await lock.acquire()
        handed_off = False  # True once the event stream owns the lock (it releases it when it ends)
        try:
            try:
                pieces = model.stream(prompt, **options)
            except FlashLLMError as e:
                raise BadRequest(str(e)) from None
            if not stream:
                text = ""
                while not stops.stopped:
                    piece = await run_in_threadpool(next, pieces, None)
                    if piece is None:
                        break
                    text += stops.push(piece)
                text += stops.flush()
                pieces.close()
                usage = dict(model.usage, total_tokens=sum(model.usage.values()))
                account(model.usage)
                choice = {"index": 0, "finish_reason": finish_reason()}
                choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
                return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                     "created": created, "model": model_id, "choices": [choice], "usage": usage,
                                     "flashllm": model.stats.to_json()})
            handed_off = True
        finally:
            if not handed_off:
                lock.release()

        async def events():
            in_flight = None  # the token being computed in a worker thread
            try:
                if chat:
                    yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
                while not stops.stopped:
                    if await request.is_disconnected():
                        return  # the engine is freed at this token
                    # shielded: a disconnect cancels this coroutine, never the token in flight, which
                    # must finish before the engine is handed to the next request
                    in_flight = asyncio.ensure_future(run_in_threadpool(next, pieces, None))
                    piece = await asyncio.shield(in_flight)
                    in_flight = None
                    if piece is None:
                        break
                    text = stops.push(piece)
                    if text:
                        yield f"data: {json.dumps(chunk(text, None))}\n\n"
                tail = stops.flush()
                if tail:
                    yield f"data: {json.dumps(chunk(tail, None))}\n\n"
                pieces.close()
                account(model.usage)
                end = chunk(None, finish_reason()) | {"usage": dict(model.usage, total_tokens=sum(model.usage.values())),
                                                      "flashllm": model.stats.to_json()}
                yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"
            finally:
                try:
                    if in_flight is not None:
                        # the disconnect's cancel scope cancels every await here too: only a shielded
                        # scope waits for the token (closing the generator under it raised, and the lock
                        # stayed held)
                        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                            await in_flight
                    pieces.close()
                finally:
                    lock.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(request):
        try:
            body = await parse(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string", param="prompt")
            return await run(request, prompt, _options(body) | {"stream": body.get("stream")}, chat=False)
        except BadRequest as e:
            return _error(e)

    async def chat_completions(request):
        try:
            body = await parse(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise BadRequest("messages must be a non-empty list of {role, content} strings", param="messages")
            try:
                prompt = model.tokenizer.render_chat([{"role": m["role"], "content": m["content"]} for m in messages])
            except FlashLLMError as e:
                raise BadRequest(str(e), param="messages") from None
            return await run(request, prompt, _options(body) | {"stream": body.get("stream")}, chat=True)
        except BadRequest as e:
            return _error(e)

    async def models(request):
        try:
            check_key(request)
        except BadRequest as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "flashllm"}]})

    async def stats(request):
        try:
            check_key(request)
        except BadRequest as e:
            return _error(e)
        t = totals
        decoded = max(1, t["completion_tokens"] - t["requests"])  # the first token of each is the prefill's
        return JSONResponse(dict(t, tokens_per_s=decoded / t["decode_seconds"] if t["decode_seconds"] else 0.0,
                                 bytes_read_per_token=t["bytes_read"] / decoded,
                                 cache_hit_rate=t["neurons_hit"] / t["neurons_needed"] if t["neurons_needed"] else 0.0))

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/stats", stats)])


def serve_command(console, user_errors, bundle_for):
    """The `serve` verb for the CLI's typer app, given its console, error handler and bundle resolver (the
    CLI passes them in: this module never imports the CLI)."""

    def serve(
        model: str = typer.Argument(..., help="A bundle folder or known model name."),
        dram_budget: str = typer.Option("50%", "--dram-budget", "-b", help="DRAM budget: 1.5GB, 800MiB or 50%."),
        host: str = typer.Option("127.0.0.1", help="Address to bind (localhost by default)."),
        port: int = typer.Option(8000, min=1, max=65535, help="Port."),
        api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'."),
        context: int = typer.Option(512, min=2, help="Tokens of prompt + generation per request (the KV cache is planned for it)."),
    ):
        """An OpenAI-compatible server (/v1/models, /v1/completions, /v1/chat/completions, /v1/stats) over one
        model under one DRAM budget; needs `pip install -e ".\\[serve]"`."""
        with user_errors():
            try:
                import starlette  # noqa: F401
                import uvicorn
            except ImportError:
                raise FlashLLMError('serve needs the server extra: pip install -e ".[serve]"') from None
            from flashllm.api import Model

            folder = bundle_for(model)
            opened = Model.open(folder, dram_budget, context=context)
            app = create_app(opened, Path(folder).name, api_key)
            console.print(f"serving {Path(folder).name} on http://{host}:{port}/v1 (budget "
                          f"{opened.budget_bytes / 1e6:,.0f} MB, context {opened.context})", highlight=False)
            uvicorn.run(app, host=host, port=port, log_level="warning")

    return serve

"""The HTTP face: FastAPI routes for the OpenAI endpoints, /health and /metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kiln.errors import KilnError
from kiln.runtime import render_chat_template
from kiln.runtime.generate import SamplingParams
from kiln.serve import params
from kiln.serve.errors import APIError, invalid
from kiln.serve.guard import Guard
from kiln.serve.metrics import Metrics
from kiln.serve.models import Served
from kiln.serve.scheduler import DecodeLoop, Job
from kiln.serve.text import TextStream

log = logging.getLogger("kiln.serve")


@dataclasses.dataclass
class Settings:
    max_batch: int = 16
    max_queue: int = 64
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes
    timeout: float = 300.0  # seconds a request may take, queueing included
    prefill_chunk: int | None = 64  # prompt tokens prefilled per step while others decode
    aging: float = 5.0  # seconds of waiting that raise a request's priority by one
    grace: float = 10.0  # seconds in-flight requests get to finish after SIGTERM


def create_app(served: dict[str, Served], settings: Settings, metrics: Metrics | None = None):
    metrics = metrics or Metrics()
    created = int(time.time())
    state = {"stopping": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for s in served.values():
            if s.task == "causal-lm" and s.base is None:
                model = s.art._lm()
                batch = 1 if model.static else settings.max_batch  # a static cache batches nothing
                s.loop = DecodeLoop(s.name, model, metrics, batch, settings.max_queue, settings.prefill_chunk,
                                    settings.aging)
                s.loop.start()
        for s in served.values():
            if s.base is not None:  # a LoRA adapter: its rows join the artifact's batch
                s.loop = s.base.loop
        yield
        state["stopping"] = True
        await asyncio.gather(*(run_in_threadpool(s.loop.stop, 0.0) for s in served.values()
                               if s.loop and s.base is None))

    app = FastAPI(title="kiln serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error",
                                     code="internal_error").body(), status_code=500)

    async def read_body(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body:
                metrics.inc("kiln_rejections_total", model="", reason="body_too_large")
                raise APIError(413, f"the request body is larger than {settings.max_body} bytes",
                               code="body_too_large")
            chunks.append(chunk)
        return params.parse_json(b"".join(chunks))

    def rejected(name: str, exc: APIError) -> APIError:
        metrics.inc("kiln_rejections_total", model=name, reason=exc.code or "invalid_request")
        return exc

    @app.get("/health")
    async def health():
        body = {"status": "shutting_down" if state["stopping"] else "ok", "models": list(served)}
        return JSONResponse(body, status_code=503 if state["stopping"] else 200)

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(s: Served) -> dict:
        card = {"id": s.name, "object": "model", "created": created, "owned_by": "kiln", "task": s.task}
        if s.base is not None:  # a LoRA adapter in the artifact's slots (vLLM's `parent`)
            card.update(parent=s.base.name, adapter=s.adapter)
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(s) for s in served.values()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_body(request)
        s = served[params.model_name(body, {n: s for n, s in served.items() if s.task == "embedding"})]
        try:
            texts = params.embedding_input(body)
        except APIError as exc:
            raise rejected(s.name, exc) from None
        if s.waiting >= settings.max_queue:
            metrics.inc("kiln_rejections_total", model=s.name, reason="queue_full")
            raise APIError(429, f"the queue for model '{s.name}' is full; retry after 1 s", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        s.waiting += 1
        try:
            vectors, used = await run_in_threadpool(embed, s, texts)
        finally:
            s.waiting -= 1
        as_base64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist()}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": s.name,
                "usage": {"prompt_tokens": used, "total_tokens": used}}

    def embed(s: Served, texts: list[str]):
        with s.lock:  # the tokenizer's truncation settings are per call
            try:
                used = int(s.art.tokenize_batch(texts)["attention_mask"].sum())
                return np.asarray(s.art.embed(texts), dtype=np.float32), used
            except KilnError as exc:
                raise invalid(str(exc).splitlines()[0], "input") from None

    async def generate(request: Request, chat: bool):
        body = await read_body(request)
        s = served[params.model_name(body, {n: s for n, s in served.items() if s.task == "causal-lm"})]
        try:
            sampling = params.sampling(body, chat)
            ids = prompt_ids(s, body, chat)
        except APIError as exc:
            raise rejected(s.name, exc) from None
        limit = s.art.max_positions
        room = (limit - len(ids)) if limit else None
        max_tokens = sampling.max_tokens or (room if chat and room else 16)
        sp = SamplingParams(max_new_tokens=min(max_tokens, room) if room else max_tokens,
                            temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                            stop_token_ids=() if sampling.ignore_eos else None)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(ids, sp, emit, priority=sampling.priority, deadline=time.monotonic() + settings.timeout,
                  adapter=s.slot, model=s.name)
        s.loop.submit(job)
        reply = Reply(s, job, queue, request, TextStream(s.art.tokenizer, sampling.stop), sampling, chat, len(ids))
        first = await reply.next_event()  # before any header: an error here is still its own status
        if sampling.stream:
            return StreamingResponse(reply.sse(first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(first)

    def prompt_ids(s: Served, body: dict, chat: bool) -> list[int]:
        art = s.art
        if chat:
            template = art.manifest.get("generation", {}).get("chat_template")
            if not template:
                raise invalid(f"the model '{s.name}' has no chat template: use /v1/completions", "messages",
                              "no_chat_template")
            try:
                text = render_chat_template(template, params.messages(body), where="the chat template")
                ids = art.encode(text)
            except KilnError as exc:
                raise invalid(str(exc).splitlines()[0], "messages") from None
        else:
            prompt = params.prompt(body)
            if isinstance(prompt, str):
                try:
                    ids = art.encode(prompt)
                except KilnError as exc:
                    raise invalid(str(exc).splitlines()[0], "prompt") from None
            else:
                vocab = art.tokenizer.get_vocab_size(with_added_tokens=True)
                if any(not 0 <= t < vocab for t in prompt):
                    raise invalid(f"`prompt` holds a token id outside the vocabulary (0..{vocab - 1})", "prompt")
                ids = prompt
        if not ids:
            raise invalid("the prompt encodes to no tokens", "messages" if chat else "prompt")
        limit = art.max_positions
        if limit is not None and len(ids) >= limit:
            raise invalid(f"the prompt has {len(ids)} tokens; the model '{s.name}' takes at most {limit} positions, "
                          f"prompt and new tokens together", "messages" if chat else "prompt",
                          "context_length_exceeded")
        return ids

    return Guard(app, metrics, settings.api_key, settings.max_body), app


class Reply:
    """One generation request's answer: whole or as server-sent events."""

    def __init__(self, served: Served, job: Job, queue: asyncio.Queue, request: Request, text: TextStream,
                 sampling, chat: bool, prompt_tokens: int):
        self.s, self.job, self.queue, self.request, self.text = served, job, queue, request, text
        self.sampling, self.chat, self.prompt_tokens = sampling, chat, prompt_tokens
        self.tokens: list[int] = []
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.finished = False
        self.checked = time.monotonic()

    async def next_event(self) -> tuple:
        """The job's next event; a client that went away cancels the job (its row leaves the batch)."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.queue.get(), 0.25)
                except TimeoutError:
                    event = None
                now = time.monotonic()
                if event is None or now - self.checked > 0.25:  # tokens may keep coming: check by the clock
                    self.checked = now
                    if await self.request.is_disconnected():
                        self.s.loop.cancel(self.job, "disconnect")
                        self.finished = True
                        raise APIError(499, "the client closed the connection", code="client_closed")
                if event is None:
                    continue
                if event[0] == "error":
                    self.finished = True
                    raise event[1]
                return event
        except BaseException:
            if not self.finished:
                self.s.loop.cancel(self.job, "disconnect")
            raise

    def _take(self, event) -> tuple[str, str | None]:
        """(new text, finish reason or None) for one event."""
        if event[0] == "done":
            return self.text.flush(), event[1]
        self.tokens.append(event[1])
        new = self.text.feed(event[1])
        if self.text.stopped:
            self.s.loop.cancel(self.job, "stop")
            return new, "stop"
        return new, None

    def _usage(self) -> dict:
        n = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    async def whole(self, event):
        reason = None
        while True:
            _, reason = self._take(event)
            if reason:
                break
            event = await self.next_event()
        self.finished = True
        text = self.text.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": reason} if self.chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        if self.sampling.return_token_ids:
            choice["token_ids"] = self.tokens
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.s.name, "choices": [choice], "usage": self._usage()}

    def _chunk(self, text: str | None, reason: str | None, token_ids: list[int] | None = None,
               role: bool = False) -> str:
        import json

        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.s.name, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self, event):
        import json

        try:
            if self.chat:
                yield self._chunk(None, None, role=True)
            while True:
                before = len(self.tokens)
                new, reason = self._take(event)
                ids = self.tokens[before:] if self.sampling.return_token_ids else None
                if reason:
                    if new or ids:
                        yield self._chunk(new, None, ids)
                    yield self._chunk(None if self.chat else "", reason)
                    break
                if new or ids:
                    yield self._chunk(new, None, ids)
                try:
                    event = await self.next_event()
                except APIError as exc:  # after the headers: the error is the stream's last event
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            if self.sampling.include_usage:
                body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "created": self.created, "model": self.s.name, "choices": [], "usage": self._usage()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            self.finished = True
        finally:
            if not self.finished:
                self.s.loop.cancel(self.job, "disconnect")


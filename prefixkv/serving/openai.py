"""An OpenAI-compatible front end for the ``prefixkv_llm`` Triton model (FastAPI).

    app = create_app(OpenAIConfig(grpc_url="127.0.0.1:8001", engine_dir="triton_repo/prefixkv_llm/1/engine"))
    # or: prefixkv serve triton_repo --openai-port 9000

Routes: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``.  Each
request becomes one call of the model's streaming gRPC endpoint (the way decoupled models
are called); ``stream: true`` answers with server-sent events (``data: {...}`` chunks, a
usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``).  Chat messages
are rendered with the engine's chat template here and sent as plain text, so a whole
conversation (system, user and assistant turns) reaches the model.  ``usage`` counts the
prompt with the engine's tokenizer (the model tokenizes the same text the same way) and the
completion from the model's ``output_ids``.  A streaming client that disconnects cancels
its gRPC call, which frees its row in the model's batch (a non-streaming request runs to
its end).

Errors are OpenAI-style objects (``{"error": {"message", "type", "param", "code"}}``):
400 for bad requests (the model's own one-line messages included), 404 for an unknown model,
429 when the model's queue is full, 503 when Triton cannot be reached.  Unsupported fields
(``n`` > 1, ``logprobs``, ``echo``, ...) are refused by name, never ignored.
"""

import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .repository import MODEL_NAME

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class OpenAIConfig:
    """grpc_url: Triton's gRPC address; engine_dir: the served engine (its tokenizer and chat
    template); model: the Triton model; served_name: the name clients pass as ``model``
    (default: the Triton model's).  A request without max_tokens gets the model's default
    (``prefixkv deploy --max-tokens``)."""

    grpc_url: str
    engine_dir: str | Path
    model: str = MODEL_NAME
    served_name: str | None = None
    timeout: float = 600.0

    def __post_init__(self):
        if not (Path(self.engine_dir) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{self.engine_dir} holds no tokenizer.json; give the served engine folder")
        self.served_name = self.served_name or self.model


# -- request schemas ----------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)  # not OpenAI's; sent as extra_body by its client
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    # accepted only at their no-op values
    presence_penalty: float | None = Field(default=None, ge=0, le=0)
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    logprobs: bool | int | None = Field(default=None)

    def fields(self) -> dict:
        if self.logprobs:
            raise _Refused("logprobs are not supported by this server", "logprobs")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "stop": stops or None}
        return {k: v for k, v in values.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: Literal[False] = False  # not supported
    suffix: None = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise _Refused("prompt must be one string (batches of prompts are not supported)", "prompt")
            return self.prompt[0]
        return self.prompt


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part]
    name: str | None = None

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)

    def fields(self) -> dict:
        values = super().fields()
        if self.max_completion_tokens is not None:
            values["max_tokens"] = self.max_completion_tokens
        return values


class _Refused(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _triton_error(message: str) -> _Refused:
    """A Triton error as the OpenAI error it is."""
    text = message.strip()
    for prefix in ("[StatusCode.INVALID_ARGUMENT] ", "[StatusCode.UNAVAILABLE] ", "[StatusCode.INTERNAL] "):
        text = text.removeprefix(prefix)
    if "queue is full" in text:
        return _Refused(text, status=429, kind="rate_limit_error", code="queue_full")
    if "shutting down" in text:
        return _Refused(text, status=503, kind="service_unavailable")
    if "internal error" in text:
        return _Refused(text, status=500, kind="server_error")
    return _Refused(text)


# -- the app --------------------------------------------------------------------------------------
def create_app(config: OpenAIConfig):
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError as err:
        raise ImportError(f"the OpenAI front end needs FastAPI ({err}); pip install 'prefixkv[serve]'") from err
    import grpc
    import numpy as np
    from tritonclient.utils import InferenceServerException

    from ..tokenizer import Tokenizer
    from .client import grpc_inputs

    tokenizer = Tokenizer(config.engine_dir)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if "client" in state:
            await state.pop("client").close()

    app = FastAPI(title="prefixkv OpenAI-compatible API", lifespan=lifespan)

    async def client():
        if "client" not in state:
            import tritonclient.grpc.aio as grpcaio

            state["client"] = grpcaio.InferenceServerClient(config.grpc_url)
        return state["client"]

    def refused(err: _Refused) -> JSONResponse:
        return JSONResponse(error_body(str(err), err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, param=".".join(where) or None), status_code=400)

    card = {"id": config.served_name, "object": "model", "created": 0, "owned_by": "prefixkv"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != config.served_name:
            return refused(_Refused(f"the model {name!r} does not exist; this server serves {config.served_name!r}",
                                    "model", 404, code="model_not_found"))
        return card

    async def generate(prompt: str, fields: dict):
        """Async iterator of (text piece, final dict or None) from the model's gRPC stream."""
        triton = await client()
        request_id = uuid.uuid4().hex

        async def one():
            yield {"model_name": config.model, "inputs": grpc_inputs(prompt, stream=True, chat=False, **fields),
                   "request_id": request_id}

        responses = triton.stream_infer(one(), stream_timeout=config.timeout)
        try:
            async for result, error in responses:
                if error is not None:
                    raise _triton_error(error.message() if hasattr(error, "message") else str(error))
                text = result.as_numpy("text_output")
                piece = "" if text is None else text.reshape(-1)[0].decode("utf-8")
                reason = result.as_numpy("finish_reason")
                if reason is None:
                    yield piece, None
                    continue
                ids = result.as_numpy("output_ids")
                yield piece, {"finish_reason": reason.reshape(-1)[0].decode(),
                              "tokens": int(np.asarray(ids).size) if ids is not None else 0}
                return
        except (grpc.RpcError, InferenceServerException, OSError) as err:  # the connection, not the request
            raise _Refused(f"the Triton model could not be reached at {config.grpc_url}: {err}", status=503,
                           kind="service_unavailable") from None
        finally:
            responses.cancel()  # a client gone mid-stream: the model frees its row

    def check_model(body: _Request) -> None:
        if body.model != config.served_name:
            raise _Refused(f"the model {body.model!r} does not exist; this server serves {config.served_name!r}",
                           "model", 404, code="model_not_found")

    async def answer(body: _Request, prompt: str, chat: bool):
        check_model(body)
        fields = body.fields()
        prompt_tokens = len(tokenizer.encode(prompt))
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        def choice(piece: str, reason: str | None, delta: bool) -> dict:
            if chat:
                key = "delta" if delta else "message"
                return {"index": 0, key: {"role": "assistant", "content": piece}, "finish_reason": reason}
            return {"index": 0, "text": piece, "finish_reason": reason, "logprobs": None}

        def usage(tokens: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}

        if not body.stream:
            pieces, final = [], None
            async for piece, final in generate(prompt, fields):
                pieces.append(piece)
            if final is None:
                raise _Refused("the model ended its stream without a final response", status=502, kind="server_error")
            return {"id": ident, "object": kind, "created": created, "model": config.served_name,
                    "choices": [choice("".join(pieces), FINISH.get(final["finish_reason"], "stop"), False)],
                    "usage": usage(final["tokens"])}

        chunk_kind = kind + (".chunk" if chat else "")
        stream = generate(prompt, fields)
        try:  # the first response (or error) before the 200 status is sent
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = ("", {"finish_reason": "stop", "tokens": 0})

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events():
            item = first
            try:
                while True:
                    piece, final = item
                    reason = None if final is None else FINISH.get(final["finish_reason"], "stop")
                    if piece or final is not None:
                        yield event({"id": ident, "object": chunk_kind, "created": created, "model": config.served_name,
                                     "choices": [choice(piece, reason, True)]})
                    if final is not None:
                        if body.include_usage:
                            yield event({"id": ident, "object": chunk_kind, "created": created,
                                         "model": config.served_name, "choices": [], "usage": usage(final["tokens"])})
                        break
                    item = await stream.__anext__()
            except _Refused as err:
                yield event(error_body(str(err), err.kind, err.param, err.code))
            except StopAsyncIteration:
                pass
            finally:
                await stream.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def handle(raw: Request, schema, prompt_of, chat: bool):
        try:
            payload = await raw.json()
        except ValueError:
            return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)
        try:
            body = schema.model_validate(payload)
            return await answer(body, prompt_of(body), chat)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            return JSONResponse(error_body(f"{where or 'body'}: {first.get('msg')}", param=where or None), status_code=400)
        except _Refused as err:
            return refused(err)

    def chat_prompt(body: ChatRequest) -> str:
        try:
            return tokenizer.apply_chat_template([m.plain() for m in body.messages])
        except ValueError as err:  # no chat template, or one that refuses these messages
            raise _Refused(str(err), "messages") from None

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await handle(raw, CompletionRequest, lambda body: body.text(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        return await handle(raw, ChatRequest, chat_prompt, chat=True)

    return app


class FrontEnd:
    """The app on uvicorn, in a thread of this process: ``start()``, ``stop()``."""

    def __init__(self, config: OpenAIConfig, host: str = "127.0.0.1", port: int = 9000):
        import uvicorn

        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host=host, port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> "FrontEnd":
        import threading

        self.thread = threading.Thread(target=self.server.run, name="prefixkv-openai", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI front end did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
            self.thread = None

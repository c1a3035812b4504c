"""The REST text generation server: Megatron's ``PUT /api``, an OpenAI-style ``POST /v1/completions`` and
``GET /health``, over a :class:`~megatron.core.inference.text_generation.TextGenerator`.

* Every request is validated completely before it reaches the model: a wrong type, an out-of-range value, an unknown
  field, a malformed body, too many prompts or a prompt too long for the model is answered HTTP 400 with
  ``{"error": "<field>: <what is wrong>"}``. Every field the server accepts is honoured; anything unexpected is HTTP
  500 with a one-line error, and the server keeps serving.
* Flask answers requests on several threads, but the model runs one batch at a time: valid requests queue on a
  :class:`TicketLock` and are served strictly in the order they finished validation (first come, first served).
* With tensor parallelism every rank holds a share of the model and must make the same calls. Global rank 0 runs
  the HTTP server and, through :class:`BroadcastRunner`, sends each (already validated) request to the other ranks
  before running it; they sit in :func:`run_follower` until rank 0 sends the shutdown message.

``create_app`` builds the Flask app (tests use its test client); ``serve`` runs it on a threaded WSGI server.
"""

from __future__ import annotations

import json
import math
import secrets
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch.distributed as dist
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from megatron.core.inference.generation import check_lengths
from megatron.core.inference.sampling import SamplingParams
from megatron.core.inference.text_generation import TextGenerator, TextRequest, TextResult

MAX_PROMPTS = 128  # Megatron's limit on prompts per request
MAX_TOP_K = 1000
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_LOGPROBS = 5  # OpenAI's limit on /v1/completions ``logprobs``
MAX_BODY_BYTES = 16 * 1024 * 1024

API_FIELDS = ("prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p", "add_BOS", "stop_on_eol",
              "stop_on_double_eol", "prevent_newline_after_colon", "random_seed")
COMPLETION_FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "logprobs", "echo", "stop", "seed",
                     "stream", "model", "n", "best_of", "user", "presence_penalty", "frequency_penalty", "logit_bias",
                     "suffix")


class RequestError(ValueError):
    """An invalid request; the one-line message starts with the field at fault."""


class ServerClosedError(RuntimeError):
    """The server is shutting down and runs no more requests."""


class TicketLock:
    """A mutual-exclusion lock that admits its waiters in arrival order (``threading.Lock`` promises no order).

    ``acquire`` takes the next ticket and waits until that ticket is served; ``release`` serves the next one.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0

    def acquire(self) -> None:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._now_serving == ticket)

    def release(self) -> None:
        with self._condition:
            self._now_serving += 1
            self._condition.notify_all()

    @property
    def waiting(self) -> int:
        """Tickets handed out and not yet served (the holder included)."""
        with self._condition:
            return self._next_ticket - self._now_serving

    def __enter__(self) -> TicketLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------- field checking

_ABSENT = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _shown(value: Any) -> str:
    """A short JSON rendering of a scalar (long values cut)."""
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else _type_name(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _got(value: Any) -> str:
    """``got <kind> <value>`` for error messages."""
    if value is None or isinstance(value, (list, dict)):
        return f"got {_type_name(value)}"
    return f"got {_type_name(value)} {_shown(value)}"


class _Fields:
    """Typed access to the fields of a JSON object body. ``null_is_absent`` makes a JSON null mean "use the
    default" (OpenAI clients send nulls for unset options); otherwise null is a type error."""

    def __init__(self, body: Any, known: tuple[str, ...], null_is_absent: bool) -> None:
        if not isinstance(body, dict):
            raise RequestError(f"request body must be a JSON object, got {_type_name(body)}")
        unknown = [name for name in body if name not in known]
        if unknown:
            name = unknown[0] if len(unknown[0]) <= 40 else unknown[0][:37] + "..."
            raise RequestError(f"{name}: unknown field (accepted fields: {', '.join(known)})")
        self.body = body
        self.null_is_absent = null_is_absent

    def get(self, name: str) -> Any:
        value = self.body.get(name, _ABSENT)
        return _ABSENT if value is None and self.null_is_absent else value

    def integer(self, name: str, default: int | None, minimum: int, maximum: int | None = None) -> int | None:
        value = self.get(name)
        if value is _ABSENT:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name}: must be an integer, {_got(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise RequestError(f"{name}: must be an integer {bounds}, got {_shown(value)}")
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float, *, exclusive_minimum: bool = False
               ) -> float:
        value = self.get(name)
        if value is _ABSENT:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{name}: must be a number, {_got(value)}")
        value = float(value)
        low_ok = value > minimum if exclusive_minimum else value >= minimum
        if not (math.isfinite(value) and low_ok and value <= maximum):
            bounds = f"{'(' if exclusive_minimum else '['}{minimum:g}, {maximum:g}]"
            raise RequestError(f"{name}: must be a number in {bounds}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is _ABSENT:
            return default
        if not isinstance(value, bool):
            raise RequestError(f"{name}: must be a JSON boolean (true or false), {_got(value)}")
        return value

    def string(self, name: str, default: str | None) -> str | None:
        value = self.get(name)
        if value is _ABSENT:
            return default
        if not isinstance(value, str):
            raise RequestError(f"{name}: must be a string, {_got(value)}")
        return value

    def string_list(self, name: str, max_items: int, *, single_allowed: bool, required: bool,
                    allow_empty_strings: bool = True) -> list[str] | None:
        value = self.get(name)
        if value is _ABSENT:
            if required:
                raise RequestError(f"{name}: required field is missing")
            return None
        if single_allowed and isinstance(value, str):
            value = [value]
        what = "a string or a list of strings" if single_allowed else "a list of strings"
        if not isinstance(value, list):
            raise RequestError(f"{name}: must be {what}, {_got(value)}")
        if not value:
            raise RequestError(f"{name}: must hold at least one string, got an empty list")
        if len(value) > max_items:
            raise RequestError(f"{name}: at most {max_items} strings per request, got {len(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise RequestError(f"{name}: item {index} must be a string, {_got(item)}")
            if not allow_empty_strings and not item:
                raise RequestError(f"{name}: item {index} is an empty string")
        return value


def read_json_body() -> Any:
    """The request's JSON value (``RequestError`` for an empty or malformed body)."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise RequestError("request body is empty: send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"malformed JSON body: {str(error).splitlines()[0]}") from None


def parse_api_request(body: Any, max_batch: int = MAX_PROMPTS) -> TextRequest:
    """The :class:`TextRequest` of a ``PUT /api`` body (Megatron's fields), or ``RequestError``."""
    fields = _Fields(body, API_FIELDS, null_is_absent=False)
    prompts = fields.string_list("prompts", max_batch, single_allowed=False, required=True)
    tokens_to_generate = fields.integer("tokens_to_generate", 64, 0)
    logprobs = fields.boolean("logprobs", False)
    if tokens_to_generate == 0 and not logprobs:
        raise RequestError("tokens_to_generate: 0 only makes sense with logprobs true (score the prompts)")
    temperature = fields.number("temperature", 1.0, 0.0, MAX_TEMPERATURE, exclusive_minimum=True)
    top_k = fields.integer("top_k", 0, 0, MAX_TOP_K)
    top_p = fields.number("top_p", 0.0, 0.0, 1.0)
    if top_k > 0 and top_p > 0.0:
        raise RequestError("top_k, top_p: cannot both be set (use top_k > 0 or top_p > 0, not both)")
    return TextRequest(
        prompts=prompts, tokens_to_generate=tokens_to_generate,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), return_log_probs=logprobs,
        add_BOS=fields.boolean("add_BOS", False), stop_on_eol=fields.boolean("stop_on_eol", False),
        stop_on_double_eol=fields.boolean("stop_on_double_eol", False),
        prevent_newline_after_colon=fields.boolean("prevent_newline_after_colon", False),
        random_seed=fields.integer("random_seed", None, 0, MAX_SEED),
    )


def _require_neutral(fields: _Fields, name: str, neutral: Any, what: str) -> None:
    """OpenAI options this server does not implement are accepted only at their no-op value."""
    value = fields.get(name)
    if value is _ABSENT or (value == neutral and not isinstance(value, bool)):
        return
    raise RequestError(f"{name}: {what} is not supported; leave it out or send {json.dumps(neutral)}, got "
                       f"{_shown(value)}")


def parse_completion_request(body: Any, max_batch: int = MAX_PROMPTS) -> tuple[TextRequest, dict[str, Any]]:
    """The :class:`TextRequest` of a ``POST /v1/completions`` body and the response options (``echo``,
    ``logprobs``, ``stream``, ``model``), or ``RequestError``."""
    fields = _Fields(body, COMPLETION_FIELDS, null_is_absent=True)
    prompts = fields.string_list("prompt", max_batch, single_allowed=True, required=True)
    max_tokens = fields.integer("max_tokens", 16, 0)
    temperature = fields.number("temperature", 1.0, 0.0, MAX_TEMPERATURE)
    top_p = fields.number("top_p", 1.0, 0.0, 1.0)
    top_k = fields.integer("top_k", 0, 0, MAX_TOP_K)
    if temperature == 0.0:
        sampling = SamplingParams(top_k=1)  # OpenAI's temperature 0: always the most likely token
    else:
        top_p = 0.0 if top_p == 1.0 else top_p  # 1 keeps every token: no filtering
        if top_k > 0 and top_p > 0.0:
            raise RequestError("top_k, top_p: cannot both filter (use top_k > 0 or top_p < 1, not both)")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    logprobs = fields.integer("logprobs", None, 0, MAX_LOGPROBS)
    stop = fields.string_list("stop", MAX_STOP_STRINGS, single_allowed=True, required=False,
                              allow_empty_strings=False) or []
    n = fields.integer("n", 1, 1)
    if n != 1:
        raise RequestError(f"n: only 1 completion per prompt is supported, got {_shown(n)}")
    best_of = fields.integer("best_of", 1, 1)
    if best_of != 1:
        raise RequestError(f"best_of: only 1 is supported, got {_shown(best_of)}")
    fields.string("user", None)  # accepted (OpenAI clients send it) and ignored: there are no per-user limits
    _require_neutral(fields, "presence_penalty", 0, "a presence penalty")
    _require_neutral(fields, "frequency_penalty", 0, "a frequency penalty")
    _require_neutral(fields, "logit_bias", {}, "logit_bias")
    _require_neutral(fields, "suffix", "", "suffix (insertion)")
    text_request = TextRequest(prompts=prompts, tokens_to_generate=max_tokens, sampling=sampling,
                               return_log_probs=logprobs is not None, stop=stop,
                               random_seed=fields.integer("seed", None, 0, MAX_SEED))
    options = {"echo": fields.boolean("echo", False), "logprobs": logprobs,
               "stream": fields.boolean("stream", False), "model": fields.string("model", None)}
    return text_request, options


def check_engine_limits(generator: TextGenerator, text_request: TextRequest, max_prompt_chars: int,
                        prompt_field: str = "prompts", budget_field: str = "tokens_to_generate") -> None:
    """Refuse what the engine would refuse (``RequestError`` naming ``prompt_field`` / ``budget_field``), without
    running the model: untokenizable, empty or too long prompts, ``add_BOS`` without a BOS token. Rank 0 checks
    this before any other rank sees the request, so that every rank either runs it or none does."""
    limit = generator.max_sequence_length
    if text_request.tokens_to_generate > limit:
        raise RequestError(f"{budget_field}: {text_request.tokens_to_generate} exceeds the model's maximum sequence "
                           f"length {limit}")
    if text_request.add_BOS and getattr(generator.tokenizer, "bos", None) is None:
        raise RequestError("add_BOS: the tokenizer has no BOS token")
    lengths = []
    for index, prompt in enumerate(text_request.prompts):
        if len(prompt) > max_prompt_chars:
            raise RequestError(f"{prompt_field}: prompt {index} has {len(prompt)} characters, more than this server "
                               f"accepts ({max_prompt_chars})")
        try:
            lengths.append(len(generator.tokenize([prompt], text_request.add_BOS)[0]))
        except ValueError as error:
            raise RequestError(f"{prompt_field}: prompt {index} cannot be tokenized: {_one_line(error)}") from None
    try:
        check_lengths(lengths, [text_request.tokens_to_generate] * len(lengths), limit)
    except ValueError as error:
        raise RequestError(f"{prompt_field}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------------------------------- responses

def api_response(result: TextResult, text_request: TextRequest) -> dict[str, Any]:
    """Megatron's ``PUT /api`` answer."""
    response: dict[str, Any] = {"text": result.text, "segments": result.segments, "tokens": result.tokens}
    if text_request.return_log_probs:
        response["logprobs"] = result.logprobs
    return response


def completion_choices(result: TextResult, echo: bool, logprobs: int | None) -> list[dict[str, Any]]:
    """OpenAI ``choices`` for each prompt: the generated text (after the prompt's text with ``echo``), ``stop`` or
    ``length``, and with ``logprobs`` the shown tokens, their log-probs (the first prompt token has none) and their
    character offsets from the start of the prompt. The end-of-document token is not shown, and tokens past a stop
    string are dropped with it."""
    choices = []
    for index, tokens in enumerate(result.tokens):
        prompt_count = result.prompt_tokens[index]
        segments = result.segments[index]
        completion = result.completions[index]
        prompt_text = result.text[index][: len(result.text[index]) - len(completion)]
        reason = result.finish_reasons[index]
        shown_end = len(tokens)
        if reason == "eod" and shown_end > prompt_count:
            shown_end -= 1
            eod_text = segments[-1]
            if eod_text and completion.endswith(eod_text):
                completion = completion[: -len(eod_text)]
        choice: dict[str, Any] = {"text": (prompt_text if echo else "") + completion, "index": index,
                                  "logprobs": None, "finish_reason": "length" if reason == "length" else "stop"}
        if logprobs is not None:
            values = [None, *result.logprobs[index]]
            shown, token_logprobs, offsets = [], [], []
            if echo:
                offset = 0
                for position in range(prompt_count):
                    shown.append(segments[position])
                    token_logprobs.append(values[position])
                    offsets.append(offset)
                    offset += len(segments[position])
            offset = len(prompt_text)
            for position in range(prompt_count, shown_end):
                if offset - len(prompt_text) >= len(completion) and reason == "stop":
                    break  # this token starts at or after the stop string
                shown.append(segments[position])
                token_logprobs.append(values[position])
                offsets.append(offset)
                offset += len(segments[position])
            choice["logprobs"] = {"tokens": shown, "token_logprobs": token_logprobs, "top_logprobs": None,
                                  "text_offset": offsets}
        choices.append(choice)
    return choices


def _usage(result: TextResult) -> dict[str, int]:
    prompt = sum(result.prompt_tokens)
    completion = sum(len(tokens) - count for tokens, count in zip(result.tokens, result.prompt_tokens, strict=True))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


# ---------------------------------------------------------------------------------------------------------- app

def create_app(generator: TextGenerator, max_batch: int = MAX_PROMPTS, max_prompt_chars: int | None = None,
               serve_lock: TicketLock | None = None, run: Callable[[TextRequest], TextResult] | None = None,
               model_name: str = "megatron-hybrid", info: dict[str, Any] | None = None) -> Flask:
    """The Flask app serving ``generator``.

    ``max_batch``: most prompts per request (Megatron: 128). ``max_prompt_chars``: longest prompt in characters,
    checked before tokenizing (default 64 characters per position of the model). ``serve_lock``: the FIFO lock the
    model runs under (share one between apps that share a model). ``run``: what runs a validated request (default
    ``generator.generate``; :class:`BroadcastRunner` with tensor parallelism). ``model_name``: the default ``model``
    of completions. ``info``: extra fields for ``GET /health``.
    """
    if not 1 <= max_batch <= MAX_PROMPTS:
        raise ValueError(f"max_batch must be in [1, {MAX_PROMPTS}], got {max_batch}")
    max_prompt_chars = max_prompt_chars or 64 * generator.max_sequence_length
    lock = serve_lock if serve_lock is not None else TicketLock()
    run = run if run is not None else generator.generate
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    health = {"status": "ok", "model": model_name, "max_sequence_length": generator.max_sequence_length,
              "max_prompts": max_batch, "speculative": generator.draft_model is not None, **(info or {})}

    def execute(text_request: TextRequest, *fields: str) -> TextResult:
        check_engine_limits(generator, text_request, max_prompt_chars, *fields)
        with lock:
            return run(text_request)

    def guarded(handler: Callable[[], Response]) -> Response:
        try:
            return handler()
        except RequestError as error:
            return _error(str(error), 400)
        except ServerClosedError as error:
            return _error(str(error), 503)
        except ValueError as error:  # the engine refused the request after all
            return _error(_one_line(error), 400)
        except Exception as error:  # the server must survive anything a request triggers
            traceback.print_exc(file=sys.stderr)
            return _error(f"internal error: {type(error).__name__}: {_one_line(error)}", 500)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return _error(f"{error.name}: {error.description}", error.code or 500)

    @app.get("/health")
    def health_check() -> Response:
        return _json(health)

    @app.put("/api")
    def api() -> Response:
        def handle() -> Response:
            text_request = parse_api_request(read_json_body(), max_batch)
            return _json(api_response(execute(text_request), text_request))

        return guarded(handle)

    @app.post("/v1/completions")
    def completions() -> Response:
        def handle() -> Response:
            text_request, options = parse_completion_request(read_json_body(), max_batch)
            result = execute(text_request, "prompt", "max_tokens")
            head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": options["model"] if options["model"] is not None else model_name}
            choices = completion_choices(result, options["echo"], options["logprobs"])
            if options["stream"]:
                return Response(_event_stream(head, choices), mimetype="text/event-stream",
                                headers={"Cache-Control": "no-cache"})
            return _json({**head, "choices": choices, "usage": _usage(result)})

        return guarded(handle)

    return app


def _event_stream(head: dict[str, Any], choices: list[dict[str, Any]]) -> Iterator[str]:
    """Server-sent events: one chunk per choice (the batch is generated whole), then ``[DONE]``."""
    for choice in choices:
        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------ tensor parallelism

GENERATE, SHUTDOWN = "generate", "shutdown"


class BroadcastRunner:
    """Rank 0's ``run`` with several ranks: send the request to every rank, then run it here too. An unseeded
    request gets a fresh random seed first, so that every rank draws the same random numbers."""

    def __init__(self, generator: TextGenerator) -> None:
        self.generator = generator
        self.closed = False

    def __call__(self, text_request: TextRequest) -> TextResult:
        if self.closed:
            raise ServerClosedError("the server is shutting down")
        if text_request.random_seed is None:
            text_request = replace(text_request, random_seed=secrets.randbits(63))
        dist.broadcast_object_list([(GENERATE, text_request)], src=0)
        return self.generator.generate(text_request)

    def shutdown(self) -> None:
        """Tell the other ranks to leave :func:`run_follower` (call it holding the serve lock)."""
        if not self.closed:
            self.closed = True
            dist.broadcast_object_list([(SHUTDOWN, None)], src=0)


def run_follower(generator: TextGenerator) -> int:
    """The loop of every rank but 0: run each request rank 0 broadcasts until the shutdown message; returns the
    number of requests run."""
    served = 0
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0)
        kind, payload = message[0]
        if kind == SHUTDOWN:
            return served
        try:
            generator.generate(payload)
        except Exception as error:  # rank 0 met the same error and answered it; keep serving
            print(f"rank {dist.get_rank()}: request failed: {_one_line(error)}", file=sys.stderr, flush=True)
        served += 1


def serve(app: Flask, host: str, port: int, announce: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` on ``host:port`` (port 0: any free port) with one thread per request, until
    ``KeyboardInterrupt``. ``announce`` receives the base URL once the socket is listening. ``OSError`` (one line)
    when the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family)
    except (OSError, UnicodeError) as error:  # in use, no such address, an unencodable host name
        reason = getattr(error, "strerror", None) or _one_line(error)
        raise OSError(f"cannot listen on {host}:{port}: {reason}") from None
    try:  # werkzeug would print and sys.exit() on a bind error; give it the bound socket instead
        server = make_server(host, port, app, threaded=True, fd=listener.fileno())
    finally:
        listener.close()
    shown_host = f"[{host}]" if ":" in host else host
    if announce is not None:
        announce(f"http://{shown_host}:{server.socket.getsockname()[1]}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

"""The text generation server in-process (Flask test client, a tiny float64 hybrid, the character tokenizer).

Oracle: ``TextGenerator.generate`` called directly with the request the fields describe. Every accepted field must
change the answer the way the engine does (and differ from the answer without it); every invalid request must be
HTTP 400 naming the field; concurrent requests on a real threaded server must get the sequential answers.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import replace

import pytest
import requests
from werkzeug.serving import make_server

from megatron.core.inference.sampling import SamplingParams
from megatron.core.inference.text_generation import TextGenerator, TextRequest
from megatron.inference.text_generation_server import TicketLock, create_app

from .helpers import CharTokenizer, generation_model

MAX_LENGTH = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def generator() -> TextGenerator:
    return TextGenerator(generation_model(), CharTokenizer(), MAX_LENGTH)


@pytest.fixture(scope="module")
def client(generator):
    return create_app(generator).test_client()


def put(client, **fields):
    response = client.put("/api", json=fields)
    return response.status_code, response.get_json()


def engine(generator, prompts, **kwargs):
    return generator.generate(TextRequest(prompts=prompts, **kwargs))


# ------------------------------------------------------------------------------------------------------ PUT /api

def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok" and response.get_json()["max_sequence_length"] == MAX_LENGTH


def test_api_greedy_equals_the_engine(client, generator):
    prompts = ["abc", "the cat sat"]
    status, body = put(client, prompts=prompts, tokens_to_generate=10, top_k=1)
    assert status == 200
    expected = engine(generator, prompts, tokens_to_generate=10, sampling=SamplingParams(top_k=1))
    assert body == {"text": expected.text, "segments": expected.segments, "tokens": expected.tokens}
    assert [len(tokens) for tokens in body["tokens"]] == [13, 21]  # no eod within 10 tokens for these prompts


def test_api_logprobs(client, generator):
    status, body = put(client, prompts=["abc", "go."], tokens_to_generate=6, top_k=1, logprobs=True)
    assert status == 200
    expected = engine(generator, ["abc", "go."], tokens_to_generate=6, sampling=SamplingParams(top_k=1),
                      return_log_probs=True)
    assert body["logprobs"] == expected.logprobs
    assert [len(lp) for lp in body["logprobs"]] == [len(tokens) - 1 for tokens in body["tokens"]]
    assert all(value <= 0.0 for row in body["logprobs"] for value in row)


def test_api_scoring_with_zero_tokens(client, generator):
    status, body = put(client, prompts=["hello world"], tokens_to_generate=0, logprobs=True)
    assert status == 200
    assert body["tokens"] == [CharTokenizer().tokenize("hello world")] and body["text"] == ["hello world"]
    assert len(body["logprobs"][0]) == len("hello world") - 1


def test_api_add_bos(client, generator):
    status, body = put(client, prompts=["abc", ""], tokens_to_generate=4, top_k=1, add_BOS=True)
    assert status == 200
    bos = CharTokenizer().bos
    assert [tokens[0] for tokens in body["tokens"]] == [bos, bos]
    expected = engine(generator, ["abc", ""], tokens_to_generate=4, sampling=SamplingParams(top_k=1), add_BOS=True)
    assert body["tokens"] == expected.tokens


# Each row: request fields, the TextRequest the engine must see, and the field whose removal must change the answer.
HONOURED = {
    "temperature": ({"prompts": ["hello"], "tokens_to_generate": 12, "temperature": 0.3, "random_seed": 4},
                    dict(sampling=SamplingParams(temperature=0.3), random_seed=4), "temperature"),
    "top_k": ({"prompts": ["hello"], "tokens_to_generate": 12, "top_k": 3, "random_seed": 4},
              dict(sampling=SamplingParams(top_k=3), random_seed=4), "top_k"),
    "top_p": ({"prompts": ["hello"], "tokens_to_generate": 12, "top_p": 0.3, "random_seed": 4},
              dict(sampling=SamplingParams(top_p=0.3), random_seed=4), "top_p"),
    "random_seed": ({"prompts": ["hello"], "tokens_to_generate": 12, "temperature": 2.0, "random_seed": 8},
                    dict(sampling=SamplingParams(temperature=2.0), random_seed=8), "random_seed"),
    "stop_on_eol": ({"prompts": ["hello"], "tokens_to_generate": 30, "temperature": 2.0, "random_seed": 39,
                     "stop_on_eol": True},
                    dict(sampling=SamplingParams(temperature=2.0), random_seed=39, stop_on_eol=True), "stop_on_eol"),
    "stop_on_double_eol": ({"prompts": ["hello"], "tokens_to_generate": 30, "temperature": 2.0, "random_seed": 39,
                            "stop_on_double_eol": True},
                           dict(sampling=SamplingParams(temperature=2.0), random_seed=39, stop_on_double_eol=True),
                           "stop_on_double_eol"),
    "prevent_newline_after_colon": ({"prompts": ["pn:"], "tokens_to_generate": 8, "top_k": 1,
                                     "prevent_newline_after_colon": True},
                                    dict(sampling=SamplingParams(top_k=1), prevent_newline_after_colon=True),
                                    "prevent_newline_after_colon"),
    "add_BOS": ({"prompts": ["abc"], "tokens_to_generate": 6, "top_k": 1, "add_BOS": True},
                dict(sampling=SamplingParams(top_k=1), add_BOS=True), "add_BOS"),
    "tokens_to_generate": ({"prompts": ["abc"], "tokens_to_generate": 3, "top_k": 1},
                           dict(tokens_to_generate=3, sampling=SamplingParams(top_k=1)), "tokens_to_generate"),
}


@pytest.mark.parametrize("name", list(HONOURED))
def test_every_field_is_honoured(client, generator, name):
    fields, engine_kwargs, removed = HONOURED[name]
    status, body = put(client, **fields)
    assert status == 200, body
    engine_kwargs = {"tokens_to_generate": fields["tokens_to_generate"], **engine_kwargs}
    expected = engine(generator, fields["prompts"], **engine_kwargs)
    assert body == {"text": expected.text, "segments": expected.segments, "tokens": expected.tokens}
    without = {key: value for key, value in fields.items() if key != removed}
    status, other = put(client, **without)
    assert status == 200 and other["tokens"] != body["tokens"], f"{removed} made no difference"


def test_text_stop_conditions(client):
    _, plain = put(client, prompts=["hello"], tokens_to_generate=30, temperature=2.0, random_seed=39)
    generated = plain["text"][0][len("hello"):]
    assert "\n\n" in generated
    _, eol = put(client, prompts=["hello"], tokens_to_generate=30, temperature=2.0, random_seed=39, stop_on_eol=True)
    assert eol["text"][0] == "hello" + generated[: generated.index("\n") + 1]
    _, double = put(client, prompts=["hello"], tokens_to_generate=30, temperature=2.0, random_seed=39,
                    stop_on_double_eol=True)
    assert double["text"][0] == "hello" + generated[: generated.index("\n\n") + 2]
    _, colon = put(client, prompts=["pn:"], tokens_to_generate=8, top_k=1, prevent_newline_after_colon=True)
    segments = colon["segments"][0]
    assert len(segments) > 4 and not any(a.endswith(":") and "\n" in b for a, b in itertools.pairwise(segments))
    _, free = put(client, prompts=["pn:"], tokens_to_generate=8, top_k=1)
    assert free["segments"][0][3] == "\n"  # without the flag the model does put a newline after the colon


def test_random_seed_reproduces_sampling(client):
    fields = {"prompts": ["hello", "abc"], "tokens_to_generate": 12, "temperature": 1.5}
    first = put(client, **fields, random_seed=1)[1]
    assert put(client, **fields, random_seed=1)[1] == first
    assert put(client, **fields, random_seed=2)[1] != first


def test_max_batch_setting(generator):
    client = create_app(generator, max_batch=2).test_client()
    assert put(client, prompts=["a", "b"], tokens_to_generate=1)[0] == 200
    status, body = put(client, prompts=["a", "b", "c"], tokens_to_generate=1)
    assert status == 400 and body["error"].startswith("prompts:")


def test_add_bos_without_a_bos_token(generator):
    class NoBos(CharTokenizer):
        def __init__(self) -> None:
            super().__init__()
            self.bos = None

    app = create_app(TextGenerator(generator.model, NoBos(), MAX_LENGTH))
    status, body = put(app.test_client(), prompts=["abc"], add_BOS=True)
    assert status == 400 and body["error"].startswith("add_BOS:")


# ------------------------------------------------------------------------------------------- POST /v1/completions

def complete(client, **fields):
    response = client.post("/v1/completions", json=fields)
    return response.status_code, response.get_json()


def test_completion_greedy_string_prompt(client, generator):
    status, body = complete(client, prompt="abc", max_tokens=8, temperature=0, model="tiny")
    assert status == 200
    expected = engine(generator, ["abc"], tokens_to_generate=8, sampling=SamplingParams(top_k=1))
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"text": expected.completions[0], "index": 0, "logprobs": None,
                                "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}


def test_completion_list_prompt_echo_and_eod(client, generator):
    status, body = complete(client, prompt=["abc", "hello world"], max_tokens=8, temperature=0, echo=True)
    assert status == 200
    expected = engine(generator, ["abc", "hello world"], tokens_to_generate=8, sampling=SamplingParams(top_k=1))
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert [choice["text"] for choice in body["choices"]] == expected.text
    assert expected.finish_reasons == ["length", "eod"]
    assert [choice["finish_reason"] for choice in body["choices"]] == ["length", "stop"]  # eod is a stop
    generated = sum(len(tokens) - count for tokens, count in zip(expected.tokens, expected.prompt_tokens,
                                                                 strict=True))
    assert body["usage"] == {"prompt_tokens": 14, "completion_tokens": generated, "total_tokens": 14 + generated}


def test_completion_default_max_tokens_is_16(client):
    status, body = complete(client, prompt="abc", temperature=0)
    assert status == 200 and body["usage"]["completion_tokens"] == 16


def test_completion_stop_strings(client):
    _, plain = complete(client, prompt="abc", max_tokens=20, temperature=0)
    text = plain["choices"][0]["text"]
    stop = text[3:5]
    _, stopped = complete(client, prompt="abc", max_tokens=20, temperature=0, stop=["zzz", stop])
    assert stopped["choices"][0]["text"] == text[: text.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    _, single = complete(client, prompt="abc", max_tokens=20, temperature=0, stop=stop)
    assert single["choices"] == stopped["choices"]


def test_completion_logprobs(client, generator):
    status, body = complete(client, prompt="abc", max_tokens=5, temperature=0, logprobs=1)
    assert status == 200
    expected = engine(generator, ["abc"], tokens_to_generate=5, sampling=SamplingParams(top_k=1),
                      return_log_probs=True)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == expected.segments[0][3:]
    assert logprobs["token_logprobs"] == expected.logprobs[0][2:]
    assert logprobs["text_offset"] == [3, 4, 5, 6, 7] and logprobs["top_logprobs"] is None
    status, echoed = complete(client, prompt="abc", max_tokens=5, temperature=0, logprobs=0, echo=True)
    logprobs = echoed["choices"][0]["logprobs"]
    assert logprobs["tokens"] == expected.segments[0]
    assert logprobs["token_logprobs"] == [None, *expected.logprobs[0]]
    assert logprobs["text_offset"] == list(range(8))
    # Scoring a prompt: echo with no new tokens.
    status, scored = complete(client, prompt="abc", max_tokens=0, logprobs=0, echo=True)
    assert scored["choices"][0]["text"] == "abc" and scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == [None, *expected.logprobs[0][:2]]


def test_completion_sampling_fields(client, generator):
    fields = {"prompt": "hello", "max_tokens": 10, "temperature": 0.7, "top_p": 0.5, "seed": 5}
    status, body = complete(client, **fields)
    expected = engine(generator, ["hello"], tokens_to_generate=10, sampling=SamplingParams(temperature=0.7, top_p=0.5),
                      random_seed=5)
    assert status == 200 and body["choices"][0]["text"] == expected.completions[0]
    assert complete(client, **fields)[1]["choices"] == body["choices"]
    status, top_k = complete(client, prompt="hello", max_tokens=10, top_k=2, seed=5, top_p=1.0)
    expected = engine(generator, ["hello"], tokens_to_generate=10, sampling=SamplingParams(top_k=2), random_seed=5)
    assert status == 200 and top_k["choices"][0]["text"] == expected.completions[0]
    # Neutral values of the OpenAI options this server does not implement are accepted.
    status, _ = complete(client, prompt="a", max_tokens=1, n=1, best_of=1, user="me", presence_penalty=0,
                         frequency_penalty=0.0, logit_bias={}, suffix=None, stream=False, logprobs=None)
    assert status == 200


def test_completion_stream(client):
    fields = {"prompt": ["abc", "go."], "max_tokens": 6, "temperature": 0}
    _, plain = complete(client, **fields)
    response = client.post("/v1/completions", json={**fields, "stream": True})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = [block for block in response.get_data(as_text=True).split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    assert choices == plain["choices"]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}


# --------------------------------------------------------------------------------------------- invalid requests

TOO_LONG = "ab" * 60  # 120 tokens + 64 to generate > 128
INVALID = [
    ("/api", {}, "prompts"),
    ("/api", {"prompts": "hello"}, "prompts"),
    ("/api", {"prompts": []}, "prompts"),
    ("/api", {"prompts": ["a"] * 129}, "prompts"),
    ("/api", {"prompts": [1]}, "prompts"),
    ("/api", {"prompts": None}, "prompts"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": True}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": 1.5}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": 0}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": 10**6}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "temperature": 0}, "temperature"),
    ("/api", {"prompts": ["a"], "temperature": 101}, "temperature"),
    ("/api", {"prompts": ["a"], "temperature": "x"}, "temperature"),
    ("/api", '{"prompts": ["a"], "temperature": NaN}', "temperature"),
    ("/api", {"prompts": ["a"], "top_k": -1}, "top_k"),
    ("/api", {"prompts": ["a"], "top_k": 1001}, "top_k"),
    ("/api", {"prompts": ["a"], "top_p": 1.5}, "top_p"),
    ("/api", {"prompts": ["a"], "top_k": 5, "top_p": 0.5}, "top_k"),
    ("/api", {"prompts": ["a"], "random_seed": -1}, "random_seed"),
    ("/api", {"prompts": ["a"], "random_seed": 2**64}, "random_seed"),
    ("/api", {"prompts": ["a"], "logprobs": "yes"}, "logprobs"),
    ("/api", {"prompts": ["a"], "add_BOS": 1}, "add_BOS"),
    ("/api", {"prompts": ["a"], "stop_on_eol": "true"}, "stop_on_eol"),
    ("/api", {"prompts": ["a"], "stop_on_double_eol": None}, "stop_on_double_eol"),
    ("/api", {"prompts": ["a"], "prevent_newline_after_colon": 0}, "prevent_newline_after_colon"),
    ("/api", {"prompts": ["a"], "beam_width": 2}, "beam_width"),
    ("/api", '{"prompts": [', "JSON"),
    ("/api", "[1, 2]", "JSON object"),
    ("/api", "", "empty"),
    ("/api", {"prompts": [TOO_LONG]}, "prompts"),
    ("/api", {"prompts": ["HELLO"]}, "prompts"),
    ("/api", {"prompts": [""]}, "prompts"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1000}, "max_tokens"),
    ("/v1/completions", {"prompt": TOO_LONG, "max_tokens": 20}, "prompt"),
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_k": 5, "top_p": 0.5}, "top_k"),
    ("/v1/completions", {"prompt": "a", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "a", "stream": 1}, "stream"),
    ("/v1/completions", {"prompt": "a", "seed": "1"}, "seed"),
    ("/v1/completions", {"prompt": "a", "model": 5}, "model"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "suffix": "x"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "foo": 1}, "foo"),
]


@pytest.mark.parametrize(("path", "body", "field"), INVALID,
                         ids=[f"{path}-{index}-{field}" for index, (path, _, field) in enumerate(INVALID)])
def test_invalid_requests_are_400_naming_the_field(client, path, body, field):
    method = client.put if path == "/api" else client.post
    if isinstance(body, str):
        response = method(path, data=body, content_type="application/json")
    else:
        response = method(path, json=body)
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert field in error and "\n" not in error


def test_server_still_answers_after_bad_requests(client):
    assert put(client, prompts=["abc"], tokens_to_generate=2, top_k=1)[0] == 200
    assert complete(client, prompt="abc", max_tokens=2)[0] == 200


def test_other_methods_and_paths_get_json_errors(client):
    for response, status in ((client.post("/api", json={}), 405), (client.get("/nowhere"), 404)):
        assert response.status_code == status and "error" in response.get_json()


def test_unexpected_failure_is_500_and_the_server_survives(generator):
    calls = []

    def flaky(text_request):
        calls.append(text_request)
        if len(calls) == 1:
            raise RuntimeError("boom\nsecond line")
        return generator.generate(text_request)

    client = create_app(generator, run=flaky).test_client()
    status, body = put(client, prompts=["abc"], tokens_to_generate=2, top_k=1)
    assert status == 500 and body["error"] == "internal error: RuntimeError: boom"
    assert put(client, prompts=["abc"], tokens_to_generate=2, top_k=1)[0] == 200


# ------------------------------------------------------------------------------------------ order and concurrency

def test_ticket_lock_serves_in_arrival_order():
    lock = TicketLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for index in range(5):
        thread = threading.Thread(target=lambda i=index: (lock.acquire(), order.append(i), lock.release()))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while lock.waiting < index + 2 and time.monotonic() < deadline:  # this thread holds its ticket
            time.sleep(0.001)
    lock.release()
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3, 4]


def test_requests_run_one_at_a_time(generator):
    active, peak, seen = [0], [0], []
    guard = threading.Lock()

    def run(text_request):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        seen.append(text_request.prompts[0])
        result = generator.generate(replace(text_request, tokens_to_generate=1))
        with guard:
            active[0] -= 1
        return result

    app = create_app(generator, run=run)
    threads = [threading.Thread(target=lambda p=prompt: app.test_client().put("/api", json={"prompts": [p]}))
               for prompt in ("a", "b", "c", "d")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert peak[0] == 1 and sorted(seen) == ["a", "b", "c", "d"]


def test_concurrent_clients_get_the_sequential_answers(generator):
    app = create_app(generator)
    prompts = [["abc"], ["hello world"], ["the cat", "sat"], ["go."]]
    sequential = {tuple(p): put(app.test_client(), prompts=p, tokens_to_generate=6, top_k=1)[1] for p in prompts}
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/api"
    answers: list[tuple[tuple[str, ...], dict]] = []
    failures: list[BaseException] = []

    def client_thread(prompt: list[str]) -> None:
        try:
            with requests.Session() as session:
                for _ in range(3):
                    response = session.put(url, json={"prompts": prompt, "tokens_to_generate": 6, "top_k": 1},
                                           timeout=60)
                    answers.append((tuple(prompt), response.json()))
        except BaseException as error:  # reported below
            failures.append(error)

    try:
        threads = [threading.Thread(target=client_thread, args=(prompt,)) for prompt in prompts]
        for client_threads in threads:
            client_threads.start()
        for client_threads in threads:
            client_threads.join(120)
    finally:
        server.shutdown()
        server.server_close()
    assert not failures
    assert len(answers) == 12
    for prompt, answer in answers:
        assert answer == sequential[prompt]

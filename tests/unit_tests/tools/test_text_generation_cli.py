"""tools/text_generation_cli.py as a real subprocess against a real threaded server (in this process).

The server runs a tiny character-level hybrid with every request made greedy, so the text the CLI must print is
known: the engine's answer for the same prompt and count.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from werkzeug.serving import make_server

from megatron.core.inference.sampling import GREEDY
from megatron.core.inference.text_generation import TextGenerator, TextRequest
from megatron.inference.text_generation_server import create_app

from ..inference.helpers import CharTokenizer, generation_model

REPO = Path(__file__).resolve().parents[3]
CLI = REPO / "tools" / "text_generation_cli.py"


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = TextGenerator(generation_model(), CharTokenizer(), 128)
    app = create_app(generator, run=lambda request: generator.generate(replace(request, sampling=GREEDY)))
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield generator, f"127.0.0.1:{http.server_port}"
    http.shutdown()
    http.server_close()
    torch.set_num_threads(threads)


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_prompt_loop_prints_text_and_server_errors(server):
    generator, address = server
    expected = generator.generate(TextRequest(["hello wor"], tokens_to_generate=5, sampling=GREEDY)).text[0]
    result = run_cli(address, stdin="hello wor\n5\nabc\n-1\nabc\nfive\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "Enter prompt: " in result.stdout and "Enter number of tokens to generate: " in result.stdout
    response = next(index for index, line in enumerate(lines) if line.endswith("Megatron Response: "))
    assert lines[response + 1] == expected and expected.startswith("hello wor")
    assert "error: tokens_to_generate: must be an integer >= 0, got -1" in result.stdout  # the server's message
    assert "error: the number of tokens must be an integer, got 'five'" in result.stdout  # checked locally


def test_unknown_characters_are_the_servers_error(server):
    _, address = server
    result = run_cli(f"http://{address}/", stdin="HELLO\n3\n")
    assert result.returncode == 0
    assert "error: prompts: prompt 0 cannot be tokenized" in result.stdout


def test_unreachable_server_is_reported_and_the_loop_goes_on():
    result = run_cli("127.0.0.1:9", stdin="abc\n2\nabc\n2\n")  # port 9 (discard) is closed here
    assert result.returncode == 0
    assert result.stdout.count("error: cannot reach http://127.0.0.1:9/api") == 2


@pytest.mark.parametrize("address", ["localhost", "localhost:", ":5000", "host:port", "host:70000", "::1:5000",
                                     "http://host:5000/api"])
def test_bad_address_is_a_usage_error(address):
    result = run_cli(address)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: text_generation_cli.py HOST:PORT") and len(result.stderr.splitlines()) == 1


def test_no_argument_is_a_usage_error():
    result = run_cli()
    assert result.returncode == 2 and result.stderr.startswith("usage:")

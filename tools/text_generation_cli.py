"""Interactive client of the text generation server (Megatron's ``tools/text_generation_cli.py``).

    python tools/text_generation_cli.py localhost:5000

Asks for a prompt and a number of tokens, sends ``PUT /api`` and prints the generated text (prompt included), until
end of input (Ctrl-D) or Ctrl-C. A request the server refuses prints ``error: <the server's message>`` and the loop
goes on. A bad ``HOST:PORT`` prints a usage line and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

USAGE = "usage: text_generation_cli.py HOST:PORT (e.g. localhost:5000 or http://127.0.0.1:5000)"
TIMEOUT_SECONDS = 600.0


def parse_address(text: str) -> str:
    """The ``http://host:port`` base URL of ``HOST:PORT`` (an ``http://`` prefix and ``[v6]`` hosts are accepted);
    ``ValueError`` otherwise."""
    address = text.strip()
    if address.startswith("http://"):
        address = address[len("http://"):]
    address = address.rstrip("/")
    host, separator, port = address.rpartition(":")
    if not separator or not host or "/" in address or " " in address:
        raise ValueError(f"bad address {text!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"bad host in {text!r} (write IPv6 addresses as [::1]:5000)")
    return f"http://{host}:{int(port)}"


def _server_error(response: object) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text.strip()[:200]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the prompt loop; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv in (["-h"], ["--help"]) else 2
    try:
        url = parse_address(argv[0]) + "/api"
    except ValueError as error:
        print(f"{USAGE}: {error}", file=sys.stderr)
        return 2
    import requests

    session = requests.Session()
    try:
        while True:
            prompt = input("Enter prompt: ")
            count = input("Enter number of tokens to generate: ").strip()
            try:
                tokens_to_generate = int(count)
            except ValueError:
                print(f"error: the number of tokens must be an integer, got {count!r}", flush=True)
                continue
            body = {"prompts": [prompt], "tokens_to_generate": tokens_to_generate}
            try:
                response = session.put(url, data=json.dumps(body), headers={"Content-Type": "application/json"},
                                       timeout=TIMEOUT_SECONDS)
            except requests.RequestException as error:
                print(f"error: cannot reach {url}: {type(error).__name__}", flush=True)
                continue
            if response.status_code != 200:
                print(f"error: {_server_error(response)}", flush=True)
                continue
            print("Megatron Response: ")
            print(response.json()["text"][0], flush=True)
    except (EOFError, KeyboardInterrupt):
        print()
        return 0


if __name__ == "__main__":
    sys.exit(main())

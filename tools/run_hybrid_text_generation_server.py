"""Serve a hybrid Mamba / attention / MLP checkpoint over HTTP (Megatron's text generation server).

    python tools/run_hybrid_text_generation_server.py --load checkpoints/tiny --use-checkpoint-args [--port 5000]
    torchrun --nproc-per-node 2 tools/run_hybrid_text_generation_server.py --load DIR --use-checkpoint-args \\
        --tensor-model-parallel-size 2

The model flags are ``pretrain_hybrid.py``'s (or ``--use-checkpoint-args`` takes them from the checkpoint), plus
``--port`` (default 5000, 0 = any free port), ``--host`` (default 127.0.0.1), ``--draft-load DIR`` with
``--num-speculative-tokens N`` (speculative decoding with a smaller model of the same tokenizer), ``--max-batch-size``
(prompts per request, at most 128) and ``--model-name``. Endpoints: ``PUT /api`` (Megatron's fields),
``POST /v1/completions`` (OpenAI style) and ``GET /health``; ``tools/text_generation_cli.py HOST:PORT`` is a client.

With tensor parallelism (torchrun, one process per rank) global rank 0 serves HTTP and the other ranks follow it;
Ctrl-C or SIGTERM on rank 0 stops them all. A user mistake (bad flag, missing or incompatible checkpoint) prints
``error: <one line>`` and exits with status 2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import contextlib
import signal
from collections.abc import Sequence

PROGRAM = "run_hybrid_text_generation_server.py"


def _fail(message: str) -> int:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _everyone_ready(error: str | None) -> str | None:
    """This rank's loading error, else another rank's: with several ranks, all of them stop or none does."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if error is not None:
        return error
    return next((f"rank {rank}: {message}" for rank, message in enumerate(errors) if message is not None), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, load the model and serve until interrupted; returns the exit status."""
    from megatron.inference.model_loading import parse_serving_args
    from megatron.training.arguments import ArgumentError
    from megatron.training.checkpointing import CheckpointError

    try:
        args = parse_serving_args(argv)
    except (ArgumentError, CheckpointError, ValueError, OSError) as error:
        return _fail(str(error))

    import torch.distributed as dist

    from megatron.core.inference.text_generation import TextGenerator
    from megatron.inference.model_loading import load_draft_model, load_model_for_serving
    from megatron.inference.text_generation_server import BroadcastRunner, TicketLock, create_app, run_follower, serve
    from megatron.training.checkpoint_reshard import ReshardError
    from megatron.training.initialize import destroy_distributed, initialize_distributed

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # followers stop when rank 0 tells them
    initialize_distributed(args)
    generator, error = None, None
    try:
        model, tokenizer, max_length = load_model_for_serving(args)
        draft = None
        if args.draft_load is not None:
            draft, draft_limit = load_draft_model(args, tokenizer)
            max_length = min(max_length, draft_limit)
        generator = TextGenerator(model, tokenizer, max_length, draft_model=draft,
                                  num_speculative_tokens=args.num_speculative_tokens)
    except (ArgumentError, CheckpointError, ReshardError, ValueError, OSError) as caught:
        error = str(caught).splitlines()[0] if str(caught) else type(caught).__name__
    error = _everyone_ready(error)
    if error is not None:
        destroy_distributed()
        return _fail(error)

    if rank != 0:
        try:
            run_follower(generator)
        finally:
            destroy_distributed()
        return 0

    lock = TicketLock()
    runner = BroadcastRunner(generator) if dist.is_initialized() and dist.get_world_size() > 1 else None
    info = {"tensor_model_parallel_size": args.tensor_model_parallel_size, "load": args.load}
    app = create_app(generator, max_batch=args.max_batch_size, serve_lock=lock, run=runner,
                     model_name=args.model_name, info=info)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    started = []

    def announce(url: str) -> None:
        started.append(url)
        speculative = f", speculative with {args.draft_load}" if args.draft_load else ""
        print(f"serving {args.load} (max sequence length {max_length}, tensor parallel "
              f"{args.tensor_model_parallel_size}{speculative}) at {url}", flush=True)
        print(f"  curl -X PUT {url}/api -H 'Content-Type: application/json' "
              "-d '{\"prompts\": [\"Hello\"], \"tokens_to_generate\": 32}'", flush=True)

    try:
        serve(app, args.host, args.port, announce)
    except OSError as caught:  # the port is taken, the host cannot be bound, ...
        error = str(caught)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        followers_stopped = True
        if runner is not None:
            with lock:  # let the request in flight finish, then release the followers
                try:
                    runner.shutdown()
                except Exception as caught:  # a follower died: nothing left to tell
                    followers_stopped = False
                    print(f"{PROGRAM}: could not stop the other ranks: {caught}", file=sys.stderr, flush=True)
        if followers_stopped:
            with contextlib.suppress(Exception):  # the process is ending either way
                destroy_distributed()
    if started:
        print("server stopped", flush=True)
    return _fail(error) if error is not None else 0


if __name__ == "__main__":
    sys.exit(main())

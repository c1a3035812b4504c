"""Text-generation benchmarks of the inference engine (``megatron/core/inference``) on CPU, in three sections.

1. ``hf``: greedy decode against Hugging Face's ``Mamba2ForCausalLM`` holding the same weights (the seed-001
   pure-Mamba2 config of ``bench_mamba2_vs_hf.py``: hidden 256, 12 layers, 24 heads of 32, 8 groups, state 128,
   vocab 32000, tied), 128-token prompts, 128 new tokens, batch 1 and 8. HF ``generate(do_sample=False)`` against
   our full engine path ``generate(...)`` and its equal-length fast path ``greedy_generate``; tokens/s count the new
   tokens over the whole call (prefill included).
2. ``long``: a hybrid (mostly Mamba2 + MLP, one attention layer) against an all-attention model (RoPE) of nearly
   the same parameter count, prompts of 512 / 2048 / 8192 tokens, batch 1, 64 new tokens; the prefill and the
   single-token decode steps are timed apart.
3. ``spec``: speculative greedy decoding (a small draft proposes k tokens, the target verifies them in one forward)
   against plain greedy decoding of the target, on prompts from the tiny corpus's validation documents. Random
   weights never agree, so both models are first trained with ``pretrain_hybrid.py`` on the tiny corpus (a few
   minutes; the checkpoints are cached under ``data_cache/bench_generation`` and reused).

Each timed call alternates with its peers (A, B, A, B, ...; median of ``--repeats``) so that drifts in the speed
of a shared machine hit every side alike; ratios are the figures to trust, not absolute rates.

    python benchmarks/bench_generation.py                                  # all three sections
    python benchmarks/bench_generation.py --sections hf --json benchmarks/results_generation.json
    python benchmarks/bench_generation.py --sections long --lengths 512 2048 --prefill-chunk 1024
    python benchmarks/bench_generation.py --sections spec --ks 2 4 --retrain

With ``--json`` the results are merged into the file (sections not run keep their previous figures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]  # this checkout's megatron (not an installed copy) and the sibling script

from bench_mamba2_vs_hf import build_models, interleaved  # noqa: E402  (a sibling script, found through sys.path)

from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.datasets.splits import split_document_ranges  # noqa: E402
from megatron.core.inference.generation import generate, greedy_generate  # noqa: E402
from megatron.core.inference.speculative import speculative_generate  # noqa: E402
from megatron.core.inference_params import InferenceParams  # noqa: E402
from megatron.core.models.hybrid import HybridModel  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.training.arguments import build_parser  # noqa: E402
from megatron.training.checkpointing import checkpoint_name, load_state, read_tracker  # noqa: E402
from megatron.training.training import build_model  # noqa: E402

SECTIONS = ("hf", "long", "spec")

# Section 3's two models: pretrain_hybrid.py flags (the tiny recipe's, scaled). The target is twice the tiny recipe's
# width and depth; the draft is a 2-layer model a quarter as wide, sharing the tokenizer (vocab 2048).
COMMON_TRAIN_FLAGS = [
    "--seq-length", "128", "--max-position-embeddings", "256", "--position-embedding-type", "none",
    "--normalization", "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--init-method-std", "0.02",
    "--micro-batch-size", "16", "--global-batch-size", "16", "--lr", "3e-3", "--min-lr", "3e-4",
    "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0",
    "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--seed", "1234", "--split", "95,5,0",
    "--tokenizer-type", "HuggingFaceTokenizer", "--log-interval", "25", "--eval-iters", "4",
    "--num-workers", "0", "--distributed-backend", "gloo", "--no-save-optim",
]
TARGET_FLAGS = [
    "--hybrid-layer-pattern", "M-M*M-M-", "--hidden-size", "256", "--num-attention-heads", "8",
    "--group-query-attention", "--num-query-groups", "2", "--mamba-head-dim", "32", "--mamba-num-groups", "2",
    "--mamba-state-dim", "64",
]
DRAFT_FLAGS = [
    "--hybrid-layer-pattern", "M-", "--hidden-size", "64", "--num-attention-heads", "2", "--mamba-head-dim", "32",
    "--mamba-num-groups", "1", "--mamba-state-dim", "32",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported)")
    parser.add_argument("--json", help="merge the results into this file")
    group = parser.add_argument_group("section hf: decode against Hugging Face")
    group.add_argument("--prompt", type=int, default=128)
    group.add_argument("--new-tokens", type=int, default=128)
    group.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    group = parser.add_argument_group("section long: hybrid vs all-attention at long prompts")
    group.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    group.add_argument("--long-new-tokens", type=int, default=64)
    group.add_argument("--hybrid-pattern", default="M-M-M*M-M-M-")
    group.add_argument("--attention-pattern", default="*-" * 12)
    group.add_argument("--long-hidden", type=int, default=256)
    group.add_argument("--prefill-chunk", type=int, default=0,
                       help="feed prompts in chunks of this many tokens (0: one forward)")
    group.add_argument("--chunk-check", type=int, default=2048,
                       help="also prefill the longest prompt once in chunks of this size, timed, and compare its "
                            "last logits with the one-forward prefill (0: skip)")
    group = parser.add_argument_group("section spec: speculative decoding")
    group.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    group.add_argument("--num-prompts", type=int, default=8)
    group.add_argument("--spec-prompt", type=int, default=48, help="prompt tokens taken from each document")
    group.add_argument("--spec-new-tokens", type=int, default=64)
    group.add_argument("--target-iters", type=int, default=200)
    group.add_argument("--draft-iters", type=int, default=300)
    group.add_argument("--corpus", default="data_cache/tiny_corpus")
    group.add_argument("--work-dir", default="data_cache/bench_generation", help="trained checkpoints are kept here")
    group.add_argument("--retrain", action="store_true", help="train again even if the checkpoints exist")
    return parser.parse_args()


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of the ratio of two calls timed next to each other: steadier than a ratio of medians
    when the machine's speed drifts between rounds."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()


# ------------------------------------------------------------------------------------- section 1: vs Hugging Face

def section_hf(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy decode tokens/s: HF generate vs our generate and greedy_generate, same weights."""
    config = argparse.Namespace(hidden=256, layers=12, heads=24, head_dim=32, groups=8, state=128, vocab=32000,
                                seq=0, prompt=args.prompt, new_tokens=args.new_tokens)
    hf, ours = build_models(config)  # ours: max_sequence_length = prompt + new tokens
    hf.eval()
    ours.eval()
    max_length = args.prompt + args.new_tokens
    probe = torch.randint(0, config.vocab, (2, 64))
    with torch.inference_mode():
        gap = (hf(probe).logits - ours(probe)).abs().max().item()
    print(f"[hf] same weights: max |logit difference| = {gap:.2e}")
    out: dict[str, Any] = {"config": {"hidden": 256, "layers": 12, "mamba_heads": 24, "head_dim": 32, "groups": 8,
                                      "state": 128, "vocab": 32000, "tied_embeddings": True,
                                      "prompt": args.prompt, "new_tokens": args.new_tokens},
                           "max_logit_difference": gap, "batches": {}}
    rows = []
    n = args.new_tokens
    for batch in args.batches:
        torch.manual_seed(1000 + batch)
        prompt = torch.randint(0, config.vocab, (batch, args.prompt))
        prompts = prompt.tolist()

        @torch.inference_mode()
        def run_hf(tokens: int = n, prompt: torch.Tensor = prompt) -> torch.Tensor:
            return hf.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                               pad_token_id=0)[:, prompt.shape[1]:]

        def run_engine(tokens: int = n, prompts: list[list[int]] = prompts) -> torch.Tensor:
            result = generate(ours, prompts, tokens, max_length)
            return torch.tensor([result.generated(i) for i in range(len(prompts))])

        def run_fast(tokens: int = n, prompt: torch.Tensor = prompt) -> torch.Tensor:
            return greedy_generate(ours, prompt, tokens)

        for warm in (run_hf, run_engine, run_fast):  # allocators, and the first build of the fused CPU decode step
            warm(4)
        times, calls = interleaved({"hf": run_hf, "engine": run_engine, "fast": run_fast}, args.repeats)
        outputs = {name: results[-1] for name, results in calls.items()}
        same_paths = torch.equal(outputs["engine"], outputs["fast"])
        # Random weights give near-tied logits, so free-running greedy sequences may drift apart after one flip;
        # teacher-forced on HF's sequence, our next-token choice is compared position by position instead.
        with torch.inference_mode():
            forced = ours(torch.cat([prompt, outputs["hf"]], 1))[:, args.prompt - 1 : -1].argmax(-1)
        agreement = (forced == outputs["hf"]).float().mean().item()
        tokens = batch * n
        rates = {name: tokens / median(values) for name, values in times.items()}
        entry = {
            "seconds": times,
            "tokens_per_s": rates,
            "engine_over_hf": rates["engine"] / rates["hf"],
            "fast_over_hf": rates["fast"] / rates["hf"],
            "engine_over_hf_paired": paired(times["hf"], times["engine"]),
            "fast_over_hf_paired": paired(times["hf"], times["fast"]),
            "engine_equals_fast_path": same_paths,
            "teacher_forced_agreement_with_hf": agreement,
            "free_running_equal_to_hf": torch.equal(outputs["engine"], outputs["hf"]),
        }
        out["batches"][str(batch)] = entry
        rows.append([batch, f"{rates['hf']:.1f}", f"{rates['engine']:.1f}", f"{rates['fast']:.1f}",
                     f"{entry['engine_over_hf']:.2f}x ({entry['engine_over_hf_paired']:.2f}x)",
                     f"{entry['fast_over_hf']:.2f}x ({entry['fast_over_hf_paired']:.2f}x)", same_paths,
                     f"{agreement:.1%}"])
        print(f"[hf] batch {batch}: seconds hf {times['hf']}, engine {times['engine']}, fast {times['fast']}",
              flush=True)
    print(f"\nDecode vs Hugging Face: prompt {args.prompt}, {n} new tokens, tokens/s (median of {args.repeats}, "
          "interleaved, prefill included; in brackets: median of the per-round ratios)")
    table(["batch", "HF", "generate", "greedy_generate", "generate/HF", "greedy/HF", "paths equal",
           "agree w/ HF (forced)"], rows)
    out["target_5x_met"] = {batch: entry["engine_over_hf"] >= 5 for batch, entry in out["batches"].items()}
    return out


# ------------------------------------------------------------------------- section 2: hybrid vs all-attention

def long_models(args: argparse.Namespace) -> dict[str, HybridModel]:
    max_length = max(args.lengths) + args.long_new_tokens
    models = {}
    for name, pattern, position in (("hybrid", args.hybrid_pattern, "none"),
                                    ("attention", args.attention_pattern, "rope")):
        torch.manual_seed(0)
        config = TransformerConfig(
            hidden_size=args.long_hidden, num_attention_heads=8, num_query_groups=2, mamba_head_dim=32,
            mamba_num_groups=8, mamba_state_dim=128, normalization="RMSNorm", add_bias_linear=False,
            hidden_dropout=0.0, attention_dropout=0.0,
        )
        models[name] = HybridModel(config, 32000, max_length, hybrid_layer_pattern=pattern,
                                   position_embedding_type=position, share_embeddings_and_output_weights=True).eval()
    return models


@torch.inference_mode()
def prefill_then_decode(model: HybridModel, prompt: torch.Tensor, new_tokens: int,
                        chunk: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """greedy_generate's body with the prefill (in chunks of ``chunk`` tokens, 0: one forward) timed apart from the
    ``new_tokens`` single-token steps. Returns (prefill s, decode s, generated tokens, last prefill logits)."""
    batch, length = prompt.shape
    cache = InferenceParams(batch, length + new_tokens)
    step = chunk or length
    start = time.perf_counter()
    for offset in range(0, length, step):
        piece = prompt[:, offset : offset + step]
        logits = model(piece, inference_params=cache)
        cache.advance(piece.shape[1])
    prefill_seconds = time.perf_counter() - start
    last = logits[:, -1].clone()
    generated = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(token)
        logits = model(token, inference_params=cache)
        cache.advance(1)
    return prefill_seconds, time.perf_counter() - start, torch.cat(generated, 1), last


def section_long(args: argparse.Namespace) -> dict[str, Any]:
    models = long_models(args)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    embedding = 32000 * args.long_hidden
    for name, pattern in (("hybrid", args.hybrid_pattern), ("attention", args.attention_pattern)):
        print(f"[long] {name:9s} {pattern:24s} parameters {counts[name]:,} ({counts[name] - embedding:,} without the "
              "tied embedding)")
    new = args.long_new_tokens
    out: dict[str, Any] = {
        "config": {"hidden": args.long_hidden, "vocab": 32000, "attention_heads": 8, "query_groups": 2,
                   "mamba_heads": 2 * args.long_hidden // 32, "mamba_head_dim": 32, "mamba_groups": 8,
                   "mamba_state": 128, "ffn_hidden": 4 * args.long_hidden, "tied_embeddings": True,
                   "hybrid_pattern": args.hybrid_pattern, "hybrid_position_embedding": "none",
                   "attention_pattern": args.attention_pattern, "attention_position_embedding": "rope",
                   "batch": 1, "new_tokens": new, "prefill_chunk": args.prefill_chunk},
        "parameters": counts,
        "lengths": {},
    }
    warm = torch.randint(0, 32000, (1, 64))
    for model in models.values():  # allocators, and the first build of the fused CPU decode step
        prefill_then_decode(model, warm, 4, 0)
    rows = []
    for length in args.lengths:
        torch.manual_seed(length)
        prompt = torch.randint(0, 32000, (1, length))
        steps = {name: (lambda model=model, prompt=prompt: prefill_then_decode(model, prompt, new, args.prefill_chunk))
                 for name, model in models.items()}
        _, calls = interleaved(steps, args.repeats)
        entry: dict[str, Any] = {}
        for name, results in calls.items():
            prefill = [result[0] for result in results]
            decode = [result[1] for result in results]
            entry[name] = {"prefill_seconds": prefill, "decode_seconds": decode,
                           "prefill_s": median(prefill), "prefill_tokens_per_s": length / median(prefill),
                           "decode_tokens_per_s": new / median(decode)}
        entry["hybrid_over_attention_decode"] = (entry["hybrid"]["decode_tokens_per_s"]
                                                 / entry["attention"]["decode_tokens_per_s"])
        entry["hybrid_over_attention_decode_paired"] = paired(entry["attention"]["decode_seconds"],
                                                              entry["hybrid"]["decode_seconds"])
        entry["attention_over_hybrid_prefill_time"] = entry["attention"]["prefill_s"] / entry["hybrid"]["prefill_s"]
        entry["attention_over_hybrid_prefill_time_paired"] = paired(entry["attention"]["prefill_seconds"],
                                                                    entry["hybrid"]["prefill_seconds"])
        out["lengths"][str(length)] = entry
        rows.append([length, f"{entry['hybrid']['prefill_s']:.2f}", f"{entry['attention']['prefill_s']:.2f}",
                     f"{entry['attention_over_hybrid_prefill_time']:.2f}x "
                     f"({entry['attention_over_hybrid_prefill_time_paired']:.2f}x)",
                     f"{entry['hybrid']['decode_tokens_per_s']:.1f}",
                     f"{entry['attention']['decode_tokens_per_s']:.1f}",
                     f"{entry['hybrid_over_attention_decode']:.2f}x "
                     f"({entry['hybrid_over_attention_decode_paired']:.2f}x)"])
        print(f"[long] {length}: " + ", ".join(f"{name} prefill {entry[name]['prefill_seconds']} decode "
                                               f"{entry[name]['decode_seconds']}" for name in models), flush=True)
    if args.chunk_check and args.chunk_check < max(args.lengths):
        length = max(args.lengths)
        torch.manual_seed(length)
        prompt = torch.randint(0, 32000, (1, length))
        check: dict[str, Any] = {"chunk": args.chunk_check, "length": length}
        for name, model in models.items():  # one call each: a cross-check, not a figure to compare closely
            whole = prefill_then_decode(model, prompt, 1, 0)
            chunked = prefill_then_decode(model, prompt, 1, args.chunk_check)
            check[name] = {"one_forward_prefill_s": whole[0], "chunked_prefill_s": chunked[0],
                           "max_last_logit_difference": (whole[3] - chunked[3]).abs().max().item()}
        out["chunked_prefill_check"] = check
    print(f"\nHybrid vs all-attention, batch 1, {new} new tokens (median of {args.repeats}, interleaved; prefill in "
          + (f"chunks of {args.prefill_chunk}" if args.prefill_chunk else "one forward")
          + "; in brackets: median of the per-round ratios)")
    table(["prompt", "prefill hybrid s", "prefill attention s", "attention/hybrid", "decode hybrid tok/s",
           "decode attention tok/s", "hybrid/attention"], rows)
    if "chunked_prefill_check" in out:
        check = out["chunked_prefill_check"]
        for name in models:
            print(f"chunked prefill ({check['chunk']}-token chunks, {check['length']} tokens, one call each) {name}: "
                  f"{check[name]['chunked_prefill_s']:.2f} s vs one forward {check[name]['one_forward_prefill_s']:.2f}"
                  f" s; max |last logit difference| {check[name]['max_last_logit_difference']:.1e}")
    return out


# --------------------------------------------------------------------------------- section 3: speculative decoding

def train_if_missing(args: argparse.Namespace, name: str, flags: list[str], iters: int) -> dict[str, Any]:
    """Train ``name`` with pretrain_hybrid.py in a subprocess unless its checkpoint of ``iters`` iterations exists."""
    save = REPO / args.work_dir / name
    info: dict[str, Any] = {"dir": os.path.relpath(save, REPO), "iterations": iters, "flags": flags}
    recipe = save / "bench_recipe.json"  # the flags the checkpoint was trained with: other flags train again
    wanted = {"flags": [*COMMON_TRAIN_FLAGS, *flags], "iterations": iters}
    cached = recipe.exists() and json.loads(recipe.read_text()) == wanted
    if not args.retrain and cached and read_tracker(save) == iters:
        info["trained_now"] = False
        log = save / "train.log"
    else:
        corpus = REPO / args.corpus
        if not (corpus / "corpus_text_document.idx").exists():
            subprocess.run([sys.executable, "examples/mamba/prepare_tiny_corpus.py", str(corpus)], cwd=REPO,
                           check=True)
        command = [sys.executable, "pretrain_hybrid.py", *COMMON_TRAIN_FLAGS, *flags,
                   "--train-iters", str(iters), "--lr-warmup-iters", str(max(1, iters // 10)),
                   "--eval-interval", str(iters + 1), "--save-interval", str(iters),  # validated once, at the end
                   "--save", str(save), "--data-path", str(corpus / "corpus_text_document"),
                   "--data-cache-path", str(REPO / args.work_dir / "index_cache"),
                   "--tokenizer-model", str(corpus / "tokenizer")]
        save.mkdir(parents=True, exist_ok=True)
        log = save / "train.log"
        print(f"[spec] training the {name} ({iters} iterations) ...", flush=True)
        start = time.perf_counter()
        with open(log, "w") as handle:
            subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        info["trained_now"] = True
        info["train_seconds"] = time.perf_counter() - start
        recipe.write_text(json.dumps(wanted))
    text = log.read_text() if log.exists() else ""
    losses = re.findall(r"validation loss at the end \| lm loss value: ([0-9.Ee+-]+)", text)
    info["validation_loss"] = float(losses[-1]) if losses else None
    seconds = re.findall(r"train_seconds=([0-9.]+)", text)
    if "train_seconds" not in info and seconds:
        info["train_seconds"] = float(seconds[-1])
    if info["trained_now"]:
        with open(log, "a") as handle:  # remembered for runs that reuse the checkpoint
            handle.write(f"\ntrain_seconds={info['train_seconds']:.1f}\n")
    return info


def load_trained(directory: Path) -> tuple[HybridModel, argparse.Namespace]:
    iteration = read_tracker(directory)
    state = load_state(checkpoint_name(directory, iteration))
    # The saved args over the parser's defaults: a flag added to the parser after the save keeps its default.
    saved = argparse.Namespace(**{**vars(build_parser().parse_args([])), **vars(state["args"])})
    model = build_model(saved)
    model.load_state_dict(state["model"])
    return model.eval(), saved


def validation_prompts(args: argparse.Namespace) -> list[list[int]]:
    """The first ``--spec-prompt`` tokens of ``--num-prompts`` documents spread over the validation split (the
    documents pretrain_hybrid.py's --split 95,5,0 holds out of training)."""
    dataset = IndexedDataset(str(REPO / args.corpus / "corpus_text_document"))
    start, stop = split_document_ranges(dataset.num_documents, "95,5,0")[1]
    bounds = dataset.document_indices
    candidates = []
    for document in range(start, stop):
        tokens = [int(t) for s in range(bounds[document], bounds[document + 1]) for t in dataset[s]]
        if len(tokens) >= args.spec_prompt:
            candidates.append(tokens[: args.spec_prompt])
    if len(candidates) < args.num_prompts:
        raise SystemExit(f"only {len(candidates)} validation documents have {args.spec_prompt} tokens")
    stride = len(candidates) / args.num_prompts
    return [candidates[int(i * stride)] for i in range(args.num_prompts)]


@torch.inference_mode()
def forward_costs(target: HybridModel, draft: HybridModel, prompt: list[int], ks: list[int],
                  repeats: int = 20) -> dict[str, float]:
    """Milliseconds (median of ``repeats``, interleaved) of the forwards a speculative round is made of, each from
    the same cached state after ``prompt``: one token (a plain decode step, a draft proposal) and ``k + 1`` tokens
    (the target's verification of k proposals; also the cost of a roll-back that re-feeds several kept tokens)."""
    tokens = torch.tensor([prompt])
    states = {}
    for name, model in (("target", target), ("draft", draft)):
        cache = InferenceParams(1, len(prompt) + max(ks) + 2)
        model(tokens[:, :-1], inference_params=cache)
        cache.advance(len(prompt) - 1)
        states[name] = (model, cache, cache.snapshot())

    def forward(name: str, count: int) -> Callable[[], None]:
        model, cache, snapshot = states[name]

        def run() -> None:
            cache.restore(snapshot)
            model(tokens[:, -1:].expand(1, count).contiguous(), inference_params=cache)
        return run

    steps = {"target_1_token": forward("target", 1), "draft_1_token": forward("draft", 1)}
    steps.update({f"target_{k + 1}_tokens": forward("target", k + 1) for k in ks})
    for step in steps.values():
        step()
    times, _ = interleaved(steps, repeats)
    return {name: 1e3 * median(values) for name, values in times.items()}


def section_spec(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    training = {name: train_if_missing(args, name, flags, iters)
                for name, flags, iters in (("target", TARGET_FLAGS, args.target_iters),
                                           ("draft", DRAFT_FLAGS, args.draft_iters))}
    training_seconds = time.perf_counter() - start
    (target, target_args), (draft, _) = (load_trained(REPO / args.work_dir / name) for name in ("target", "draft"))
    counts = {"target": sum(p.numel() for p in target.parameters()),
              "draft": sum(p.numel() for p in draft.parameters())}
    for name, info in training.items():
        print(f"[spec] {name}: {counts[name]:,} parameters, {info['iterations']} iterations, validation loss "
              f"{info['validation_loss']}, " + ("trained now" if info["trained_now"] else "cached checkpoint")
              + (f" ({info['train_seconds']:.0f} s)" if info.get("train_seconds") else ""), flush=True)
    prompts = validation_prompts(args)
    new = args.spec_new_tokens
    max_length = args.spec_prompt + new

    def plain(model: HybridModel = target, tokens: int = new, count: int = len(prompts)) -> list[list[int]]:
        return [generate(model, [prompt], tokens, max_length).tokens[0] for prompt in prompts[:count]]

    def speculative(k: int, tokens: int = new, count: int = len(prompts)) -> tuple[list[list[int]], int, int]:
        outputs, accepted, proposed = [], 0, 0
        for prompt in prompts[:count]:
            result = speculative_generate(target, draft, [prompt], tokens, max_length, k)
            outputs.append(result.tokens[0])
            accepted, proposed = accepted + result.acceptance[0], proposed + result.acceptance[1]
        return outputs, accepted, proposed

    steps: dict[str, Callable[[], Any]] = {"plain": plain, "draft": lambda: plain(draft)}
    steps.update({f"k{k}": (lambda k=k: speculative(k)) for k in args.ks})
    plain(tokens=8, count=1)  # warm-up: allocators, the first build of the fused CPU decode step
    plain(draft, tokens=8, count=1)
    for k in args.ks:
        speculative(k, tokens=8, count=1)
    times, calls = interleaved(steps, args.repeats)
    costs = forward_costs(target, draft, prompts[0], args.ks)
    reference = calls["plain"][-1]
    tokens = len(prompts) * new
    out: dict[str, Any] = {
        "config": {"prompts": len(prompts), "prompt_tokens": args.spec_prompt, "new_tokens": new, "batch": 1,
                   "sampling": "greedy", "tokenizer_vocab": 2048, "padded_vocab": target_args.padded_vocab_size},
        "training": training, "training_seconds_this_run": training_seconds, "parameters": counts,
        "plain_seconds": times["plain"], "plain_tokens_per_s": tokens / median(times["plain"]),
        "draft_alone_seconds": times["draft"], "draft_alone_tokens_per_s": tokens / median(times["draft"]),
        "draft_cost_over_target": median(times["draft"]) / median(times["plain"]),
        "forward_ms": costs,
        "ks": {},
    }
    rows = [["plain (target)", "-", "-", f"{tokens / median(times['plain']):.1f}", "1.00x", "-"],
            ["draft alone", "-", "-", f"{tokens / median(times['draft']):.1f}",
             f"{median(times['plain']) / median(times['draft']):.2f}x ({paired(times['plain'], times['draft']):.2f}x)",
             "-"]]
    for k in args.ks:
        outputs = [result[0] for result in calls[f"k{k}"]]
        _, accepted, proposed = calls[f"k{k}"][-1]
        identical = all(output == reference for output in outputs)
        entry = {"seconds": times[f"k{k}"], "accepted": accepted, "proposed": proposed,
                 "acceptance_rate": accepted / proposed if proposed else None,
                 "tokens_per_s": tokens / median(times[f"k{k}"]),
                 "speedup_over_plain": median(times["plain"]) / median(times[f"k{k}"]),
                 "speedup_over_plain_paired": paired(times["plain"], times[f"k{k}"]),
                 "identical_to_plain": identical}
        out["ks"][str(k)] = entry
        rows.append([f"speculative k={k}", f"{accepted}/{proposed}", f"{entry['acceptance_rate']:.1%}",
                     f"{entry['tokens_per_s']:.1f}",
                     f"{entry['speedup_over_plain']:.2f}x ({entry['speedup_over_plain_paired']:.2f}x)", identical])
    print("[spec] seconds: " + ", ".join(f"{name} {values}" for name, values in times.items()), flush=True)
    print(f"\nSpeculative greedy decoding: {len(prompts)} validation prompts of {args.spec_prompt} tokens, {new} new "
          f"tokens each, batch 1 (median of {args.repeats}, interleaved; in brackets: median of the per-round ratios)")
    table(["decoding", "accepted/proposed", "acceptance", "tokens/s", "speed-up", "same tokens as plain"], rows)
    print("forwards from a cached state (ms, median of 20, interleaved): "
          + ", ".join(f"{name} {value:.2f}" for name, value in costs.items()))
    return out


# ---------------------------------------------------------------------------------------------------------- main

def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    runners = {"hf": section_hf, "long": section_long, "spec": section_spec}
    sections: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        start = time.perf_counter()
        sections[name] = runners[name](args)
        seconds[name] = time.perf_counter() - start
        print(f"[{name}] section took {seconds[name]:.0f} s\n", flush=True)
    if args.json:
        path = Path(args.json)
        results = json.loads(path.read_text()) if path.exists() else {"sections": {}, "section_seconds": {}}
        results.update({"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
                        "threads": args.threads, "torch": torch.__version__, "repeats": args.repeats})
        import transformers

        results["transformers"] = transformers.__version__
        for name in sections:
            results["sections"][name] = sections[name]
            results["section_seconds"][name] = seconds[name]
            results.setdefault("args", {})[name] = {key: value for key, value in vars(args).items()}
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results merged into {path}")


if __name__ == "__main__":
    main()

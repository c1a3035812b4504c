"""Speculative decoding: a small draft model proposes tokens, the target model checks them all in one forward.

Each round, with every sequence past its prompt and one *pending* token that neither model has consumed yet:

1. the draft consumes the pending token and proposes ``k`` tokens one by one;
2. the target consumes the pending token and the ``k`` proposals in one forward, which gives its distribution at
   each of the ``k + 1`` positions;
3. proposals are accepted from the left while the target agrees (greedy: same argmax; sampling: the standard
   rejection test ``u < p(x) / q(x)``, which leaves the target's distribution exactly intact); the batch keeps the
   smallest accepted count ``n``, then one more token comes from the target (the correction, drawn from
   ``max(0, p - q)`` when sampling, or the bonus token when all ``k`` were accepted);
4. both models are rolled back to the last kept position (KV caches need only their offset moved back): the target's
   fused Mamba2 layers record their states after each verified token, so it resumes from the last kept one; the
   draft keeps a snapshot after each proposal. Where a layer cannot record (module path, Mamba1, tensor
   parallelism), the target restores a snapshot taken before the round and is fed the kept tokens again.

The result equals what the target alone generates: token for token when greedy, in distribution when sampling. The
draft can be any model with the same vocabulary (``--draft-load``: a smaller hybrid trained on the same tokenizer).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.inference.generation import (
    GenerationOutput,
    LogitsProcessor,
    StopTest,
    _Progress,
    _token_log_probs,
    broadcast_from_tensor_rank_0,
    prepare_prompts,
)
from megatron.core.inference.sampling import GREEDY, SamplingParams, sample, sampling_log_probs
from megatron.core.inference_params import InferenceParams


@torch.inference_mode()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    prompts: list[list[int]],
    tokens_to_generate: int | list[int],
    max_sequence_length: int,
    num_speculative_tokens: int,
    sampling: SamplingParams = GREEDY,
    generator: torch.Generator | None = None,
    eod: int | None = None,
    stop: StopTest | None = None,
    logits_processor: LogitsProcessor | None = None,
    return_log_probs: bool = False,
) -> GenerationOutput:
    """:func:`~megatron.core.inference.generation.generate` with ``draft`` proposing ``num_speculative_tokens``
    tokens per round; same arguments and output. ``output.acceptance`` is set to (accepted, proposed) counts."""
    laid_out = prepare_prompts(prompts, tokens_to_generate, max_sequence_length, eod,
                               next(target.parameters()).device)
    lengths, total = laid_out.lengths, laid_out.total
    run = _Round(target, draft, sampling, generator, logits_processor, return_log_probs)
    run.start(laid_out.tokens)
    state = _Progress(lengths, laid_out.budgets, eod, stop)
    pending = min(lengths) - 1  # position of the pending token: everything before it has been consumed
    if pending > 0:
        run.prefill(pending)
    while pending + 1 < total and not state.all_done():
        position = pending + 1
        k = min(num_speculative_tokens, total - position - 1)  # all k accepted place k + 1 tokens
        if position < max(lengths) or k < 1:
            new = run.plain_step(pending, lengths)
        else:
            new = run.speculative_round(pending, k)
        for offset in range(new):
            state.record(position + offset, run.tokens[:, position + offset].tolist())
        pending += new
    output = state.output(run.tokens.tolist(), run.log_probs)
    output.acceptance = (run.accepted, run.proposed)
    return output


class _Round:
    """The two models' states and the shared token table, with one method per kind of step."""

    def __init__(self, target: nn.Module, draft: nn.Module, sampling: SamplingParams,
                 generator: torch.Generator | None, logits_processor: LogitsProcessor | None,
                 return_log_probs: bool) -> None:
        self.target, self.draft = target, draft
        self.sampling, self.generator, self.processor = sampling, generator, logits_processor
        self.return_log_probs = return_log_probs
        self.accepted = self.proposed = 0

    def start(self, tokens: torch.Tensor) -> None:
        """Take the laid-out token table ``(b, total)`` and allocate both models' caches."""
        self.tokens = tokens
        batch, total = tokens.shape
        self.log_probs = torch.zeros(batch, total, device=tokens.device) if self.return_log_probs else None
        # One spare position: a round may propose past the longest budget before it is cut.
        # Plain greedy choices need no logits, only argmaxes, which the models find with less weight traffic.
        greedy = self.sampling.greedy and self.processor is None
        self.target_cache = InferenceParams(batch, total + 1, argmax_only=greedy and not self.return_log_probs)
        self.draft_cache = InferenceParams(batch, total + 1, last_logits_only=True, argmax_only=greedy)

    def _forward(self, model: nn.Module, cache: InferenceParams, start: int, end: int) -> torch.Tensor:
        """Feed positions ``start:end``: logits ``(b, n, vocab)`` in float32, or token ids ``(b, n)`` for an
        argmax-only cache."""
        out = model(self.tokens[:, start:end], inference_params=cache)
        cache.advance(end - start)
        return out if cache.argmax_only else out.float()

    def _choose(self, out: torch.Tensor, cache: InferenceParams) -> torch.Tensor:
        """The next token ``(b,)`` from a forward's last position: sampled from processed logits ``(b, vocab)``,
        or ``out`` itself, the ids ``(b,)`` an argmax-only cache returns; agreed over tensor-parallel ranks."""
        if not cache.argmax_only:
            out = sample(out, self.sampling, self.generator)
        return broadcast_from_tensor_rank_0(out.contiguous())

    def prefill(self, end: int) -> None:
        """Both models consume the prompt positions ``0:end`` (every prompt is longer than ``end``)."""
        self._forward(self.draft, self.draft_cache, 0, end)
        logits = self._forward(self.target, self.target_cache, 0, end)
        self._record_log_probs(logits, 1, end)

    def _processed(self, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(b, vocab)`` after the caller's processor, given each row's previous token."""
        if self.processor is not None:
            logits = logits.clone()
            self.processor(logits, previous.tolist())
        return logits

    def plain_step(self, pending: int, lengths: list[int]) -> int:
        """Consume the pending token and place the next one (a prompt token, or the target's choice)."""
        self._forward(self.draft, self.draft_cache, pending, pending + 1)
        out = self._forward(self.target, self.target_cache, pending, pending + 1)[:, -1]
        position = pending + 1
        processed = out if self.target_cache.argmax_only else self._processed(out, self.tokens[:, pending])
        chosen = self._choose(processed, self.target_cache)
        in_prompt = torch.tensor([position < length for length in lengths], device=chosen.device)
        self.tokens[:, position] = torch.where(in_prompt, self.tokens[:, position], chosen)
        self._record_log_probs(out.unsqueeze(1), position, 1)
        return 1

    def speculative_round(self, pending: int, k: int) -> int:
        """Propose ``k`` tokens after the pending one, verify, keep ``n + 1``; returns how many were placed."""
        target_snapshot = self.target_cache.snapshot()
        proposals, draft_log_probs, draft_snapshots = self._propose(pending, k)
        self.tokens[:, pending + 1 : pending + 1 + k] = proposals
        self.target_cache.record_token_states = True
        self.target_cache.token_states.clear()
        target_out = self._forward(self.target, self.target_cache, pending, pending + 1 + k)  # (b, k + 1[, V])
        self.target_cache.record_token_states = False
        previous = self.tokens[:, pending : pending + 1 + k]
        processed = target_out
        if not self.target_cache.argmax_only:
            processed = torch.stack([self._processed(target_out[:, j], previous[:, j]) for j in range(k + 1)], 1)
        accepted, last = self._verify(processed, proposals, draft_log_probs)
        self.tokens[:, pending + 1 + accepted] = last
        self.accepted, self.proposed = self.accepted + accepted, self.proposed + k
        self._record_log_probs(target_out[:, : accepted + 1], pending + 1, accepted + 1)
        self._roll_back(pending, k, accepted, draft_snapshots, target_snapshot)
        return accepted + 1

    def _propose(self, pending: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple]]:
        """The draft's ``k`` tokens ``(b, k)``, when sampling its log-probs ``(b, k, vocab)``, and snapshots of its
        state after each of the first ``k - 1`` steps (the points a rejection can roll it back to)."""
        proposals, log_probs, snapshots = [], [], []
        for j in range(k):
            if j > 0:
                snapshots.append(self.draft_cache.snapshot())
            out = self._forward(self.draft, self.draft_cache, pending + j, pending + j + 1)[:, -1]
            if not self.draft_cache.argmax_only:
                out = self._processed(out, self.tokens[:, pending + j])
            if not self.sampling.greedy:
                log_probs.append(sampling_log_probs(out, self.sampling))
            token = self._choose(out, self.draft_cache)
            self.tokens[:, pending + 1 + j] = token
            proposals.append(token)
        return torch.stack(proposals, 1), (torch.stack(log_probs, 1) if log_probs else None), snapshots

    def _verify(self, target_logits: torch.Tensor, proposals: torch.Tensor,
                draft_log_probs: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        """(n, the token placed after the n accepted proposals ``(b,)``), from the target's processed logits
        ``(b, k + 1, vocab)`` (or its argmax ids ``(b, k + 1)`` for an argmax-only cache)."""
        k = proposals.shape[1]
        if self.sampling.greedy:
            choices = target_logits if self.target_cache.argmax_only else target_logits.argmax(dim=-1)  # (b, k + 1)
            agrees = choices[:, :k] == proposals
            accepted = int(_leading_true(agrees).min())
            return accepted, broadcast_from_tensor_rank_0(choices[:, accepted].contiguous())
        target_log_probs = sampling_log_probs(target_logits, self.sampling)  # (b, k + 1, V)
        p = target_log_probs[:, :k].gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
        q = draft_log_probs.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
        uniform = torch.rand(p.shape, generator=self.generator).to(p.device)
        per_row = _leading_true(uniform.log() < p - q)  # accept x with probability min(1, p(x) / q(x))
        per_row = broadcast_from_tensor_rank_0(per_row)  # every rank keeps rank 0's draws
        accepted = int(per_row.min())
        probs = target_log_probs[:, accepted].exp()
        if accepted < k:
            # Rows that rejected here draw from the residual max(0, p - q); rows that accepted keep the proposal.
            residual = (probs - draft_log_probs[:, accepted].exp()).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs)
            drawn = torch.multinomial(residual.cpu(), 1, generator=self.generator).squeeze(-1).to(p.device)
            last = torch.where(per_row > accepted, proposals[:, accepted], drawn)
        else:
            last = torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(p.device)
        return accepted, broadcast_from_tensor_rank_0(last)

    def _roll_back(self, pending: int, k: int, accepted: int, draft_snapshots: list[tuple],
                   target_snapshot: tuple) -> None:
        """Leave both models having consumed exactly the positions before the new pending token."""
        keep = pending + 1 + accepted  # the new pending position
        # The target consumed pending .. pending + k: keep its state after token `accepted` of the verification.
        if accepted < k and not self.target_cache.rewind_to_token(accepted, keep):
            self.target_cache.restore(target_snapshot)
            self._forward(self.target, self.target_cache, pending, keep)
        self.target_cache.token_states.clear()  # (k + 1) copies of every state: free them now
        # The draft consumed pending .. pending + k - 1; draft_snapshots[j] is its state after pending + j.
        if accepted == k:
            self._forward(self.draft, self.draft_cache, pending + k, keep)
        elif accepted < k - 1:
            self.draft_cache.restore(draft_snapshots[accepted])

    def _record_log_probs(self, logits: torch.Tensor, position: int, count: int) -> None:
        if self.log_probs is not None:
            targets = self.tokens[:, position : position + count]
            self.log_probs[:, position : position + count] = _token_log_probs(logits[:, :count], targets)


def _leading_true(flags: torch.Tensor) -> torch.Tensor:
    """Per row of ``(b, k)`` booleans, how many are True before the first False."""
    return flags.long().cumprod(dim=1).sum(dim=1)

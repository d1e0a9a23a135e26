"""Log-likelihood scoring: how likely a model finds a continuation after a context, and the
log-probability of every token of a long text through overlapping windows.

    from gpt.eval.scoring import continuation_logprobs, rolling_logprobs
    [(logprob, greedy)] = continuation_logprobs(model, [(tok.encode("ROMEO:"), tok.encode(" O"))])
    token_logprobs = rolling_logprobs(model, [tok.eot_id] + tok.encode(text), stride=64)

These two functions are the one scorer of the multiple-choice tasks, the cloze task, bits per byte
and the lm-evaluation-harness adapter, so their numbers agree by construction. Scores are natural
logs over the model's whole (padded) vocabulary, in float32, as the training loss is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt.model import GPT


def _batches(n: int, batch_size: int, progress: bool, what: str):
    """Batch start offsets, with a progress bar on a terminal when asked (the commands ask)."""
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=what, unit="batch", leave=False, disable=None if progress else True)


@torch.no_grad()
def continuation_logprobs(model: GPT, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16, progress: bool = False) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context), whether
    greedy decoding would produce exactly the continuation). A context + continuation longer than
    block_size + 1 tokens keeps its most recent tokens (the continuation is always scored whole
    when it fits). An empty context must be given as ``[eot_id]`` by the caller."""
    block = model.config.block_size
    device = next(model.parameters()).device
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    # longest first: the rows of a batch then have similar lengths (less padding)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for s in _batches(len(order), batch_size, progress, "scoring"):
        group = order[s : s + batch_size]
        rows, spans = [], []
        for i in group:
            context, continuation = list(requests[i][0]), list(requests[i][1])
            if not continuation:
                continue
            if not context:
                raise ValueError("an empty context: pass [eot_id] as the context of a text's start")
            whole = (context + continuation)[-(block + 1) :]
            n = min(len(continuation), len(whole) - 1)
            rows.append(whole[:-1])  # inputs; the targets are whole[1:]
            spans.append((i, whole[-n:], len(whole) - 1 - n))  # (request, targets, first scored position)
        if not rows:
            continue
        width = max(len(r) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for r, ids in enumerate(rows):  # right padding: causal attention never looks at it
            x[r, : len(ids)] = torch.tensor(ids)
        logp = F.log_softmax(model(x.to(device)).float(), dim=-1)  # (B, T, V)
        for r, (i, targets, start) in enumerate(spans):
            t = torch.tensor(targets, device=device)
            rows_logp = logp[r, start : start + len(targets)]  # (n, V)
            total = rows_logp.gather(1, t[:, None]).sum().item()
            greedy = bool((rows_logp.argmax(dim=-1) == t).all())
            results[i] = (total, greedy)
    return results


def windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of the windows over a sequence of n_tokens: each window runs the
    inputs [start, end) and scores the targets end-of-previous-window onward, so every target
    after the first block is predicted with at least ``block_size - stride`` tokens of context."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride={stride} must be in [1, block_size={block_size}]")
    out, scored = [], 0  # targets are positions 1..n_tokens-1; ``scored`` of them are done
    start = 0
    while scored < n_tokens - 1:
        end = min(start + block_size, n_tokens - 1)
        out.append((start, end, scored))
        scored = end
        start += stride
    return out


@torch.no_grad()
def rolling_logprobs(model: GPT, ids: Sequence[int], stride: int | None = None, batch_size: int = 16,
                     progress: bool = False) -> torch.Tensor:  # fmt: skip
    """log p(ids[t] | ids[:t]) for t = 1..len(ids)-1, as a float64 CPU tensor (len(ids) - 1,).
    Texts longer than block_size are scored in windows ``stride`` tokens apart (default: half a
    block): each window scores only the targets the previous one did not, with the context
    before them. ``ids[0]`` is context only (usually eot, the start of a document)."""
    block = model.config.block_size
    stride = stride or max(1, block // 2)
    device = next(model.parameters()).device
    seq = torch.tensor(list(ids), dtype=torch.long)
    out = torch.zeros(max(len(seq) - 1, 0), dtype=torch.float64)
    spans = windows(len(seq), block, stride)
    for s in _batches(len(spans), batch_size, progress, "windows"):
        group = spans[s : s + batch_size]
        x = torch.zeros(len(group), block, dtype=torch.long)
        y = torch.full((len(group), block), -1, dtype=torch.long)  # -1: not scored here
        for r, (start, end, scored) in enumerate(group):
            x[r, : end - start] = seq[start:end]
            first = scored - start  # window position predicting target ``scored + 1``
            y[r, first : end - start] = seq[scored + 1 : end + 1]
        logits = model(x.to(device)).float()  # (B, block, V)
        y = y.to(device)
        flat = logits.view(-1, logits.size(-1))
        loss = F.cross_entropy(flat, y.view(-1), ignore_index=-1, reduction="none")
        loss = loss.view(len(group), block).double().cpu()  # (B, block); 0 where not scored
        for r, (start, end, scored) in enumerate(group):
            out[scored:end] = -loss[r, scored - start : end - start]
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness encodes a pair: the context's
    trailing whitespace moves to the continuation (BPE attaches a space to the word after it),
    and the continuation's ids are those of the whole text after the context's. An empty
    context is <|endoftext|>, the start of a document."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids) :]


def choice_logprobs(model: GPT, tokenizer, items: Sequence[tuple[str, Sequence[str]]], batch_size: int = 16,
                    progress: bool = False) -> list[list[float]]:  # fmt: skip
    """For each (context, choices): the summed log-probability of every choice after the context
    (the choices of all items are scored together, in batches)."""
    requests, owners = [], []
    for i, (context, choices) in enumerate(items):
        for choice in choices:
            requests.append(encode_pair(tokenizer, context, choice))
            owners.append(i)
    scores: list[list[float]] = [[] for _ in items]
    logprobs = continuation_logprobs(model, requests, batch_size, progress)
    for i, (logprob, _) in zip(owners, logprobs, strict=True):
        scores[i].append(logprob)
    return scores

"""Pure math of generative (causal LM) merging: coarsened distributions, answer positions, greedy decoding.

DivMerge (arXiv 2509.02108, Algorithm 1 and Appendix B.1) merges causal LMs that answer by generating
text: each expert greedily decodes its task's prompts once; the merged model is then teacher-forced on
prompt + that answer, and the divergence is averaged over the answer's positions only.

Full next-token distributions are large (positions x vocabulary), so the teacher cache may keep only the
expert's top-k probabilities plus the remaining mass as one extra bucket. The merged model's distribution
is coarsened onto the same k + 1 outcomes (the expert's k token ids, then "any other token"), so the
objective is the exact divergence between the two coarsened distributions. Coarsening never increases
a divergence (data processing inequality), and with k = vocabulary it is the full divergence.

No Lightning and no model code here: the functions take tensors (and, for decoding, a step function).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from divmerge.objectives import Objective

INDEX_BYTES = 4  # token ids are stored as int32
PROB_BYTES = 4  # log-probabilities are stored as float32


def coarsen_topk(logprobs: Tensor, k: int | None) -> tuple[Tensor | None, Tensor]:
    """Keep the top-k outcomes of a distribution and merge the rest into one bucket.

    Args:
        logprobs: Normalised log-probabilities, shape (..., V).
        k: Outcomes to keep; None (or k >= V) keeps the full distribution.

    Returns:
        (ids, coarse): the kept token ids (..., k) as int64 (None when full), and the coarsened
        log-probabilities (..., k + 1) whose last entry is log of the remaining mass ((..., V) when full).

    """
    if k is None or k >= logprobs.shape[-1]:
        return None, logprobs
    top, ids = logprobs.topk(k, dim=-1)  # (..., k), (..., k)
    return ids, torch.cat([top, _rest(logprobs, ids)], dim=-1)  # (..., k + 1)


def coarsen_like(logprobs: Tensor, ids: Tensor | None) -> Tensor:
    """Coarsen a distribution onto given outcomes: those token ids, then all other tokens as one bucket.

    Args:
        logprobs: Normalised log-probabilities, shape (..., V).
        ids: Token ids to keep, shape (..., k); None keeps the full distribution.

    Returns:
        Log-probabilities of the k + 1 outcomes, shape (..., k + 1) ((..., V) when ``ids`` is None).

    """
    if ids is None:
        return logprobs
    return torch.cat([logprobs.gather(-1, ids), _rest(logprobs, ids)], dim=-1)  # (..., k + 1)


def _rest(logprobs: Tensor, ids: Tensor) -> Tensor:
    """Log of the mass outside ``ids``, as a logsumexp over the other entries (stable, unlike log(1 - p))."""
    others = logprobs.scatter(-1, ids, float("-inf"))  # (..., V), kept entries removed
    return others.logsumexp(dim=-1, keepdim=True)  # (..., 1)


def answer_positions(prompt_lengths: Tensor, width: int) -> Tensor:
    """Positions whose next-token logits predict answer tokens, in a sequence laid out prompt + answer.

    The logits at position ``m - 1 + j`` of a sequence starting with an m-token prompt predict answer
    token j.

    Args:
        prompt_lengths: Prompt length m per example, shape (B,).
        width: Answer positions to return per example (A).

    Returns:
        Positions, shape (B, A).

    """
    return prompt_lengths[:, None] - 1 + torch.arange(width, device=prompt_lengths.device)  # (B, A)


def pad_sequences(seqs: Sequence[Tensor], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Stack 1-D token sequences into a padded batch.

    Args:
        seqs: Token ids per example, each (L_i,).
        pad_id: Padding id.
        left: Pad on the left (for generation) instead of the right.

    Returns:
        ``input_ids`` and ``attention_mask``, each (B, max L_i).

    """
    length = max(len(s) for s in seqs)
    ids = torch.stack(
        [F.pad(s, (length - len(s), 0) if left else (0, length - len(s)), value=pad_id) for s in seqs]
    )
    mask = torch.stack(
        [F.pad(torch.ones_like(s), (length - len(s), 0) if left else (0, length - len(s))) for s in seqs]
    )
    return ids, mask  # (B, L), (B, L)


def answer_aligned(
    prompts: Sequence[Tensor], answers: Sequence[Tensor], pad_id: int
) -> tuple[Tensor, Tensor]:
    """Lay out prompt + answer sequences so every answer starts at the same position.

    Prompts are left-padded to a common length P and the answers' fed tokens (all but the last, which is
    only predicted) right-padded after them, so the logits predicting answer token j sit at position
    P - 1 + j for every example: the last A positions of the sequence, A = max answer length. A model
    asked for its last A positions' logits only (``logits_to_keep``) then never computes the LM head over
    the prompt. Positions must follow the attention mask (``position_ids = cumsum(mask) - 1``).

    Args:
        prompts: Prompt token ids per example, each (m_i,), m_i >= 1.
        answers: Answer token ids per example, each (n_i,), n_i >= 1 (the EOS included if generated).
        pad_id: Padding id.

    Returns:
        ``input_ids`` and ``attention_mask``, each (B, P + A - 1).

    """
    device = prompts[0].device
    left_ids, left_mask = pad_sequences(prompts, pad_id, left=True)  # (B, P)
    fed = [a[:-1].to(device, torch.long) for a in answers]
    if max(len(a) for a in fed) == 0:  # every answer is one token: nothing is fed after the prompt
        return left_ids, left_mask
    right_ids, right_mask = pad_sequences(fed, pad_id)  # (B, A - 1)
    return torch.cat([left_ids, right_ids], dim=1), torch.cat([left_mask, right_mask], dim=1)


def answer_divergence(
    objective: Objective,
    logits: Tensor,
    prompt_lengths: Tensor,
    answer_lengths: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor | None = None,
) -> Tensor:
    """Divergence between expert and merged model over the answer positions only (DivMerge, Algorithm 1).

    The merged model is teacher-forced on prompt + answer (right-padded); the divergence of each answer
    position is averaged within its example, then over examples. Prompt and padding positions never
    enter the computation.

    Args:
        objective: (expert log-probabilities, merged logits) -> per-row divergence, both (N, C).
        logits: Merged-model logits of the teacher-forced sequences, shape (B, L, V).
        prompt_lengths: Prompt length per example, shape (B,).
        answer_lengths: Answer length per example (at least 1), shape (B,).
        teacher_logprobs: Expert coarsened log-probabilities per answer position, shape (B, A, C) with
            A >= max(answer_lengths); C = k + 1, or V when ``teacher_ids`` is None.
        teacher_ids: The expert's top-k token ids per answer position, shape (B, A, k); None for full
            distributions.

    Returns:
        Scalar: mean over examples of the mean divergence over their answer positions.

    """
    width = int(answer_lengths.max())
    positions = answer_positions(prompt_lengths, width)  # (B, A)
    mask = torch.arange(width, device=logits.device)[None, :] < answer_lengths[:, None]  # (B, A)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None].expand(-1, width)  # (B, A)
    student = torch.log_softmax(logits[rows[mask], positions[mask]].float(), dim=-1)  # (n, V)
    ids = None if teacher_ids is None else teacher_ids[:, :width][mask]  # (n, k)
    teacher = teacher_logprobs[:, :width][mask].to(student.device)  # (n, C)
    per_position = objective(teacher, coarsen_like(student, ids))  # (n,)
    per_example = torch.zeros(logits.shape[0], device=logits.device).index_add(0, rows[mask], per_position)
    return (per_example / answer_lengths.to(per_example)).mean()


@dataclass
class Decoded:
    """Greedy decoding output, padded to the longest answer A.

    Attributes:
        tokens: Generated token ids (B, A), ``pad_id`` after an answer ends; the EOS token is kept.
        lengths: Generated tokens per example, EOS included, shape (B,).
        logprobs: Coarsened log-probabilities of each generated position (B, A, C), or None.
        ids: Top-k token ids of each generated position (B, A, k), or None (full or not kept).

    """

    tokens: Tensor
    lengths: Tensor
    logprobs: Tensor | None = None
    ids: Tensor | None = None


@torch.no_grad()
def greedy_decode(
    step: Callable[[Tensor | None], Tensor],
    batch_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    top_k: int | None = None,
    keep_distributions: bool = False,
) -> Decoded:
    """Greedy decoding that stops each example at EOS (or after ``max_new_tokens``).

    Args:
        step: Called with None first (encode the prompts), then with the previous tokens (B, 1); returns
            the next-token logits (B, V).
        batch_size: B.
        max_new_tokens: Most tokens generated per example.
        eos_id: End-of-sequence token id.
        pad_id: Id written after an example has ended.
        top_k: With ``keep_distributions``, keep the top-k outcomes + the rest (None: full vocabulary).
        keep_distributions: Also return each generated position's coarsened distribution.

    Returns:
        The decoded answers.

    """
    tokens, logprobs, ids = [], [], []
    lengths = torch.zeros(batch_size, dtype=torch.long)
    done = torch.zeros(batch_size, dtype=torch.bool)
    previous = None
    for _ in range(max_new_tokens):
        lp = torch.log_softmax(step(previous).float(), dim=-1).cpu()  # (B, V)
        token = torch.where(done, pad_id, lp.argmax(-1))  # (B,)
        if keep_distributions:
            top, coarse = coarsen_topk(lp, top_k)
            logprobs.append(coarse)
            if top is not None:
                ids.append(top.to(torch.int32))
        tokens.append(token)
        lengths += (~done).long()
        done |= token == eos_id
        previous = token[:, None]
        if bool(done.all()):
            break
    return Decoded(
        tokens=torch.stack(tokens, dim=1),  # (B, A)
        lengths=lengths,
        logprobs=torch.stack(logprobs, dim=1) if logprobs else None,  # (B, A, C)
        ids=torch.stack(ids, dim=1) if ids else None,  # (B, A, k)
    )


def cache_bytes_per_position(top_k: int | None, vocab_size: int) -> int:
    """Teacher-cache bytes per generated position: k int32 ids + (k + 1) float32 log-probs + the token.

    Args:
        top_k: Kept outcomes; None stores the full vocabulary (no ids).
        vocab_size: V.

    Returns:
        Bytes per position.

    """
    if top_k is None or top_k >= vocab_size:
        return vocab_size * PROB_BYTES + INDEX_BYTES
    return top_k * INDEX_BYTES + (top_k + 1) * PROB_BYTES + INDEX_BYTES


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> Tensor:
    """1.0 where a prediction equals its reference after stripping whitespace, else 0.0.

    Args:
        predictions: Generated answers.
        references: Reference answers.

    Returns:
        Scores, shape (B,).

    """
    pairs = zip(predictions, references, strict=True)
    return torch.tensor([float(p.strip() == r.strip()) for p, r in pairs])

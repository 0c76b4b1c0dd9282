"""Plain-PyTorch definitions of every op in wave_rt.kernels: the specification the kernels are tested against.

Each reference is written for clarity, materialises whatever it likes (the concatenated layers, the full
q x N score matrix, the full B x M logits) and works in any dtype: called on float64 inputs it is the
ground truth; called on bf16/fp16 inputs it is "the plain PyTorch path in that dtype", the baseline whose
error a fast path may exceed by at most 2x. Autograd through these functions gives the reference gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_fusion_mlp_reference(hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """GELU(concat_l(hidden[:, l]) @ w1.T + b1): hidden [B, L, D], w1 [H, L*D], b1 [H] -> [B, H] (erf GELU)."""
    concat = torch.cat(hidden.unbind(1), dim=-1)
    return F.gelu(F.linear(concat, w1, b1))


def scalar_mix_reference(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_l softmax(weights)_l * hidden[:, l]: hidden [B, L, D], weights [L] -> [B, D]."""
    p = torch.softmax(weights, dim=0).to(hidden.dtype)
    return (hidden * p.view(1, -1, 1)).sum(dim=1)


def similarity_topk_reference(queries: torch.Tensor, corpus: torch.Tensor, k: int,
                              normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of queries @ corpus.T per query row, largest first, equal scores ordered by lower corpus index.

    Materialises the full [q, N] score matrix (the point of the kernel is not to)."""
    if normalize:
        queries = F.normalize(queries, dim=-1)
        corpus = F.normalize(corpus, dim=-1)
    scores = queries @ corpus.T
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def info_nce_reference(q: torch.Tensor, d: torch.Tensor, temperature: float | torch.Tensor,
                       symmetric: bool = True, false_negative_margin: float | None = None) -> torch.Tensor:
    """InfoNCE with in-batch and extra negatives, as wave_rt.kernels.info_nce defines it (full B x M logits).

    s = q @ d.T (raw similarities, the units of the margin); row i of d is the positive of row i of q.
    q->d: mean_i [logsumexp_{j kept for i} s_ij / t  -  s_ii / t] over all M columns.
    d->q (symmetric): the same over the first B rows of d against all B rows of q, i.e. over the columns
    j < B of s, with document j's positive at query j. Final loss: their average, or q->d alone.
    Masking (margin m): in q->d, column j != i is dropped from row i when s_ij > s_ii - m; in d->q, row
    i != j is dropped from column j when s_ij > s_jj - m. The positive is never dropped.
    """
    b = q.shape[0]
    s = q @ d.T
    logits = s / temperature
    eye = torch.zeros_like(s, dtype=torch.bool)
    eye[:, :b] = torch.eye(b, dtype=torch.bool, device=s.device)
    diag = s.diagonal()[:b] if s.shape[0] else s.new_zeros(0)
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    target = torch.arange(b, device=q.device)

    row_logits = logits
    if false_negative_margin is not None:
        drop = (s > diag.unsqueeze(1) - false_negative_margin) & ~eye
        row_logits = torch.where(drop, neg_inf, logits)
    loss = F.cross_entropy(row_logits, target)
    if not symmetric:
        return loss

    col_s = s[:, :b].T  # [doc j, query i]
    col_logits = logits[:, :b].T
    if false_negative_margin is not None:
        drop = (col_s > diag.unsqueeze(1) - false_negative_margin) & ~eye[:, :b]
        col_logits = torch.where(drop, neg_inf, col_logits)
    return 0.5 * (loss + F.cross_entropy(col_logits, target))

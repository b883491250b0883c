"""RegMean (Jin et al.): the linear layer whose outputs best match every expert's on its own inputs.

For a linear weight W_k (out × in) with input Gram matrix G_k = X_kᵀX_k / #rows (in × in):
G̃_k = α·G_k + (1−α)·diag(G_k) (α = `reduce_non_diagonal_ratio`, shrinking the off-diagonal),
Wᵀ = (Σ w_k G̃_k)⁻¹ Σ w_k G̃_k W_kᵀ, solved with `torch.linalg.solve` (lstsq when singular).
Every tensor without a Gram matrix (embeddings, norms, biases — anything not a 2-D linear
weight) is the weighted average Σ w_k θ_k / Σ w_k, as in MergeLM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.merge.methods.linear import linear
from mergetune.merge.methods.registry import TensorInputs, register


def shrink_off_diagonal(gram: Tensor, ratio: float) -> Tensor:
    if ratio == 1:
        return gram
    return ratio * gram + (1 - ratio) * torch.diag_embed(torch.diagonal(gram))


def solve(lhs: Tensor, rhs: Tensor) -> Tensor:
    """lhs⁻¹·rhs; least squares when lhs is singular."""
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if info.item() != 0:
        return torch.linalg.lstsq(lhs, rhs).solution
    return solution


@register("regmean", needs_base=False, min_models=1, needs=("gram",))
def regmean(x: TensorInputs, *, reduce_non_diagonal_ratio: float = 1.0) -> Tensor:
    """Least-squares merge of linear weights from input Gram matrices; other tensors averaged."""
    if x.gram is None or x.models[0].dim() != 2:
        return linear(x, normalize=True)
    in_features = x.models[0].shape[1]
    for gram in x.gram:
        if gram.shape != (in_features, in_features):
            raise ValueError(f"{x.name}: Gram matrix {tuple(gram.shape)} does not fit a weight with {in_features} inputs")
    grams = [w * shrink_off_diagonal(g, reduce_non_diagonal_ratio) for w, g in zip(x.weights, x.gram)]
    lhs = sum(grams)
    rhs = sum(g @ m.T for g, m in zip(grams, x.models))
    return solve(lhs, rhs).T.contiguous()

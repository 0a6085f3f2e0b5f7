"""QuantEase: coordinate-descent refinement of a GPTQ solution (Behdin et al. 2023, linkedin/QuantEase).

For one linear layer with weights W (rows x cols), calibration inputs X and Hessian H = X X^T, GPTQ picks a grid
(a scale and zero per row and group) and grid values Q. QuantEase keeps the grid and lowers the layer error
||W X - Q X||^2 = tr((W - Q) H (W - Q)^T) by sweeps over the columns: each column is set to its best value given
the others, then rounded to its grid. The error is quadratic in one column with the same curvature H_jj for every
row, so the rounded value is the exact minimum over the grid: a rounded sweep never raises the error. As in the
reference code, some early sweeps leave the columns unrounded to move further; the best rounded solution is kept.
The checkpoint keeps its format (same scales, zeros and g_idx; new integer codes), GPTQ or AWQ (gptq.format).
"""
from __future__ import annotations

import contextlib
import threading

import torch

BLOCK = 128


def on_grid(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """GPTQModel's grid: scale * (clamp(round(v / scale) + zero, 0, maxq) - zero), for symmetric grids too."""
    return scale * (torch.clamp(torch.round(values / scale) + zero, 0, maxq) - zero)


def layer_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T): the share of the layer's output energy that quantization loses."""
    diff = weight - quantized
    return ((diff @ hessian) * diff).sum().item() / ((weight @ hessian) * weight).sum().item()


def rounded_sweep(sweep: int, sweeps: int) -> bool:
    """The reference's schedule: every third early sweep is unrounded; the last ones are all rounded."""
    return sweep % 3 != 1 or sweep >= 25 or sweep == sweeps - 1


def sweep_block(q: torch.Tensor, pull: torch.Tensor, target: torch.Tensor, coupling: torch.Tensor,
                scale: torch.Tensor, zero: torch.Tensor, i1: int, i2: int, maxq: int, rounded: bool) -> None:
    """Columns i1..i2 in turn. The matrices are transposed (row j holds column j): a column is contiguous."""
    for j in range(i1, i2):
        new = target[j] - pull[j]
        if rounded:
            new = on_grid(new, scale[j], zero[j], maxq)
        pull[j + 1:i2].addr_(coupling[j, j + 1:i2], new - q[j])
        q[j] = new


def refine(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor,
           zero: torch.Tensor, maxq: int, sweeps: int, damp: float = 0.0) -> tuple[torch.Tensor, float, float]:
    """QuantEase sweeps from `quantized` (on the grid given per column by `scale` and `zero`, all rows x cols).
    Returns the best rounded solution and the layer error before and after.

    `damp` adds damp * mean(diag H) to H's diagonal, as GPTQ does before it solves: the sweeps then also pay for
    moving Q away from W, which keeps them from fitting a small calibration set too closely. The errors returned
    are on the undamped H, the layer's own error on the calibration data."""
    weight, hessian = weight.float().clone(), hessian.float().clone()
    dead = hessian.diagonal() == 0  # inputs that were always zero: any value is as good; GPTQ zeroes them
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    before = layer_error(weight, quantized.float(), hessian)
    objective = hessian + damp * hessian.diagonal().mean() * torch.eye(len(hessian), device=hessian.device)
    best, best_error = quantized.float().clone(), layer_error(weight, quantized.float(), objective)

    # Column j's best value given the others: target_j - pull_j, pull_j = sum_{k != j} q_k H_kj / H_jj.
    coupling = objective / objective.diagonal()  # column j divided by H_jj
    target = (weight @ coupling).T.contiguous()
    coupling.fill_diagonal_(0)
    coupling_t = coupling.T.contiguous()
    q, scale, zero = quantized.float().T.contiguous(), scale.float().T.contiguous(), zero.float().T.contiguous()
    cols, h_diag, energy = q.shape[0], objective.diagonal().unsqueeze(1), ((weight @ objective) * weight).sum()
    pull = coupling_t @ q  # kept current by every update below
    for sweep in range(sweeps):
        rounded = rounded_sweep(sweep, sweeps)
        for i1 in range(0, cols, BLOCK):
            i2 = min(i1 + BLOCK, cols)
            old = q[i1:i2].clone()
            sweep_block(q, pull, target, coupling, scale, zero, i1, i2, maxq, rounded)
            change = q[i1:i2] - old  # the block's columns pull on the others: one matrix product per block
            pull[:i1] += coupling_t[:i1, i1:i2] @ change
            pull[i2:] += coupling_t[i2:, i1:i2] @ change
            pull[i1:i2] += coupling_t[i1:i2, i1:i2].triu(1) @ change  # in the block, later columns on earlier
        if rounded:  # ((W - Q) H)_j = (target_j - pull_j - q_j) H_jj: the error without another product
            error = (((target - pull - q) * h_diag) * (weight.T - q)).sum().item() / energy.item()
            if error < best_error:
                best, best_error = q.T.clone(), error
    return best.to(quantized.dtype), before, layer_error(weight, best, hessian)


@contextlib.contextmanager
def refining_gptq(sweeps: int, damp: float, errors: dict[str, tuple[float, float]]):
    """While active, every module GPTQModel's GPTQ quantizes is refined by QuantEase before it is packed; its
    layer error before and after goes to `errors[module name]`.

    GPTQModel has no hook between solving a module and packing it, so this wraps `GPTQ.quantize`: it keeps the
    module's Hessian and weights before GPTQ consumes them, and refines the Q that GPTQ returns with the scales,
    zeros and g_idx that it returns too.
    """
    import transformers
    from gptqmodel.quantization.gptq import GPTQ

    solve = GPTQ.quantize
    lock = threading.Lock()

    def solve_then_refine(task, *args, **kwargs):
        hessian = task.finalize_hessian(target_device=getattr(task.module, "target_device", None)).clone()
        weight = task.clone_module(copy=True, device=hessian.device)
        q, scale, zero, g_idx, *rest = solve(task, *args, **kwargs)
        conv1d = isinstance(task.module, transformers.Conv1D)  # GPT-2 style layers store W transposed
        rows_by_cols = (q.t() if conv1d else q).to(hessian.device)
        g = g_idx.long().to(hessian.device)
        refined, before, after = refine(weight, rows_by_cols.reshape(weight.shape), hessian,
                                        scale.to(hessian.device)[:, g], zero.to(hessian.device)[:, g],
                                        int(task.quantizer.maxq), sweeps, damp)
        refined = refined.to(q.device, q.dtype)
        named = task._named_module  # GPTQModel's wrapper that knows the module's dotted path in the model
        with lock:
            errors[named.full_name if named is not None else task.name] = (before, after)
        return (refined.t() if conv1d else refined).reshape(q.shape).contiguous(), scale, zero, g_idx, *rest

    GPTQ.quantize = solve_then_refine
    try:
        yield
    finally:
        GPTQ.quantize = solve

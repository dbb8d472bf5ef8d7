"""GPTQ for block-wise int4 with integer zero points: round column by column, pushing each column's rounding
error onto the columns not yet rounded, weighted by the calibration inputs' second moments H = X^T X.

Plain rounding minimizes ||W - Q|| per element; what the model feels is the output error ||(W - Q) X||, and
inputs are correlated, so one column's error can be partly cancelled by adjusting the others (Frantar et al.,
"GPTQ", 2022). Each block's scale and zero point come from the error-minimizing search of export.quant.quantize, run
on the block's columns as they stand when the block is reached (already carrying the earlier columns' error).

Shapes: W [N, K] (HF layout, rows = outputs), H [K, K] over the matmul's input channels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .calibration import each_matmul_input

DAMP = 0.01  # fraction of mean(diag H) added to the diagonal: keeps the Cholesky factor stable


def hessian_keys(config) -> dict[str, str]:
    """HF weight name -> the key of the input its matmul reads (q/k/v share one, gate/up share one).

    Not the embedding table: tied, it is also the lm_head, and GPTQ would skew its rows for the lookup.
    """
    from edge_runtime.spec import EMBED, spec_for

    return {n: u.input for u in spec_for(config).units() if u.input for n in u.names if n != EMBED}


def input_hessians(torch_model, windows: Sequence[Sequence[int]], keys: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Input key -> H = sum over calibration tokens of x x^T, float64 [K, K], one per distinct matmul input."""
    by_module = {name.removesuffix(".weight"): key for name, key in keys.items()}
    sums: dict = {}

    def add(key, x):  # x [tokens, K]
        sums[key] = sums.get(key, 0) + x.T @ x

    each_matmul_input(torch_model, windows, by_module, add)
    return {k: v.numpy() for k, v in sums.items()}


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H damped), float64 [K, K]: row j drives column j's error update."""
    h = h.astype(np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMP * float(np.mean(np.diag(h)))
    hinv = np.linalg.inv(np.linalg.cholesky(h))          # L^-1, with H = L L^T
    return np.linalg.cholesky(hinv.T @ hinv).T           # H^-1 = U^T U


def gptq_int4(w: np.ndarray, h: np.ndarray, block_size: int, search_block) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """Codes [N, K] (float, 0..15), scales [N, kb] and integer zero points [N, kb] of W under H.

    search_block(x [N, 1, bs], wt [1, bs]) -> (s [N, 1], z [N, 1]): the block parameter search.
    """
    w = np.array(w, dtype=np.float64)                    # updated in place as errors are pushed forward
    n, k = w.shape
    kb = k // block_size
    u = _inverse_cholesky(h)
    imp = np.diag(h) / max(float(np.mean(np.diag(h))), 1e-30)   # per-channel E[x^2], relative
    codes = np.empty((n, k), np.float32)
    scales = np.empty((n, kb), np.float64)
    zps = np.empty((n, kb), np.float64)
    for b in range(kb):
        c0, c1 = b * block_size, (b + 1) * block_size
        wt = np.maximum(imp[c0:c1], 1e-3).astype(np.float32)[None]
        s, z = search_block(w[:, c0:c1].astype(np.float32)[:, None, :], wt)
        s, z = s[:, 0].astype(np.float64), z[:, 0].astype(np.float64)
        inv_s = np.where(s != 0, 1.0 / np.where(s != 0, s, 1.0), 0.0)
        err = np.empty((n, block_size))
        for j in range(c0, c1):                          # one column at a time inside the block
            q = np.clip(np.rint(w[:, j] * inv_s + z), 0, 15)
            codes[:, j] = q
            e = (w[:, j] - s * (q - z)) / u[j, j]
            w[:, j + 1:c1] -= np.outer(e, u[j, j + 1:c1])
            err[:, j - c0] = e
        w[:, c1:] -= err @ u[c0:c1, c1:]                  # the block's errors onto every later column at once
        scales[:, b], zps[:, b] = s, z
    return codes, scales.astype(np.float32), zps.astype(np.float32)

"""Triton path of local attention: launchers, torch.library ops with autograd, the entry point.

Legend: B batch, H heads, T tokens, D head dim (Dv for values), M max relative distance.

Layers (each knows only the one below): kernels in triton_kernels.py; `_launch_*` check shapes and
pick tiles; `routeformer::local_attn_fwd` / `_bwd` are torch.library.custom_op ops
with fake (meta) implementations, so torch.compile keeps them in the graph as opaque calls with no
graph break (triton_op would let inductor look inside, but it cannot be traced under the CPU
interpreter, where the tests run); `register_autograd` ties them together, and eager calls skip the
dispatcher (ops/_dispatch.py); `local_attention_triton` is what the dispatcher in __init__.py calls
(already validated).
No host synchronisation: every loop bound is computed from shapes or inside the kernels.
"""
from __future__ import annotations

import math
import os

import torch

from .._checks import TRITON_DTYPES, gpu_plan
from .._dispatch import custom_op, with_autograd
from .._ints import cdiv, next_pow2
from .._launch import launch
from .triton_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_bands_kernel, _fwd_kernel

__all__ = ["local_attention_triton", "TILE_OVERRIDES"]

_LOG2E = 1.4426950408889634
_DTYPES = TRITON_DTYPES

# The Shaw backward's two by-distance buffers (P and dS) together stay under this many bytes; more
# (batch, head) rows than fit are done in chunks, one dq launch and two matmuls each. H200, T = 64k,
# H = 8, bf16 (benchmarks/local_kernel.py --dist-caps, NOTES_local.md): 1 GiB (one chunk) 6.84 ms and
# a 1348 MiB fwd+bwd peak; 256 MiB 7.02 ms and 581 MiB; 128 MiB 7.25 ms and 453 MiB.
DIST_BUFFER_BYTES = 256 << 20

# The Shaw terms, per pass ("fwd", "bwd"): False, a (BM x BAND) product and a skew gather per table and
# key tile inside every kernel; True, matmuls by distance around the kernels: q @ rel_k^T and dO @ rel_v^T
# up front (read by the kernels at column j - i), P_D @ rel_v and dS_D @ rel_k after them; the forward
# then takes two passes (the log-sum-exp, then P). The (rows, T, n_dist) buffers stay under
# DIST_BUFFER_BYTES. The two passes are independent (both give and take the same log-sum-exp), so
# either may use bands. Timing: NOTES_local.md (benchmarks/local_kernel.py rows "shaw-bands" and
# "shaw-bands-bwd").
SHAW_BANDS = {"fwd": False, "bwd": False}

# Benchmarks may set e.g. TILE_OVERRIDES["fwd"] = dict(BM=64, BN=64, num_warps=4, num_stages=3), and
# maxnreg=N for a register budget per thread.
TILE_OVERRIDES: dict[str, dict] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    # tl.dot needs every dimension >= 16; odd head dims (24, 60) are padded and masked.
    return max(16, next_pow2(n))


def _tiles(kind: str, q: torch.Tensor, has_rel: bool, bands: bool = False) -> dict:
    """Tile shape and launch settings for one kernel. Small tiles under the CPU interpreter."""
    if _interpreting() or not gpu_plan(q):
        cfg = dict(BM=16, BN=16, num_warps=4, num_stages=1)
    elif bands and q.dtype != torch.float32:
        # The Shaw kernels on precomputed bands have no band products or gathers, so they are not held
        # to 32 x 32: these are the largest tiles that compile for sm_90 with no (forward: 4) spills and
        # warpgroup MMA (Triton 3.9's ptxas, benchmarks/sm90_resources.py: dq 241 registers, dk/dv 168).
        # H200 sweep at T = 64k, D = 64 (NOTES_local.md, 2026-12-02 call 1): the forward 64 x 64 on 2
        # stages (2.01 ms; 4 other settings 2.13-2.79), the backward 2.72 ms with dk/dv on 64 x 64 and 3
        # stages against 3.71 on 32 x 64 (6 settings). That dk/dv tile was timed at head dims up to 64
        # only; wider rows keep the one the GPU tests passed with.
        cfg = {"fwd": dict(BM=64, BN=64, num_warps=4, num_stages=2),
               "dq": dict(BM=64, BN=32, num_warps=4, num_stages=2),
               "dkdv": (dict(BM=64, BN=64, num_warps=4, num_stages=3) if q.shape[-1] <= 64
                        else dict(BM=32, BN=64, num_warps=4, num_stages=2))}[kind]
    elif q.dtype == torch.float32:
        cfg = dict(BM=32, BN=32, num_warps=4, num_stages=2) if has_rel else dict(BM=64, BN=64, num_warps=4, num_stages=2)
    elif has_rel:
        # The Shaw gathers stage (BM, BAND) tiles through shared memory, so larger tiles run out of it
        # (64 x 64 at D = 128 asked for 256 KB), and 64 x 64 backward tiles spill registers heavily on
        # sm_90 (benchmarks/sm90_resources.py). H200 sweeps (NOTES_local.md, 2026-12-02): 32 x 32 on 4
        # warps everywhere is the fastest of 11 backward settings at T = 64k (5.05 ms, against 12.25 at
        # 64 x 64 and 6.24 with dq on 8 warps, which had won before dq stored P and dS by distance).
        cfg = dict(BM=32, BN=32, num_warps=4, num_stages=2)
    else:
        cfg = {"fwd": dict(BM=128, BN=64, num_warps=4, num_stages=3),
               "dq": dict(BM=128, BN=32, num_warps=4, num_stages=3),
               "dkdv": dict(BM=32, BN=128, num_warps=4, num_stages=3)}[kind]
    cfg.update(TILE_OVERRIDES.get(kind, {}))
    return cfg


def _regs(cfg: dict) -> dict:
    """The register budget per thread (ptx .maxnreg) of a tile setting, if it names one (GPU only)."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") is not None else {}


def _geometry(q: torch.Tensor, v: torch.Tensor, rel_k, flange: int, causal: bool):
    BH, T, D = q.shape[0] * q.shape[1], q.shape[2], q.shape[3]
    DV = v.shape[3]
    M = 0 if rel_k is None else (rel_k.shape[0] - 1) // 2
    return BH, T, D, DV, M, (0 if causal else flange)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k, rel_v) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' supports {_DTYPES}, got q.dtype={q.dtype}; use backend='reference'")
    if not (q.is_cuda or _interpreting()):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         "use backend='reference' or move q, k, v to a GPU")


def _dot_mode(q: torch.Tensor) -> int:
    """See triton_kernels._dot: 0 tensor cores, 1 true fp32, 2 upcast (interpreter bf16 bug)."""
    if q.dtype == torch.float32:
        return 1
    return 2 if _interpreting() and q.dtype == torch.bfloat16 else 0


def _rel_args(rel_k, rel_v, q):
    # Kernels compiled without HAS_REL never read these pointers; q stands in as a valid address.
    return (q, q) if rel_k is None else (rel_k.contiguous(), rel_v.contiguous())


@custom_op("routeformer::local_attn_fwd")
def local_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor | None, rel_v: torch.Tensor | None,
    block: int, flange: int, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, H, T, Dv) in q's dtype, lse (B, H, T) fp32 in log2 units (for the backward)."""
    BH, T, D, DV, M, FR = _geometry(q, v, rel_k, flange, causal)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    rk, rv = _rel_args(rel_k, rel_v, q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if SHAW_BANDS["fwd"] and rel_k is not None:
        return _fwd_bands(q, k, v, rel_k, rel_v, lse, block, flange, causal, scale), lse
    out = torch.empty(*q.shape[:3], DV, device=q.device, dtype=q.dtype)
    c = _tiles("fwd", q, rel_k is not None)
    BM, BN = c["BM"], c["BN"]
    launch(_fwd_kernel, (cdiv(T, BM), BH),
           q, k, v, rk, rv, out, lse,
           T, D, DV, block, flange, FR, M, scale * _LOG2E,
           CAUSAL=causal, HAS_REL=rel_k is not None, DOT=_dot_mode(q),
           BM=BM, BN=BN, BD=_pow2(D), BDV=_pow2(DV), BAND=next_pow2(BM + BN - 1),
           num_warps=c["num_warps"], num_stages=c["num_stages"], **_regs(c),
           )
    return out, lse


def _distances(block: int, flange: int, causal: bool) -> tuple[int, int]:
    """(dlo, n_dist): the distances j - i any query can see are [dlo, dlo + n_dist)."""
    FR = 0 if causal else flange
    dlo, dhi = -(block - 1 + flange), (0 if causal else block - 1 + FR)
    return dlo, dhi - dlo + 1


def _distance_rows(dlo: int, n_dist: int, M: int, device) -> torch.Tensor:
    """rows[c]: the table row of distance dlo + c (distances past M share the clipped row)."""
    return torch.arange(dlo, dlo + n_dist, device=device).clamp(-M, M) + M


def _fwd_bands(q, k, v, rel_k, rel_v, lse, block: int, flange: int, causal: bool, scale: float) -> torch.Tensor:
    """The Shaw forward with SHAW_BANDS["fwd"]: per chunk of (batch, head) rows, the band RQ = q @ rel_k^T by
    distance (one matmul), two kernel passes (the log-sum-exp, then P @ V and P by distance), and
    P_D @ rel_v by distance (one matmul) added in float32."""
    BH, T, D, DV, M, FR = _geometry(q, v, rel_k, flange, causal)
    dlo, n_dist = _distances(block, flange, causal)
    row = _distance_rows(dlo, n_dist, M, q.device)
    rk_d, rv_d = rel_k.to(q.dtype)[row], rel_v.to(q.dtype)[row]
    out32 = torch.empty(*q.shape[:3], DV, device=q.device, dtype=torch.float32)
    rows = max(1, min(BH, DIST_BUFFER_BYTES // (2 * T * n_dist * q.element_size())))  # RQ and P_D
    flat = [x.view(BH, T, -1) for x in (q, k, v, out32)] + [lse.view(BH, T)]
    c = _tiles("fwd", q, True, bands=True)
    for r0 in range(0, BH, rows):
        qc, kc, vc, oc, lsec = (x[r0:r0 + rows] for x in flat)
        n = qc.shape[0]
        rq = qc @ rk_d.t()
        p_dist = torch.zeros(n, T, n_dist, device=q.device, dtype=q.dtype)
        for pass_ in (1, 2):
            launch(_fwd_bands_kernel, (cdiv(T, c["BM"]), n),
                   qc, kc, vc, rq, p_dist, oc, lsec, T, D, DV, block, flange, FR, scale * _LOG2E, dlo, n_dist,
                   CAUSAL=causal, DOT=_dot_mode(q), BM=c["BM"], BN=c["BN"], BD=_pow2(D), BDV=_pow2(DV), PASS=pass_,
                   num_warps=c["num_warps"], num_stages=c["num_stages"], **_regs(c),
                   )
        oc += (p_dist @ rv_d).float()
        del rq, p_dist
    return out32.to(q.dtype)


@custom_op("routeformer::local_attn_bwd")
def local_attn_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    rel_k: torch.Tensor | None, rel_v: torch.Tensor | None, block: int, flange: int, causal: bool, scale: float,
    rel_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, d_rel_k, d_rel_v. The table grads (in the tables' dtype) only with rel_grads and
    tables; otherwise they are empty (0,) tensors."""
    BH, T, D, DV, M, FR = _geometry(q, v, rel_k, flange, causal)
    q, k, v, dout, out = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), out.contiguous()
    rk, rv = _rel_args(rel_k, rel_v, q)
    bands = SHAW_BANDS["bwd"] and rel_k is not None
    # The by-distance dS also gives dq its rel term when the logits come from bands.
    store_dist = (rel_grads or bands) and rel_k is not None
    # Distances any query can see: j - i in [dlo, dlo + n_dist); row: their table rows (with tables).
    dlo, n_dist = _distances(block, flange, causal)
    row = _distance_rows(dlo, n_dist, M, q.device) if rel_k is not None else None
    delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)  # written by the dq kernel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(CAUSAL=causal, HAS_REL=rel_k is not None, DOT=_dot_mode(q),
                  BD=_pow2(D), BDV=_pow2(DV))
    scalars = (T, D, DV, block, flange, FR, M, scale * _LOG2E, scale)
    c = _tiles("dq", q, rel_k is not None, bands)
    # With table grads, the dq kernel also fills two (rows, T, n_dist) buffers (P and dS by distance;
    # zeros first, since it writes only the pairs it visits): 2 x 512 MiB at T = 64k, H = 8, bf16, if
    # all rows went at once.
    # Rows of (batch, head) go in chunks that keep all of them (4 with bands) under DIST_BUFFER_BYTES.
    rows = BH
    if store_dist:
        n_buffers = 4 if bands else 2
        rows = max(1, min(BH, DIST_BUFFER_BYTES // (n_buffers * T * n_dist * q.element_size())))
    if bands:  # the tables' rows by distance, (n_dist, D) and (n_dist, DV)
        rk_d, rv_d = rel_k.to(q.dtype)[row], rel_v.to(q.dtype)[row]
    flat = [x.view(BH, T, -1) for x in (q, k, v, dout, out, dq, dk, dv)] + [lse.reshape(BH, T), delta.view(BH, T)]
    cd = _tiles("dkdv", q, rel_k is not None, bands)
    g_k = g_v = None
    for r0 in range(0, BH, rows):
        # The chunk's rows: the kernels offset every pointer by their own (batch, head) row.
        qc, kc, vc, doc, oc, dqc, dkc, dvc, lsec, deltac = (x[r0:r0 + rows] for x in flat)
        n = qc.shape[0]
        if store_dist:
            p_dist = torch.zeros(n, T, n_dist, device=q.device, dtype=q.dtype)
            ds_dist = torch.zeros(n, T, n_dist, device=q.device, dtype=q.dtype)
        else:
            p_dist = ds_dist = q  # never read: STORE_DIST is off
        if bands:
            # rq[r, i, c] = q_i . rel_k[dlo + c], rd[r, i, c] = dO_i . rel_v[dlo + c]
            rq, rd = qc @ rk_d.t(), doc @ rv_d.t()
        else:
            rq = rd = q  # never read: BANDS is off
        launch(_bwd_dq_kernel, (cdiv(T, c["BM"]), n),
               qc, kc, vc, rk, rv, doc, oc, lsec, deltac, dqc, p_dist, ds_dist, rq, rd, *scalars, dlo, n_dist, **common,
               BM=c["BM"], BN=c["BN"], BAND=next_pow2(c["BM"] + c["BN"] - 1), STORE_DIST=store_dist, BANDS=bands,
               num_warps=c["num_warps"], num_stages=c["num_stages"], **_regs(c),
               )
        if bands:
            # dq's rel term: dq_i += scale * sum_d dS[i, i + d] rel_k[d], summed in float32.
            dqc.copy_(dqc.float() + scale * (ds_dist @ rk_d).float())
            # The dk/dv kernel reads the chunk's bands, so it runs per chunk too.
            launch(_bwd_dkdv_kernel, (cdiv(T, cd["BN"]), n),
                   qc, kc, vc, rk, rv, doc, lsec, deltac, dkc, dvc, rq, rd, *scalars, dlo, n_dist, **common,
                   BM=cd["BM"], BN=cd["BN"], BAND=next_pow2(cd["BM"] + cd["BN"] - 1), BANDS=True,
                   num_warps=cd["num_warps"], num_stages=cd["num_stages"], **_regs(cd),
                   )
            del rq, rd
        if store_dist and rel_grads:
            # d rel_k[d] = scale * sum_i dS[i, i + d] q_i, d rel_v[d] = sum_i P[i, i + d] dO_i over the
            # chunk's rows: one (n_dist, rows*T) x (rows*T, D) matmul each.
            gk = (ds_dist.reshape(-1, n_dist).t() @ qc.reshape(-1, D)).float()
            gv = (p_dist.reshape(-1, n_dist).t() @ doc.reshape(-1, DV)).float()
            g_k, g_v = (gk, gv) if g_k is None else (g_k + gk, g_v + gv)
        del p_dist, ds_dist
    if not bands:
        launch(_bwd_dkdv_kernel, (cdiv(T, cd["BN"]), BH),
               q, k, v, rk, rv, dout, lse, delta, dk, dv, q, q, *scalars, dlo, n_dist, **common,
               BM=cd["BM"], BN=cd["BN"], BAND=next_pow2(cd["BM"] + cd["BN"] - 1), BANDS=False,
               num_warps=cd["num_warps"], num_stages=cd["num_stages"], **_regs(cd),
               )
    if not (store_dist and rel_grads):
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    g_k = g_k * scale
    d_rel_k = torch.zeros(rel_k.shape, device=q.device, dtype=torch.float32).index_add(0, row, g_k)
    d_rel_v = torch.zeros(rel_v.shape, device=q.device, dtype=torch.float32).index_add(0, row, g_v)
    return dq, dk, dv, d_rel_k.to(rel_k.dtype), d_rel_v.to(rel_v.dtype)


@local_attn_fwd.op.register_fake
def _fwd_fake(q, k, v, rel_k, rel_v, block, flange, causal, scale):
    return q.new_empty(*q.shape[:3], v.shape[3]), q.new_empty(q.shape[:3], dtype=torch.float32)


@local_attn_bwd.op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, rel_k, rel_v, block, flange, causal, scale, rel_grads):
    # The real op returns fresh contiguous tensors; empty_like would keep a transposed input's strides.
    if rel_grads and rel_k is not None:
        tables = rel_k.new_empty(rel_k.shape), rel_v.new_empty(rel_v.shape)
    else:
        tables = q.new_empty(0), q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *tables


def _setup_context(ctx, inputs, output):
    q, k, v, rel_k, rel_v, block, flange, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_k, rel_v, out, lse)
    ctx.args = (block, flange, causal, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    if dout is None:  # only lse (not differentiable) was used
        return (None,) * 9
    q, k, v, rel_k, rel_v, out, lse = ctx.saved_tensors
    rel_grads = rel_k is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    dq, dk, dv, d_rel_k, d_rel_v = local_attn_bwd(dout, q, k, v, out, lse, rel_k, rel_v, *ctx.args, rel_grads)
    if not rel_grads:
        d_rel_k = d_rel_v = None
    return dq, dk, dv, d_rel_k, d_rel_v, None, None, None, None


_local_attn = with_autograd(local_attn_fwd, _backward, _setup_context)


def local_attention_triton(q, k, v, *, block, flange, causal, scale, rel_k=None, rel_v=None):
    """Triton local attention; arguments already validated by `local_attention`. -> (B, H, T, Dv)."""
    if rel_k is not None:
        rel_k, rel_v = rel_k.to(q.dtype), rel_v.to(q.dtype)
    _check(q, k, v, rel_k, rel_v)
    if not (isinstance(scale, float) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float here, got {scale!r}")
    return _local_attn(q, k, v, rel_k, rel_v, block, flange, causal, scale)[0]

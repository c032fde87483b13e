"""GEMV laboratory (H200 experiments of session 7, not used by the package): how fast could the M = 1
GEMV be with the same program structure if its math cost (almost) nothing?

_gemv_loads_kernel is _gemv_wide_kernel with the same tiles, cp.async ring, split-K and epilogue, but
each word costs one FMUL instead of ~34 instructions (8 codes x (shift, LOP3, FFMA) + sums): its time
is the floor that any cheaper dequantization math can reach with this structure. Printed side by side
(same process, rotated weight copies) with the dispatcher's default, tinygemm and cuBLAS bf16.

    python benchmarks/lab/gemv_lab.py --out DIR

(Its first fp16x2 GEMV, swept with --h2 (benchmarks/results/h200/s7/run2/ at commit a566059), lived here at
commit 8991c15; it is now the
H2 math of salience/kernels/triton_int4.py's _gemv_wide_kernel, swept by int4_kernels.py --sweep-gemv.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from int4_kernels import (SWEEP_SHAPES, baseline_times, gpu_time, int4_bytes, machine_gpu,  # noqa: E402
                          sweep_operands)
from salience.kernels import triton_int4 as T  # noqa: E402

_WORDS = T._WORDS


@triton.jit
def _gemv_loads_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, ws_ptr, lock_ptr,
                       M, N, K, NP, SWB, SWR, SWU, UPG, n_units, units_per_split, stride_xm, stride_om,
                       BN: tl.constexpr, U: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    ru = tl.arange(0, U)
    rs = tl.arange(0, _WORDS)
    rn, w_rows, cols = T._tile_rows(w_ptr, pid_n, N, BN, SWB, SWR, 0)
    w_base = w_rows[:, None, None] + ru[None, :, None] * SWU + rs[None, None, :]
    x_base = x_ptr + m * stride_xm + ru[:, None] * 128 + rs[None, :]
    u_lo = pid_k * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    acc = tl.zeros([BN, U, _WORDS], dtype=tl.float32)
    for u in tl.range(u_lo, u_hi, U, num_stages=STAGES):
        uok = (u + ru) < u_hi
        words = tl.load(w_base + u * SWU, mask=uok[None, :, None], other=0)
        s16, c = T._scale_zero(tl.load(sz_ptr + ((u + ru) // UPG)[None, :] * NP + rn[:, None],
                                       mask=uok[None, :], other=0))
        x0 = tl.load(x_base + u * 128, mask=uok[:, None], other=0.0).to(tl.float32)
        acc += (words & 0x3FFFFFFF).to(tl.float32, bitcast=True) * x0[None, :, :] + s16[:, :, None]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    rm = m + tl.arange(0, 1)
    T._epilogue(out, rm, rn, cols, m * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(1), M, N,
                NP, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, ws_ptr, lock_ptr, stride_om, 0, False, False,
                0, False, SPLIT)


def loads_only(x2, p, *, block_n=128, wide=1, waves=2, stages=3, num_warps=4):
    m, k = x2.shape
    np_, n_units, strides = T._w_geometry(p)
    _, upg = T._geometry(p)
    out = torch.empty(m, p.n, device=x2.device, dtype=x2.dtype)
    tiles = np_ // block_n
    n_split, ups = T._split(tiles * m, n_units, wide, T._n_sms(x2), None, waves)
    ws = torch.empty(n_split, m, np_, device=x2.device, dtype=torch.float32) if n_split > 1 else out
    return _gemv_loads_kernel[(tiles, n_split, m)](
        x2, p.qweight, p.scales, out, ws, p.locks, m, p.n, k, np_, *strides, upg, n_units, ups,
        x2.stride(0), out.stride(0), BN=block_n, U=wide, SPLIT=n_split > 1, STAGES=stages,
        num_warps=num_warps, num_stages=1)


def regs(kernel):
    """{config key: (registers, spills)} of a JIT function's compiled variants."""
    out = {}
    for cache in kernel.device_caches.values():
        for i, ck in enumerate(cache[0].values()):
            out[f"{i}: {ck.metadata.num_warps} warps"] = (getattr(ck, "n_regs", None), getattr(ck, "n_spills", None))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for k, n in SWEEP_SHAPES:
        awq, ps, ws, tgs = sweep_operands(k, n, l2)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        byt = int4_bytes(n, k, 1)
        base = baseline_times(x, ws, tgs)
        base["default"], _ = gpu_time([lambda p=p: T.gemv(x, p) for p in ps], target_s=0.01)
        bn, u, wv, st, _, _ = T._gemv_config(T._w_geometry(ps[0])[0], k, h2=False)  # run1: the fp32 math's
        res = {"k": k, "n": n, "default_cfg": [bn, u, wv, st]}
        for name, cfg in [("loads_default_cfg", dict(block_n=bn, wide=u, waves=wv, stages=st)),
                          ("loads_u1_w2", dict(wide=1, waves=2)), ("loads_u2_w4", dict(wide=2, waves=4)),
                          ("loads_u1_w4", dict(wide=1, waves=4)), ("loads_u2_w2", dict(wide=2, waves=2)),
                          ("loads_u1_w8", dict(wide=1, waves=8))]:
            t, _ = gpu_time([lambda p=p: loads_only(x, p, **cfg) for p in ps], target_s=0.01)
            base[name] = t
        res["us"] = {a: b * 1e6 for a, b in base.items()}
        res["tbs"] = {a: byt / b / 1e12 for a, b in base.items()}
        rows.append(res)
        print(f"K={k} N={n}: " + " ".join(f"{a} {b * 1e6:.1f}us" for a, b in base.items()), flush=True)
        del ps, ws, tgs, awq
        torch.cuda.empty_cache()
    rows.append({"regs_wide": regs(T._gemv_wide_kernel), "regs_loads": regs(_gemv_loads_kernel)})
    print(json.dumps(rows[-1], indent=0))
    (args.out / "gemv_lab.json").write_text(json.dumps({"machine": machine_gpu(), "rows": rows}, indent=0))


if __name__ == "__main__":
    main()

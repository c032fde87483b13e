"""GEMV laboratory (H200 experiments of session 7, not used by the package): how fast could the M = 1
GEMV be with the same program structure if its math cost (almost) nothing?

_gemv_loads_kernel is _gemv_wide_kernel with the same tiles, cp.async ring, split-K and epilogue, but
each word costs one FMUL instead of ~34 instructions (8 codes x (shift, LOP3, FFMA) + sums): its time
is the floor that any cheaper dequantization math can reach with this structure. Printed side by side
(same process, rotated weight copies) with the dispatcher's default, tinygemm and cuBLAS bf16.

    python benchmarks/lab/gemv_lab.py --out DIR
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


H2_CFGS = [dict(wide=u, waves=wv, stages=st, num_warps=nw)
           for u, wv, st, nw in [(1, 2, 3, 4), (1, 4, 3, 4), (2, 2, 3, 4), (2, 4, 3, 4), (2, 6, 3, 4), (1, 6, 3, 4),
                                 (1, 4, 3, 2), (2, 4, 3, 2), (4, 2, 3, 4), (2, 4, 4, 4), (1, 8, 3, 4)]]


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def h2_sweep(out_dir):
    """_gemv_h2_kernel over H2_CFGS against the dispatcher's default (fp32 math), fp16 and bf16 x, with
    the error against the default's output; then x scaled by 1e3 and 1e-4 on one shape (overflow and
    subnormal guard)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for k, n in SWEEP_SHAPES:
        awq, ps, ws, tgs = sweep_operands(k, n, l2)
        byt = int4_bytes(n, k, 1)
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(1, k, device="cuda", dtype=dt)
            ref = T.gemv(x, ps[0])
            t_def, _ = gpu_time([lambda p=p: T.gemv(x, p) for p in ps], target_s=0.01)
            best = None
            res = {"k": k, "n": n, "dtype": str(dt), "default_us": t_def * 1e6, "cfgs": []}
            for cfg in H2_CFGS:
                _, y = gemv_h2(x, ps[0], **cfg)
                t, _ = gpu_time([lambda p=p: gemv_h2(x, p, **cfg) for p in ps], target_s=0.01)
                res["cfgs"].append({"cfg": cfg, "us": t * 1e6, "rel_err": rel_err(y, ref)})
                if best is None or t < best[0]:
                    best = (t, cfg, rel_err(y, ref))
            rows.append(res)
            print(f"K={k} N={n} {dt}: default {t_def * 1e6:.1f} us ({byt / t_def / 1e12:.2f} TB/s) | h2 best "
                  f"{best[0] * 1e6:.1f} us ({byt / best[0] / 1e12:.2f} TB/s) {best[1]} err {best[2]:.1e} | "
                  f"x default {t_def / best[0]:.2f}", flush=True)
        if k == 4096 and n == 12288:
            for mag in (1e3, 1e-4, 3e4):
                x = (torch.randn(1, k, device="cuda") * mag).to(torch.float16)
                x[0, 7] = mag * 20 if mag * 20 < 6e4 else 6e4
                ref = x.float() @ T.dequantize(ps[0], torch.float16).float().T
                _, y = gemv_h2(x, ps[0])
                rows.append({"k": k, "n": n, "x_scale": mag, "rel_err_vs_fp32": rel_err(y, ref),
                             "finite": bool(torch.isfinite(y).all())})
                print(rows[-1], flush=True)
        del ps, ws, tgs, awq
        torch.cuda.empty_cache()
    rows.append({"regs_h2": regs(_gemv_h2_kernel)})
    print(json.dumps(rows[-1]))
    (out_dir / "gemv_h2.json").write_text(json.dumps({"machine": machine_gpu(), "rows": rows}, indent=0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--h2", action="store_true", help="the fp16x2 GEMV sweep instead")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.h2:
        return h2_sweep(args.out)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for k, n in SWEEP_SHAPES:
        awq, ps, ws, tgs = sweep_operands(k, n, l2)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        byt = int4_bytes(n, k, 1)
        base = baseline_times(x, ws, tgs)
        base["default"], _ = gpu_time([lambda p=p: T.gemv(x, p) for p in ps], target_s=0.01)
        bn, u, wv, st, _ = T._gemv_config(T._w_geometry(ps[0])[0], k)
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemv_lab.json").write_text(json.dumps({"machine": machine_gpu(), "rows": rows}, indent=0))



# ------------------------------------------------------------------ fp16x2 math (session 7 experiment)
# Per 4 words of one row-unit (pack=4): nibbles (j, j + 4) of a word become the fp16 pair 1024 + q of one
# register (LOP3 with 0x000F000F, 0x64006400), nibbles (j + 1, j + 5) the pair 1024 + 16 q (mask
# 0x00F000F0), so one shift by 8 serves four nibble pairs; subtracting the row's 1024 + z (or 1024 + 16 z)
# gives q - z (16 (q - z)) exactly; times the x' pair (x'[16t + s], x'[16(t + 4) + s]), summed in
# fp16x2 over the 4 words (x' = x scaled by a power of two so that |x'| < 1: no overflow, sums <= 2000);
# the fp16 sum leaves as one fp32 in the first of the 4 outputs (the others 0).
_H2_WORD = """
lop3.b32 t0, $W, msk, mag, 0xea;
lop3.b32 t1, $W, msk16, mag, 0xea;
shr.b32 sh, $W, 8;
lop3.b32 t2, sh, msk, mag, 0xea;
lop3.b32 t3, sh, msk16, mag, 0xea;
sub.f16x2 t0, t0, $M1;
sub.f16x2 t1, t1, $M16;
sub.f16x2 t2, t2, $M1;
sub.f16x2 t3, t3, $M16;
"""


def _h2_asm():
    body = ["{", ".reg .b32 t0, t1, t2, t3, sh, acc, acc16, msk, msk16, mag, sc;", ".reg .b16 lo, hi;",
            ".reg .f32 f0, f1;", "mov.b32 msk, 0x000F000F;", "mov.b32 msk16, 0x00F000F0;",
            "mov.b32 mag, 0x64006400;"]
    for j in range(4):
        w = _H2_WORD.replace("$W", f"${4 + j}").replace("$M16", "$28").replace("$M1", "$24")
        body.append(w)
        x = [f"${8 + 4 * t + j}" for t in range(4)]  # xp_t of word j
        if j == 0:
            body += [f"mul.rn.f16x2 acc, t0, {x[0]};", f"fma.rn.f16x2 acc, t2, {x[2]}, acc;",
                     f"mul.rn.f16x2 acc16, t1, {x[1]};", f"fma.rn.f16x2 acc16, t3, {x[3]}, acc16;"]
        else:
            body += [f"fma.rn.f16x2 acc, t0, {x[0]}, acc;", f"fma.rn.f16x2 acc, t2, {x[2]}, acc;",
                     f"fma.rn.f16x2 acc16, t1, {x[1]}, acc16;", f"fma.rn.f16x2 acc16, t3, {x[3]}, acc16;"]
    body += ["mov.b32 sc, 0x2C002C00;", "fma.rn.f16x2 acc, acc16, sc, acc;", "mov.b32 {lo, hi}, acc;",
             "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;", "add.f32 $0, f0, f1;", "mov.b32 $1, 0;",
             "mov.b32 $2, 0;", "mov.b32 $3, 0;", "}"]
    return "\n".join(body)


H2_ASM = tl.constexpr(_h2_asm())
H2_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 28))


@triton.jit
def _pair(a, b):
    """fp16 tensors a, b -> int32 holding (a low, b high)."""
    lo = a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = b.to(tl.int16, bitcast=True).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _xs(ptrs, mask, scale):
    """x' = x * scale as fp16 (scale a power of two: exact but for fp16 subnormals); fp16 x is scaled in
    fp16 (HMUL2), others through fp32."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if x.dtype == tl.float16:
        return x * scale.to(tl.float16)
    return (x.to(tl.float32) * scale).to(tl.float16)


@triton.jit
def _gemv_h2_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, ws_ptr, lock_ptr,
                    M, N, K, NP, SWB, SWR, SWU, UPG, n_units, units_per_split, stride_xm, stride_om,
                    BN: tl.constexpr, U: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr,
                    XB: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    ru = tl.arange(0, U)
    rs = tl.arange(0, _WORDS)
    rn, w_rows, cols = T._tile_rows(w_ptr, pid_n, N, BN, SWB, SWR, 0)
    w_base = w_rows[:, None, None] + ru[None, :, None] * SWU + rs[None, None, :]  # [BN, U, 16]
    x_row = x_ptr + m * stride_xm
    x_base = x_row + ru[:, None] * 128 + rs[None, :]  # [U, 16]
    u_lo = pid_k * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    # x' = x * 2^(126 - E), E = the biased exponent of max |x| over this program's K range: |x'| < 1
    xr = u_lo * 128 + tl.arange(0, XB)
    amax = tl.max(tl.abs(tl.load(x_row + xr, mask=xr < u_hi * 128, other=0.0).to(tl.float32)), axis=0)
    e = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 112), 252)
    scale = ((253 - e) << 23).to(tl.float32, bitcast=True)
    unscale = ((e + 1) << 23).to(tl.float32, bitcast=True)
    acc = tl.zeros([BN, U, _WORDS], dtype=tl.float32)
    for u in tl.range(u_lo, u_hi, U, num_stages=STAGES):
        uok = (u + ru) < u_hi  # [U]
        words = tl.load(w_base + u * SWU, mask=uok[None, :, None], other=0)
        sz = tl.load(sz_ptr + ((u + ru) // UPG)[None, :] * NP + rn[:, None], mask=uok[None, :], other=0)
        s = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)  # [BN, U]
        z = (sz >> 16) & 0xF
        m1 = (0x6400 | z) * 0x10001
        m16 = (0x6400 | (z << 4)) * 0x10001
        xb = x_base + u * 128
        xo = uok[:, None]
        xp0 = _pair(_xs(xb, xo, scale), _xs(xb + 64, xo, scale))
        xp1 = _pair(_xs(xb + 16, xo, scale), _xs(xb + 80, xo, scale))
        xp2 = _pair(_xs(xb + 32, xo, scale), _xs(xb + 96, xo, scale))
        xp3 = _pair(_xs(xb + 48, xo, scale), _xs(xb + 112, xo, scale))
        zz = tl.zeros([BN, U, _WORDS], dtype=tl.int32)
        r = tl.inline_asm_elementwise(
            H2_ASM, H2_CONSTRAINTS,
            [words, zz + xp0[None, :, :], zz + xp1[None, :, :], zz + xp2[None, :, :], zz + xp3[None, :, :],
             zz + m1[:, :, None], zz + m16[:, :, None]],
            dtype=tl.float32, is_pure=True, pack=4)
        acc += r * s[:, :, None]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :] * unscale
    rm = m + tl.arange(0, 1)
    T._epilogue(out, rm, rn, cols, m * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(1), M, N,
                NP, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, ws_ptr, lock_ptr, stride_om, 0, False, False,
                0, False, SPLIT)


def gemv_h2(x2, p, *, block_n=128, wide=1, waves=2, stages=3, num_warps=4):
    m, k = x2.shape
    np_, n_units, strides = T._w_geometry(p)
    _, upg = T._geometry(p)
    out = torch.empty(m, p.n, device=x2.device, dtype=x2.dtype)
    tiles = np_ // block_n
    n_split, ups = T._split(tiles * m, n_units, wide, T._n_sms(x2), None, waves)
    ws = torch.empty(n_split, m, np_, device=x2.device, dtype=torch.float32) if n_split > 1 else out
    return _gemv_h2_kernel[(tiles, n_split, m)](
        x2, p.qweight, p.scales, out, ws, p.locks, m, p.n, k, np_, *strides, upg, n_units, ups,
        x2.stride(0), out.stride(0), BN=block_n, U=wide, SPLIT=n_split > 1, STAGES=stages,
        XB=triton.next_power_of_2(ups * 128), num_warps=num_warps, num_stages=1), out


if __name__ == "__main__":
    main()

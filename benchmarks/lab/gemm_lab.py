"""GEMM laboratory (M = 2..64, group size 128): the production _gemm_kernel against variants that decode two
codes per instruction and feed the tensor cores one K = 32 or K = 128 slice at a time.

Production (_gemm_kernel, PER_GROUP at BM = 16): 8 dots a unit, each on a [BN, 16] slice of codes made
16-bit floats B + q with 3 integer ops a code, and a wgmma wait after every dot (A sits in registers).

Variant "pair" (this file): per word, one shift and one LOP3 give a 32-bit pair of 16-bit floats
(B + n_j, B + n_{j+4}) (nibbles j and j + 4 of the word, k = 16 j + s and 16 (j + 4) + s):

    (w >> 4j) & 0x000F000F | M  ->  lo half B + n_j, hi half B + n_{j+4}      (M = 0x43004300 bf16, 0x64006400 fp16)

The pair's halves become adjacent columns of the A tile (join + reshape), which is what an MMA register
holds (two adjacent k), so the dot sees K in a permuted order; x is gathered in the same order (its
column index built by the same join / reshape of the k index). KS = 32: four dots of K = 32 a unit;
KS = 128: one dot of K = 128 (one wait a unit). The sum is the same (permuting k does not change a dot).

Since commit 8a23aa7 the GPU layout itself stores nibbles j and j + 4 as adjacent k (layout.py), so x needs
no permutation and "pz" on natural x is the production GEMM's decode; the "pair" variant and xperm() assume
the layout before it (h200/s10/run1 measured them at d320148) and are kept only as the record of that run.

Run on the GPU: python benchmarks/lab/gemm_lab.py [--out DIR]; on CPU: TRITON_INTERPRET=1 ... --check.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from salience.kernels import triton_int4 as T  # noqa: E402
from salience.kernels.triton_int4 import _epilogue, _sz_fields, _w_rows  # noqa: E402


@triton.jit
def _halves(p, dt: tl.constexpr):
    """int32 pairs -> (low half, high half) as 16-bit floats of dtype dt."""
    lo = p.to(tl.int16).to(dt, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(dt, bitcast=True)
    return lo, hi


@triton.jit
def _pair_tile(words, j: tl.constexpr, dt: tl.constexpr, BN: tl.constexpr):
    """[BN, 32] codes B + q of nibbles j (even columns) and j + 4 (odd columns) of words [BN, 16]."""
    if dt == tl.bfloat16:
        p = ((words >> (4 * j)) & 0x000F000F) | 0x43004300
    else:
        p = ((words >> (4 * j)) & 0x000F000F) | 0x64006400
    lo, hi = _halves(p, dt)
    return tl.join(lo, hi).reshape(BN, 32)


@triton.jit
def _pair_k(j: tl.constexpr):
    """The k (within a unit) of each column of _pair_tile(., j): [32]."""
    s = tl.arange(0, 16)
    return tl.join(16 * j + s, 16 * (j + 4) + s).reshape(32)


@triton.jit
def _gemm_pair_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                      M, N, K, NP, SWB, SWR, SWU, UPG, n_units, units_per_split, stride_xm, stride_om,
                      BM: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rs = tl.arange(0, 16)
    w_base = _w_rows(w_ptr, pid_n, BN, SWB, SWR)[:, None] + rs[None, :]  # [BN, 16]
    m_ok = rm[:, None] < M
    u_lo = pid_k * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    dt: tl.constexpr = x_ptr.dtype.element_ty
    B: tl.constexpr = 128.0 if dt == tl.bfloat16 else 1024.0
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    if KS == 128:
        kk = tl.join(tl.join(_pair_k(0), _pair_k(1)), tl.join(_pair_k(2), _pair_k(3))).reshape(128)
    for u in range(u_lo, u_hi):
        words = tl.load(w_base + u * SWU)  # [BN, 16] int32
        sz = tl.load(sz_ptr + (u // UPG) * NP + rn)
        xrow = x_ptr + rm[:, None] * stride_xm + u * 128
        if KS == 128:
            a = tl.join(tl.join(_pair_tile(words, 0, dt, BN), _pair_tile(words, 1, dt, BN)),
                        tl.join(_pair_tile(words, 2, dt, BN), _pair_tile(words, 3, dt, BN))).reshape(BN, 128)
            xt = tl.load(xrow + kk[None, :], mask=m_ok, other=0.0)  # [BM, 128], permuted like a's columns
            if DOT_F32:
                part = tl.dot(a.to(tl.float32), tl.trans(xt.to(tl.float32)))
            else:
                part = tl.dot(a, tl.trans(xt))
            xs = tl.sum(xt.to(tl.float32), axis=1)
        else:
            for j in tl.static_range(4):
                a = _pair_tile(words, j, dt, BN)
                xt = tl.load(xrow + _pair_k(j)[None, :], mask=m_ok, other=0.0)  # [BM, 32]
                if DOT_F32:
                    a = a.to(tl.float32)
                    xd = xt.to(tl.float32)
                else:
                    xd = xt
                if j == 0:
                    part = tl.dot(a, tl.trans(xd))
                    xs = tl.sum(xt.to(tl.float32), axis=1)
                else:
                    part = tl.dot(a, tl.trans(xd), part)
                    xs += tl.sum(xt.to(tl.float32), axis=1)
        s, z = _sz_fields(sz)
        acc += part * s[:, None] - ((z.to(tl.float32) + B) * s)[:, None] * xs[None, :]
    tile = pid_m * tl.num_programs(0) + pid_n
    _epilogue(tl.trans(acc), rm, rn, rn, tile, pid_k, tl.num_programs(2), M, N, NP, b_ptr, out_ptr, out_ptr,
              out_ptr, out_ptr, ws_ptr, lock_ptr, stride_om, 0, HAS_BIAS, False, 0, False, SPLIT)


# Variant "pz": the pair decode plus the zero point subtracted in the same 16-bit float pair, so the tensor cores
# multiply exact q - z (|q - z| <= 15) and no per-token x sum is needed:
#     shr t, w, 4j ; lop3 t, t, 0x000F000F, M, 0xea (= t & mask | M) ; sub.{bf16,f16}x2 a, t, (B + z, B + z)
# x is read pre-permuted (xperm below: the order a weight layout with adjacent k in nibbles j, j + 4 would give),
# so its [BM, 32] slices are contiguous loads that Triton pipelines.
_PZ_BF16 = tl.constexpr("""{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xea; sub.rn.bf16x2 $0, t, $2; }""")
_PZ_F16 = tl.constexpr("""{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xea; sub.rn.f16x2 $0, t, $2; }""")


@triton.jit
def _pz_tile(words, zz, z, j: tl.constexpr, dt: tl.constexpr, BN: tl.constexpr, EMULATE: tl.constexpr):
    """[BN, 32] exact q - z of nibbles j (even columns) and j + 4 (odd columns); zz the pair (B + z, B + z)."""
    if EMULATE:
        lo = (((words >> (4 * j)) & 0xF) - z).to(tl.float32)  # (the interpreter's bf16 casts of ints are off)
        hi = (((words >> (4 * j + 16)) & 0xF) - z).to(tl.float32)
    else:
        w = words >> (4 * j) if j > 0 else words
        if dt == tl.bfloat16:
            p = tl.inline_asm_elementwise(_PZ_BF16, "=r,r,r", [w, zz], dtype=tl.int32, is_pure=True, pack=1)
        else:
            p = tl.inline_asm_elementwise(_PZ_F16, "=r,r,r", [w, zz], dtype=tl.int32, is_pure=True, pack=1)
        lo, hi = _halves(p, dt)
    return tl.join(lo, hi).reshape(BN, 32)


@triton.jit
def _gemm_pz_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                    M, N, K, NP, SWB, SWR, SWU, UPG, n_units, units_per_split, stride_xm, stride_om,
                    BM: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                    EMULATE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rs = tl.arange(0, 16)
    r32 = tl.arange(0, 32)
    w_base = _w_rows(w_ptr, pid_n, BN, SWB, SWR)[:, None] + rs[None, :]  # [BN, 16]
    m_ok = rm[:, None] < M
    u_lo = pid_k * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    dt: tl.constexpr = x_ptr.dtype.element_ty
    MAG: tl.constexpr = 0x4300 if dt == tl.bfloat16 else 0x6400
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for u in range(u_lo, u_hi):
        words = tl.load(w_base + u * SWU)  # [BN, 16] int32
        sz = tl.load(sz_ptr + (u // UPG) * NP + rn)
        s, z = _sz_fields(sz)
        zz = ((MAG | z) * 0x10001)[:, None]  # [BN, 1]
        xrow = x_ptr + rm[:, None] * stride_xm + u * 128 + r32[None, :]
        for j in tl.static_range(4):
            a = _pz_tile(words, zz, z[:, None], j, dt, BN, EMULATE)
            xj = tl.load(xrow + 32 * j, mask=m_ok, other=0.0)  # [BM, 32]
            if EMULATE:
                xj = xj.to(tl.float32)
            if j == 0:
                part = tl.dot(a, tl.trans(xj))
            else:
                part = tl.dot(a, tl.trans(xj), part)
        acc += part * s[:, None]
    tile = pid_m * tl.num_programs(0) + pid_n
    _epilogue(tl.trans(acc), rm, rn, rn, tile, pid_k, tl.num_programs(2), M, N, NP, b_ptr, out_ptr, out_ptr,
              out_ptr, out_ptr, ws_ptr, lock_ptr, stride_om, 0, HAS_BIAS, False, 0, False, SPLIT)


def xperm(x2):
    """x [M, K] with each unit's 128 columns in the order of _pz_tile's columns, j by j:
    column 32 j + 2 s + h <- k = 16 (j + 4 h) + s."""
    c = torch.arange(128)
    j, s, h = c // 32, (c % 32) // 2, c % 2
    perm = (16 * (j + 4 * h) + s).to(x2.device)
    m, k = x2.shape
    return x2.view(m, k // 128, 128)[:, :, perm].reshape(m, k).contiguous()


def gemm_pz(xp, p, *, block_m=None, split=None, num_warps=4, num_stages=3):
    """xp: xperm(x)."""
    m, k = xp.shape
    np_, n_units, strides = T._w_geometry(p)
    sub, upg = T._geometry(p)
    assert sub == 1 and k % 128 == 0, "lab: group sizes that are multiples of 128"
    bm, bn, _, _, cap = T._gemm_config(m, k)
    bm = block_m or bm
    out = torch.empty(m, p.n, device=xp.device, dtype=xp.dtype)
    tn, tm = np_ // bn, triton.cdiv(m, bm)
    n_split, ups = T._split(tn * tm, n_units, 1, T._n_sms(xp), split, cap=cap)
    _gemm_pz_kernel[(tn, tm, n_split)](
        *T._launch_args(xp, p, None, out, n_split, m, np_),
        m, p.n, k, np_, *strides, upg, n_units, ups, xp.stride(0), out.stride(0),
        BM=bm, BN=bn, HAS_BIAS=False, SPLIT=n_split > 1, EMULATE=T._interpreted(),
        num_warps=num_warps, num_stages=num_stages)
    return out


def gemm_pair(x2, p, *, ks=128, block_m=None, split=None, num_warps=4, num_stages=3):
    m, k = x2.shape
    np_, n_units, strides = T._w_geometry(p)
    sub, upg = T._geometry(p)
    assert sub == 1 and k % 128 == 0, "lab: group sizes that are multiples of 128"
    bm, bn, _, _, cap = T._gemm_config(m, k)
    bm = block_m or bm
    out = torch.empty(m, p.n, device=x2.device, dtype=x2.dtype)
    tn, tm = np_ // bn, triton.cdiv(m, bm)
    n_split, ups = T._split(tn * tm, n_units, 1, T._n_sms(x2), split, cap=cap)
    _gemm_pair_kernel[(tn, tm, n_split)](
        *T._launch_args(x2, p, None, out, n_split, m, np_),
        m, p.n, k, np_, *strides, upg, n_units, ups, x2.stride(0), out.stride(0),
        BM=bm, BN=bn, KS=ks, HAS_BIAS=False, SPLIT=n_split > 1, DOT_F32=T._interpreted(),
        num_warps=num_warps, num_stages=num_stages)
    return out


def _cases(dev, shapes, ms, dtypes, seed=0):
    """(name, x, PackedInt4, reference out) per shape, M and dtype; the reference is the production GEMM."""
    from benchmarks.int4_kernels import random_awq
    from salience.kernels.linear import PackedInt4
    for (name, k, n) in shapes:
        qw, qz, sc = random_awq(k, n, 128, dev)
        p = PackedInt4.for_triton(qw, qz, sc, 128)
        for dt in dtypes:
            for m in ms:
                x = torch.randn(m, k, device=dev, generator=torch.Generator(device=dev).manual_seed(seed)).to(dt)
                yield name, x, p


def check():
    """Interpreter (or GPU) check: every variant equals the production GEMM within fp32 summation-order noise."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [("small", 256, 256), ("odd", 384, 384)]
    worst = 0.0
    for name, x, p in _cases(dev, shapes, (1, 3, 16, 20), (torch.float16, torch.bfloat16)):
        ref = T.gemm(x, p).float()
        for label, y in (("pz", gemm_pz(x, p)),):
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            print(f"{name} M={x.shape[0]} {x.dtype} {label}: max rel err {err:.2e}", flush=True)
            assert err < 2e-2, err
    print(f"check passed, worst {worst:.2e}")


def bench(out):
    from benchmarks.int4_kernels import copy_packed, gpu_time, n_copies, int4_bytes
    dev = "cuda"
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    shapes = [("7B qkv", 4096, 12288), ("7B o", 4096, 4096), ("7B gate_up", 4096, 22016), ("7B down", 11008, 4096),
              ("8B qkv", 4096, 6144)]
    rows = []
    for name, x, p in _cases(dev, shapes, (2, 4, 8, 16, 32, 64), (torch.bfloat16,)):
        m, k = x.shape
        ref = T.gemm(x, p).float()
        copies = [p] + [copy_packed(p) for _ in range(n_copies(int4_bytes(p.n, k, m), l2) - 1)]
        r = {"shape": name, "M": m, "dtype": str(x.dtype).split(".")[-1]}
        r["prod_us"] = gpu_time([lambda q=q: T.gemm(x, q) for q in copies])[0] * 1e6
        r["dense_us"] = gpu_time([lambda w=torch.randn(p.n, k, device=dev, dtype=x.dtype): torch.nn.functional.linear(x, w)
                                  for _ in range(len(copies))])[0] * 1e6
        variants = {f"pz_w{nw}_s{ns}": lambda q, nw=nw, ns=ns: gemm_pz(x, q, num_warps=nw, num_stages=ns)
                    for nw in (4, 8) for ns in (3, 4)}
        for key, fn in variants.items():
            if True:
                try:
                    y = fn(p).float()
                    r[key + "_err"] = ((y - ref).abs().max() / ref.abs().max()).item()
                    r[key + "_us"] = gpu_time([lambda q=q, fn=fn: fn(q) for q in copies])[0] * 1e6
                except Exception as e:  # a config that does not compile is reported, not fatal
                    r[key + "_us"] = float("nan")
                    print(f"  {key}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        rows.append(r)
        mine = {kk[:-3]: v for kk, v in r.items() if kk.endswith("_us") and kk[:-3] in variants}
        best = min((v, kk) for kk, v in mine.items() if v == v)
        print(f"{name:12s} M={m:3d} {r['dtype']}: prod {r['prod_us']:.1f} us, dense {r['dense_us']:.1f}, "
              + ", ".join(f"{kk} {v:.1f}" for kk, v in mine.items())
              + f"; best {best[1]} x{r['prod_us'] / best[0]:.2f} prod, x{r['dense_us'] / best[0]:.2f} dense", flush=True)
        del copies
        if out:
            _save(out, rows)


def _save(out, rows):
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gemm_lab.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "triton": triton.__version__,
                                                       "rows": rows}, indent=1))


def m1(out):
    """M = 1: the production GEMV against the production GEMM forced to one token (7B/8B shapes, bf16)."""
    from benchmarks.int4_kernels import copy_packed, gpu_time, n_copies, int4_bytes
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    shapes = [("7B qkv", 4096, 12288), ("7B o", 4096, 4096), ("7B gate_up", 4096, 22016), ("7B down", 11008, 4096),
              ("8B qkv", 4096, 6144), ("8B gate_up", 4096, 28672), ("8B down", 14336, 4096)]
    rows = []
    for name, x, p in _cases("cuda", shapes, (1,), (torch.bfloat16,)):
        k = x.shape[1]
        copies = [p] + [copy_packed(p) for _ in range(n_copies(int4_bytes(p.n, k, 1), l2) - 1)]
        r = {"shape": name, "gemv_us": gpu_time([lambda q=q: T.gemv(x, q) for q in copies])[0] * 1e6,
             "gemm_us": gpu_time([lambda q=q: T.gemm(x, q) for q in copies])[0] * 1e6}
        rows.append(r)
        print(f"M=1 {name:12s}: GEMV {r['gemv_us']:.1f} us, GEMM {r['gemm_us']:.1f} us", flush=True)
        del copies
    if out:
        (out / "gemm_lab_m1.json").write_text(json.dumps(rows, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="correctness only (small shapes)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--m1", action="store_true", help="only M = 1: GEMV against GEMM (production kernels)")
    a = ap.parse_args()
    if a.m1:
        return m1(a.out)
    check()
    if torch.cuda.is_available() and not a.check:
        bench(a.out)


if __name__ == "__main__":
    main()

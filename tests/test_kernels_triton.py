"""The Triton kernels (salience/kernels/triton_int4.py) against the spec, every kernel over many shapes.

With CUDA they run compiled, over larger shapes. Without CUDA they run in Triton's interpreter, which
must be switched on (TRITON_INTERPRET=1) before triton is first imported, and which then changes how
every Triton kernel in the process behaves. So on a machine without CUDA this file, collected in an
ordinary pytest process, holds one test that runs the file again in a child process with
TRITON_INTERPRET=1; the child runs the cases. That cannot depend on test order, and leaves other
tests' processes alone. triton must be installed: without it the child fails, and so does that test
(it never skips).
"""

import itertools
import os
import random

import pytest
import torch

try:
    from interpreter import rerun_under_interpreter
except ImportError:  # tests/ imported as a package
    from tests.interpreter import rerun_under_interpreter

from salience.kernels import PackedInt4, dequantize_awq, int4_linear
try:
    from test_kernels import awq_linear, rel_err, spec64
except ImportError:  # tests/ imported as a package
    from tests.test_kernels import awq_linear, rel_err, spec64

CUDA = torch.cuda.is_available()
RUN_HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"

if RUN_HERE:
    import triton  # noqa: F401  (missing triton is a failure, on purpose)

    from salience.kernels import triton_int4 as T

    assert CUDA or T._interpreted()


def test_triton_kernels_in_interpreter():
    """Without CUDA: this file's cases in a child process under Triton's interpreter."""
    if not RUN_HERE:
        print(rerun_under_interpreter(__file__))


DEV = "cuda" if CUDA else "cpu"
F16, BF16 = torch.float16, torch.bfloat16
# the interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest even)
TOL = {F16: 1.5e-3, BF16: 6e-3 if CUDA else 1.5e-2}


def pick(small, full):
    return full if CUDA else small


def sample(cases, n):
    """A fixed sample of a large product of cases (each distinct kernel variant costs a compile)."""
    return random.Random(0).sample(cases, min(n, len(cases)))


_cache = {}


def packed(n, k, gs):
    """(PackedInt4 in the Triton layout on DEV, AWQ tensors on CPU), cached per shape."""
    if (n, k, gs) not in _cache:
        awq = awq_linear(n, k, gs, seed=n * 7 + k)
        p = PackedInt4.for_triton(*[a.to(DEV) for a in awq], gs)
        _cache[n, k, gs] = (p, awq)
    return _cache[n, k, gs]


def check(y, x, awq, gs, bias, p):
    ref = spec64(x.cpu(), awq, gs, None if bias is None else bias.cpu())
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), ref) < TOL[x.dtype]
    assert not p.locks.any(), "split-K counters must be back at zero"


def inputs(m, k, n, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV) if with_bias else None
    return x, b


# (n, k, group_size): odd N, K not a multiple of 128 (576, 192), group sizes 32/64/128/-1 and 96
SMALL_SHAPES = [(72, 256, 32), (200, 576, 64), (136, 1024, 128), (72, 384, -1), (40, 192, 96), (8, 640, 128)]
FULL_SHAPES = SMALL_SHAPES + [(4104, 4096, 128), (200, 4096, 32), (1000, 2880, 64), (72, 11008, 128),
                              (4096, 576, -1)]

GEMV_CASES = pick(
    [  # n, k, gs, m, dtype, split, bias, block_n
        (72, 256, 32, 1, F16, None, True, 64),
        (200, 576, 64, 3, BF16, 2, False, 64),
        (136, 1024, 128, 2, F16, 3, True, 32),
        (72, 384, -1, 1, BF16, 1, True, 128),
        (40, 192, 96, 1, BF16, None, False, 16),
        (8, 640, 128, 1, F16, 4, True, 128),
    ],
    sample([(n, k, gs, m, dt, s, b, bn)
            for (n, k, gs), m, dt, (s, bn), b in itertools.product(
                FULL_SHAPES, (1, 2, 5), (F16, BF16), ((None, 128), (3, 32), (1, 64), (8, 16)),
                (True, False))], 60)
    + [(4104, 4096, 128, 1, BF16, None, False, 128), (72, 11008, 128, 1, F16, 32, False, 16)],
)


@pytest.mark.parametrize("n,k,gs,m,dtype,split,with_bias,block_n", GEMV_CASES)
def test_gemv(n, k, gs, m, dtype, split, with_bias, block_n):
    p, awq = packed(n, k, gs)
    x, b = inputs(m, k, n, dtype, with_bias, seed=m)
    y = T.gemv(x, p, b, split=split, block_n=block_n)
    check(y, x, awq, gs, b, p)


@pytest.mark.parametrize("n,k,gs,m,dtype,split,with_bias,block_n,stages,wide", [
    (136, 1024, 128, 1, BF16, None, True, 32, 3, 2), (200, 640, 128, 2, F16, 2, False, 64, 2, 4),
    (72, 1280, 256, 1, BF16, 1, False, 16, 3, 4), (8, 640, 128, 1, F16, 3, True, 128, 1, 2),
    (136, 1024, 128, 3, F16, None, False, 64, 4, 1)])
@pytest.mark.parametrize("math", ["h2", "fp32", "fp32-step-sum"])
def test_gemv_wide(n, k, gs, m, dtype, split, with_bias, block_n, stages, wide, math):
    """Explicit steps of U units (the default picks U by N), unit tails masked (1280/128 = 10 units, U = 4);
    the fp16x2 math (default; the interpreter runs its stand-in) or the fp32 math, whose accumulator is
    summed over words every step or once at the end."""
    p, awq = packed(n, k, gs)
    x, b = inputs(m, k, n, dtype, with_bias, seed=m)
    y = T.gemv(x, p, b, split=split, block_n=block_n, stages=stages, wide=wide, h2=math == "h2",
               step_sum=math == "fp32-step-sum")
    check(y, x, awq, gs, b, p)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("mag", [1e-5, 1e-2, 3e2])
def test_gemv_h2_x_range(mag, dtype):
    """The fp16x2 math scales x per program by a power of two: activations far from 1 (tiny, or large
    enough that unscaled fp16 sums of (q - z) x would overflow: 16 x 15 x 9000), with one outlier 30x the
    rest, keep the reference's accuracy."""
    n, k, gs = 136, 1024, 128
    p, awq = packed(n, k, gs)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, k, generator=g) * mag
    x[0, 5] = 30 * mag
    x = x.to(dtype).to(DEV)
    for split in (1, 4):
        y = T.gemv(x, p, split=split)
        check(y, x, awq, gs, None, p)


GEMM_CASES = pick(
    [  # n, k, gs, m, dtype, block_m, split, bias, block_n
        (72, 256, 32, 1, BF16, None, None, True, 64),
        (200, 576, 64, 17, F16, None, 2, False, 128),
        (136, 1024, 128, 33, BF16, 32, 3, True, 64),
        (72, 384, -1, 16, F16, 16, 1, False, 128),
        (40, 192, 96, 20, F16, None, None, True, 64),
        (8, 640, 128, 70, BF16, 64, 2, False, 128),
    ],
    sample([(n, k, gs, m, dt, bm, s, b, bn)
            for (n, k, gs), m, dt, (bm, s, bn), b in itertools.product(
                FULL_SHAPES, (1, 16, 17, 64, 100, 256, 300), (F16, BF16),
                ((None, None, 128), (None, 3, 64), (64, 1, 64), (32, 5, 128)), (True, False))], 80),
)


@pytest.mark.parametrize("n,k,gs,m,dtype,block_m,split,with_bias,block_n", GEMM_CASES)
def test_gemm(n, k, gs, m, dtype, block_m, split, with_bias, block_n):
    p, awq = packed(n, k, gs)
    x, b = inputs(m, k, n, dtype, with_bias, seed=m)
    y = T.gemm(x, p, b, block_m=block_m, split=split, block_n=block_n)
    check(y, x, awq, gs, b, p)


@pytest.mark.parametrize("num_warps", [4, 8])
@pytest.mark.parametrize("n,k,gs,m,dtype,block_m", pick(
    [(200, 576, 64, 5, BF16, 16), (136, 1024, 32, 40, F16, 32)],
    [(4104, 4096, 128, 5, BF16, 16), (1000, 2880, 64, 40, F16, 32), (200, 4096, 32, 100, BF16, 64),
     (72, 576, -1, 16, F16, 16)]))
def test_gemm_groups_blocks_and_warps(n, k, gs, m, dtype, block_m, num_warps):
    """Groups of 32 / 64 (one or two slices a group), 128 and whole rows, every BLOCK_M, 4 or 8 warps."""
    p, awq = packed(n, k, gs)
    x, b = inputs(m, k, n, dtype, True, seed=m)
    check(T.gemm(x, p, b, block_m=block_m, num_warps=num_warps), x, awq, gs, b, p)


@pytest.mark.parametrize("n,k,gs", pick(SMALL_SHAPES, FULL_SHAPES))
@pytest.mark.parametrize("dtype", [F16, BF16, torch.float32])
def test_dequantize_is_exact(n, k, gs, dtype):
    """The kernel's one fma gives exactly the spec's fp32 (q - z) * s; then one rounding to dtype."""
    p, awq = packed(n, k, gs)
    w = T.dequantize(p, dtype).cpu()
    ref = dequantize_awq(*awq, gs, dtype)
    if CUDA or dtype != BF16:
        assert torch.equal(w, ref)
    else:  # interpreter truncates to bf16: at most one bf16 step away
        assert ((w.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()


@pytest.mark.parametrize("m", pick([1, 8, 9, 300], [1, 2, 7, 8, 9, 16, 31, 64, 128, 255, 256, 257, 600]))
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_int4_linear_dispatch(m, dtype):
    n, k, gs = (200, 576, 64) if not CUDA else (1000, 2880, 64)
    p, awq = packed(n, k, gs)
    x, b = inputs(m, k, n, dtype, True, seed=m)
    y = int4_linear(x.reshape(1, m, k), p, b)
    assert y.shape == (1, m, n)
    check(y[0], x, awq, gs, b, p)


def test_kernels_read_any_strides():
    """The kernels take qweight's strides: the codes stored row-major ([Np, Kp/8], the order before the
    8 KiB tiles; benchmarks/int4_kernels.py --sweep-layout times it) and seen through a strided view give
    the same outputs bit for bit."""
    import dataclasses

    from salience.kernels import layout

    p, _ = packed(136, 1024, 128)
    view = layout.row_major_view(p.qweight)
    assert not view.is_contiguous() and view.stride(2) == 1024 // 8
    q = dataclasses.replace(p, qweight=view, locks=p.locks.clone())
    x, b = inputs(3, 1024, 136, BF16, True)
    assert torch.equal(T.gemv(x, p, b, split=3), T.gemv(x, q, b, split=3))
    assert torch.equal(T.gemv(x[:1], p, b, wide=2), T.gemv(x[:1], q, b, wide=2))
    assert torch.equal(T.gemm(x, p, b, split=2, block_n=64), T.gemm(x, q, b, split=2, block_n=64))
    assert torch.equal(T.dequantize(p, BF16), T.dequantize(q, BF16))
    with pytest.raises(ValueError, match="divide 128"):
        T.gemv(x, p, block_n=96)
    with pytest.raises(ValueError, match="fp16x2 GEMV needs"):  # 16 rows x 16 words = 2 words a thread
        T.gemv(x, p, block_n=16, num_warps=4)
    with pytest.raises(ValueError, match="variant of the fp32 math"):
        T.gemv(x, p, step_sum=True)


def test_split_k_is_deterministic():
    p, _ = packed(136, 1024, 128)
    x, _ = inputs(3, 1024, 136, F16, False)
    a = T.gemv(x, p, split=4)
    b = T.gemv(x, p, split=4)
    assert torch.equal(a, b) and not p.locks.any()
    c = T.gemm(x, p, split=3)
    assert torch.equal(c, T.gemm(x, p, split=3)) and not p.locks.any()


def test_fp32_activations_go_through_dequantize():
    p, awq = packed(72, 256, 32)
    x, b = inputs(4, 256, 72, torch.float32, True)
    y = int4_linear(x, p, b)
    ref = spec64(x.cpu(), awq, 32, b.cpu())
    assert y.dtype == torch.float32 and rel_err(y.cpu(), ref) < 1e-4  # cuBLAS may use tf32-free fp32


FUSED_CASES = pick(
    [(256, 1024, 128, F16), (128, 256, 32, BF16), (384, 576, 64, F16)],  # n, k, gs, dtype (N even: glu)
    [(8192, 4096, 128, BF16), (4096, 4096, 128, F16), (256, 4096, 32, BF16), (1024, 2880, 64, F16),
     (384, 11008, 128, BF16), (256, 1024, 128, F16), (128, 256, 32, BF16)])


def _composed(x, awq, gs, rms=None, glu=None, residual=None, emit=None, bias=None):
    """int4_linear's neighbours from the spec and plain torch (float64 matmul), rounded where the torch
    composition rounds."""
    from salience.kernels import reference

    dt = x.dtype
    x = x.cpu()
    if rms is not None:
        q = rms[0].cpu().float()
        x = (x.float() * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + rms[1])).to(dt)
    y = spec64(x, awq, gs, None if bias is None else bias.cpu()).to(dt)
    if glu is not None:
        y = reference.act_mul(y, glu)
    if residual is not None:
        y = residual.cpu() + y
    return (y, y * emit.cpu()) if emit is not None else y


@pytest.mark.parametrize("n,k,gs,dtype", FUSED_CASES)
@pytest.mark.parametrize("rms,glu,res,emit", [(True, None, False, False), (False, "silu", True, True),
                                              (True, "gelu_tanh", False, False), (False, None, True, True),
                                              (True, "silu", True, False)])
def test_gemv_fused_neighbours(n, k, gs, dtype, rms, glu, res, emit):
    """The GEMV's fused neighbours (the RMS scale of a given row, act(gate) * up over interleaved
    gate/up tiles, the residual add, the emitted y * w) give the composed torch ops' numbers."""
    p, awq = packed(n, k, gs)
    n_out = n // 2 if glu else n
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(dtype).to(DEV)
    kw = dict(rms=((4 * torch.randn(1, k, generator=g)).to(dtype).to(DEV), 1e-6) if rms else None, glu=glu,
              residual=torch.randn(1, n_out, generator=g).to(dtype).to(DEV) if res else None,
              emit=(1 + torch.rand(n_out, generator=g)).to(dtype).to(DEV) if emit else None)
    y = int4_linear(x, p, **kw)
    want = _composed(x, awq, gs, **kw)
    for got, ref in zip(*((y, want) if emit else ((y,), (want,)))):
        assert got.shape == (1, n_out) and got.dtype == dtype and torch.isfinite(got).all()
        assert rel_err(got.cpu(), ref.double()) < 2 * TOL[dtype]
    assert not p.locks.any()


def test_int4_linear_neighbours_composed_above_one_token():
    """Where the kernel does not fuse them (M > 1: the GEMM) rms=, glu=, residual= and emit= are composed
    from torch ops, in the documented order; bad arguments are refused."""
    from salience.kernels import fuses, reference

    p, awq = packed(256, 1024, 128)
    assert fuses(p, 1, BF16) and not fuses(p, 3, BF16) and not fuses(p, 1, torch.float32)
    odd, _ = packed(200, 576, 64)  # 200 rows: no whole GLU tiles of 64 gate + 64 up rows
    assert fuses(p, 1, BF16, "silu") and fuses(odd, 1, BF16) and not fuses(odd, 1, BF16, "silu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1024, generator=g).to(BF16).to(DEV)
    q = torch.randn(3, 1024, generator=g).to(BF16).to(DEV)
    r = torch.randn(3, 128, generator=g).to(BF16).to(DEV)
    w = torch.rand(128, generator=g).to(BF16).to(DEV)
    y, yw = int4_linear(x, p, rms=(q, 1e-5), glu="silu", residual=r, emit=w)
    xs = (x.float() * torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(BF16)
    want = r + reference.act_mul(int4_linear(xs, p), "silu")
    assert torch.equal(y, want) and torch.equal(yw, want * w)
    with pytest.raises(ValueError, match="glu must be"):
        int4_linear(x, p, glu="relu")
    with pytest.raises(ValueError, match="features"):
        int4_linear(x[:, :512], p)
    with pytest.raises(ValueError, match="residual"):
        T.gemv(x[:1], p, residual=r)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay():
    p, _ = packed(4104, 4096, 128)
    for m in (1, 16, 512):
        x, b = inputs(m, 4096, 4104, BF16, True, seed=m)
        eager = int4_linear(x, p, b)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            int4_linear(x, p, b)  # warm up (compile) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = int4_linear(x, p, b)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager) and not p.locks.any()


if not RUN_HERE:  # the cases run in the child process (test_triton_kernels_in_interpreter)
    for _name in [n for n in list(globals()) if n.startswith("test_")]:
        if _name != "test_triton_kernels_in_interpreter":
            del globals()[_name]

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
@pytest.mark.parametrize("step_sum", [True, False])
def test_gemv_wide(n, k, gs, m, dtype, split, with_bias, block_n, stages, wide, step_sum):
    """Explicit steps of U units (the default picks U by N), unit tails masked (1280/128 = 10 units, U = 4);
    the accumulator summed over words every step or once at the end."""
    p, awq = packed(n, k, gs)
    x, b = inputs(m, k, n, dtype, with_bias, seed=m)
    y = T.gemv(x, p, b, split=split, block_n=block_n, stages=stages, wide=wide, step_sum=step_sum)
    check(y, x, awq, gs, b, p)


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


@pytest.mark.parametrize("per_group", [True, False])
@pytest.mark.parametrize("n,k,gs,m,dtype,block_m", pick(
    [(200, 576, 64, 5, BF16, 16), (136, 1024, 32, 40, F16, 32)],
    [(4104, 4096, 128, 5, BF16, 16), (1000, 2880, 64, 40, F16, 32), (200, 4096, 32, 100, BF16, 64),
     (72, 576, -1, 16, F16, 16)]))
def test_gemm_both_scale_paths(n, k, gs, m, dtype, block_m, per_group):
    """Scales and zeros once per group (codes as B + q) or once per code: the same numbers."""
    p, awq = packed(n, k, gs)
    x, b = inputs(m, k, n, dtype, True, seed=m)
    check(T.gemm(x, p, b, block_m=block_m, per_group=per_group), x, awq, gs, b, p)


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
    [  # n, k, gs, dtype, wide kernel?  (wide: groups of 128+ and K % 128 == 0)
        (136, 1024, 128, F16), (72, 256, 32, BF16), (200, 576, 64, F16)],
    [(4104, 4096, 128, BF16), (4104, 4096, 128, F16), (200, 4096, 32, BF16), (1000, 2880, 64, F16),
     (72, 11008, 128, BF16), (136, 1024, 128, F16), (72, 256, 32, BF16)])


@pytest.mark.parametrize("n,k,gs,dtype", FUSED_CASES)
@pytest.mark.parametrize("kind", ["norm", "norm_offset", "silu", "gelu_tanh"])
@pytest.mark.parametrize("with_res", [True, False])
def test_gemv_fused_neighbours(n, k, gs, dtype, kind, with_res):
    """The GEMV's fused input (RMSNorm with either rounding, or act(gate) * up) and residual add give the
    composed reference's numbers: reference.rms_norm / act_mul, the spec linear, then r + y in dtype."""
    from salience.kernels import reference

    p, awq = packed(n, k, gs)
    g = torch.Generator().manual_seed(n + k)
    r = torch.randn(1, n, generator=g).to(dtype).to(DEV) if with_res else None
    if kind.startswith("norm"):
        w = (1 + 0.2 * torch.randn(k, generator=g)).to(dtype).to(DEV)
        x = (3 * torch.randn(1, k, generator=g)).to(dtype).to(DEV)
        norm = (w, 1e-6, 1.0 if kind == "norm_offset" else 0.0)
        y = int4_linear(x, p, norm=norm, residual=r)
        xin = reference.rms_norm(x.cpu(), w.cpu(), *norm[1:])
    else:
        x = torch.randn(1, 2 * k, generator=g).to(dtype).to(DEV)
        y = int4_linear(x, p, act=kind, residual=r)
        xin = reference.act_mul(x.cpu().float(), kind).to(dtype)
    ref = spec64(xin, awq, gs, None)
    if r is not None:  # residual + y, y rounded to dtype first
        ref = r.cpu().double() + ref.to(dtype).double()
    assert y.shape == (1, n) and y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y.cpu(), ref) < TOL[dtype]
    assert not p.locks.any()


def test_int4_linear_neighbours_composed_above_one_token():
    """Where the kernel does not fuse them (M > 1: the GEMM) norm=, act= and residual= are composed from
    torch ops: the same result as doing so by hand."""
    from salience.kernels import fuses, reference

    p, awq = packed(136, 1024, 128)
    assert fuses(p, 1, BF16) and not fuses(p, 3, BF16) and not fuses(p, 1, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2048, generator=g).to(BF16).to(DEV)
    r = torch.randn(3, 136, generator=g).to(BF16).to(DEV)
    w = torch.rand(1024, generator=g).to(BF16).to(DEV)
    y = int4_linear(x, p, act="silu", residual=r)
    assert torch.equal(y, r + int4_linear(reference.act_mul(x, "silu"), p))
    y = int4_linear(x[:, :1024], p, norm=(w, 1e-5, 0.0))
    assert torch.equal(y, int4_linear(reference.rms_norm(x[:, :1024], w, 1e-5, 0.0), p))
    with pytest.raises(ValueError, match="cannot both"):
        int4_linear(x, p, act="silu", norm=(w, 1e-5, 0.0))
    with pytest.raises(ValueError, match="gate"):
        int4_linear(x[:, :1024], p, act="silu")
    with pytest.raises(ValueError, match="act must be"):
        int4_linear(x, p, act="relu")
    with pytest.raises(ValueError, match="residual"):
        int4_linear(x[:1, :1024], p, residual=r)


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


@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch needs a GPU (sm_90+)")
@pytest.mark.parametrize("prefetch", [0, 2])
def test_pdl_changes_no_number(prefetch, monkeypatch):
    """GEMVs launched with programmatic dependent launch (each may start before the kernel ahead of it
    ends, and waits for it before reading x), chained through a norm, an act and residual adds and
    replayed from a CUDA graph, give the very numbers of ordinary launches."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90+")
    up, _ = packed(8192, 4096, 128)  # [gate | up] rows of 4096 each
    down, _ = packed(4096, 4096, 128)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4096, generator=g).to(BF16).to(DEV)
    w = torch.rand(4096, generator=g).to(BF16).to(DEV)

    def chain():
        h = int4_linear(x, up, norm=(w, 1e-5, 0.0))  # [1, 8192]
        y = int4_linear(h, down, act="silu", residual=x)
        return int4_linear(y, down, norm=(w, 1e-5, 1.0), residual=y)

    want = chain()
    monkeypatch.setattr(T, "PDL", True)
    monkeypatch.setattr(T, "PDL_PREFETCH", prefetch)
    assert torch.equal(chain(), want)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = chain()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want)


if not RUN_HERE:  # the cases run in the child process (test_triton_kernels_in_interpreter)
    for _name in [n for n in list(globals()) if n.startswith("test_")]:
        if _name != "test_triton_kernels_in_interpreter":
            del globals()[_name]

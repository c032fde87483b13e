"""Decode attention: one new query token per row against a static KV cache, on CUDA (Triton).

At decode, attention is a small memory-bound read of the cache, but through SDPA with a boolean mask it
costs ~12 us per layer on an H100 for a 7B model at 256 slots (the cuDNN kernel, a mask fill and a
transpose copy; benchmarks/results/decode_profile-*.txt), a tenth of the W4 step. This kernel reads
each row's live slots once and writes the output already in [B, Hq * D] order.

    decode_attention(q, k_cache, v_cache, lo, hi, scale) -> out
        q        [B, Hq, D]        the new token's queries (after RoPE), fp16/bf16
        k_cache  [B, Hkv, S, D]    static caches (the new token's K/V already written)
        v_cache  [B, Hkv, S, D]
        lo, hi   [B] int           row b attends to slots lo[b] <= s < hi[b] (left padding and
                                   sliding windows are a larger lo); device tensors, so the call
                                   has fixed shapes and no host sync (CUDA-graph capturable).
                                   A row with lo >= hi (an idle batch row) gets zeros.
        -> out   [B, Hq * D]       softmax(q k^T * scale) v per query head, in q's dtype

GQA: the g = Hq / Hkv query heads that share a kv head are one program's rows (padded to 16 for the
tensor cores). Flash-decoding: the S slots are cut into chunks (sized so that there are ~512 programs);
program (b, kv head, chunk) runs an online softmax over the chunk's live blocks of BLOCK_S slots and
writes its partial (running max m, sum l, unnormalised acc, for the g real rows) in fp32; a second
kernel combines the chunks of each (b, head) in a fixed order (deterministic). Chunks with no live slot
write m = -inf and are skipped by the combine.

decode_attention_ref is the spec (plain torch, fp32 softmax), used on CPU and by the tests.
"""

from __future__ import annotations

import torch


def decode_attention_ref(q, k_cache, v_cache, lo, hi, scale: float):
    """The spec: [B, Hq, D] queries against slots lo <= s < hi of [B, Hkv, S, D] caches -> [B, Hq * D]."""
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    k = k_cache.float().repeat_interleave(g, dim=1)  # [B, Hq, S, D]
    v = v_cache.float().repeat_interleave(g, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale
    slot = torch.arange(s, device=q.device)
    live = (slot[None, :] >= lo[:, None]) & (slot[None, :] < hi[:, None])  # [B, S]
    scores = scores.masked_fill(~live[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhs,bhsd->bhd", p, v).to(q.dtype).reshape(b, hq * d)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode_attention runs the reference
    triton = None

if triton is not None:

    @triton.jit
    def _attn_partial_kernel(q_ptr, k_ptr, v_ptr, lo_ptr, hi_ptr, m_ptr, l_ptr, acc_ptr,
                             S, n_chunks, scale,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                             CHUNK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
        """Program (b, kv head h, chunk c of CHUNK slots): rows = the G query heads of kv head h (padded
        to GP for the tensor cores), online softmax over the chunk's live blocks of BLOCK_S slots only.
        PREC: "ieee" for fp32 inputs (exact fp32 products, not TF32), else "tf32" (ignored for 16-bit)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.program_id(2)
        rg = tl.arange(0, GP)
        rd = tl.arange(0, D)
        row_ok = rg < G
        lo = tl.load(lo_ptr + b)
        hi = tl.minimum(tl.load(hi_ptr + b), S)
        out = ((b * tl.num_programs(1) + h) * n_chunks + c) * G + rg  # partial rows (the G real ones)
        q = tl.load(q_ptr + b * stride_qb + (h * G + rg)[:, None] * stride_qh + rd[None, :],
                    mask=row_ok[:, None], other=0.0)  # [GP, D]
        if DOT_F32:  # Triton's CPU interpreter multiplies 16-bit float bit patterns as integers
            q = q.to(tl.float32)
        m = tl.full([GP], float("-inf"), tl.float32)
        l_ = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        s_lo = tl.maximum(c * CHUNK, lo)  # live slots of this chunk: [s_lo, s_hi)
        s_hi = tl.minimum(c * CHUNK + CHUNK, hi)
        for j in range(s_lo // BLOCK_S, tl.cdiv(s_hi, BLOCK_S)):  # empty when the chunk has no live slot
            rs = j * BLOCK_S + tl.arange(0, BLOCK_S)
            live = (rs >= s_lo) & (rs < s_hi)  # [BLOCK_S]
            kv_off = b * stride_kb + h * stride_kh + rs[:, None] * stride_ks + rd[None, :]  # [BLOCK_S, D]
            k = tl.load(k_ptr + kv_off, mask=live[:, None], other=0.0)
            v = tl.load(v_ptr + kv_off, mask=live[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [GP, BLOCK_S] fp32
            sc = tl.where(live[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))  # finite: the block has a live slot
            alpha = tl.exp(m - m_new)  # 0 on the first live block (m = -inf)
            p = tl.exp(sc - m_new[:, None])
            l_ = l_ * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)  # [GP, D]
            m = m_new
        tl.store(m_ptr + out, m, mask=row_ok)  # -inf: no live slot in this chunk (the combine skips it)
        tl.store(l_ptr + out, l_, mask=row_ok)
        tl.store(acc_ptr + out[:, None] * D + rd[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, n_chunks, stride_ob,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
        """Program (b, kv head h): o[b, (h*G + g)*D + d] = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c,
        chunks in order (deterministic)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        rg = tl.arange(0, GP)
        rd = tl.arange(0, D)
        row_ok = rg < G
        base = (b * tl.num_programs(1) + h) * n_chunks
        mx = tl.full([GP], float("-inf"), tl.float32)
        for c in range(n_chunks):
            mx = tl.maximum(mx, tl.load(m_ptr + (base + c) * G + rg, mask=row_ok, other=float("-inf")))
        tot_l = tl.zeros([GP], dtype=tl.float32)
        tot = tl.zeros([GP, D], dtype=tl.float32)
        for c in range(n_chunks):
            r = (base + c) * G + rg
            m = tl.load(m_ptr + r, mask=row_ok, other=float("-inf"))
            if tl.max(m, axis=0) > float("-inf"):  # chunks with no live slot wrote m = -inf (and garbage)
                w = tl.exp(m - mx)
                tot_l += w * tl.load(l_ptr + r, mask=row_ok, other=0.0)
                tot += w[:, None] * tl.load(acc_ptr + r[:, None] * D + rd[None, :], mask=row_ok[:, None], other=0.0)
        o = tot / tl.where(tot_l > 0, tot_l, 1.0)[:, None]  # a row with no live slot (lo >= hi): zeros
        tl.store(o_ptr + b * stride_ob + (h * G + rg)[:, None] * D + rd[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


def _interpreted() -> bool:
    return triton is not None and not isinstance(_attn_partial_kernel, triton.runtime.JITFunction)


def _chunk(s: int, programs_per_chunk: int, block_s: int, target: int = 512) -> int:
    """Slots per program: enough chunks for ~target programs (a few per SM), whole blocks."""
    want = -(-s * programs_per_chunk // target)
    return min(max(block_s, triton.next_power_of_2(want)), triton.next_power_of_2(max(s, block_s)))


def decode_attention(q, k_cache, v_cache, lo, hi, scale: float, block_s: int = 64, chunk: int | None = None,
                     num_warps: int = 4):
    """See the module docstring. CUDA tensors (or CPU ones under TRITON_INTERPRET=1) take the Triton
    kernels; other CPU tensors the reference. chunk: slots per program (default: enough programs)."""
    b, hq, d = q.shape
    _, hkv, s, dk = k_cache.shape
    if dk != d or hq % hkv or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if triton is None or not (q.is_cuda or _interpreted()):
        return decode_attention_ref(q, k_cache, v_cache, lo, hi, scale)
    if d & (d - 1) or d < 16:
        raise ValueError(f"decode_attention: head_dim {d} must be a power of two >= 16")
    if k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride() or q.stride(2) != 1:
        raise ValueError("decode_attention: caches must share strides and have contiguous head_dim")
    g = hq // hkv
    gp = max(16, triton.next_power_of_2(g))
    chunk = chunk or _chunk(s, b * hkv, block_s)
    if chunk % block_s:
        raise ValueError(f"decode_attention: chunk {chunk} is not a multiple of block_s {block_s}")
    n_chunks = triton.cdiv(s, chunk)
    m = torch.empty(b * hkv * n_chunks * g, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    acc = torch.empty(b * hkv * n_chunks * g, d, device=q.device, dtype=torch.float32)
    out = torch.empty(b, hq * d, device=q.device, dtype=q.dtype)
    _attn_partial_kernel[(b, hkv, n_chunks)](
        q, k_cache, v_cache, lo, hi, m, l_, acc, s, n_chunks, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        G=g, GP=gp, D=d, BLOCK_S=block_s, CHUNK=chunk, DOT_F32=_interpreted(),
        PREC="ieee" if q.dtype == torch.float32 or _interpreted() else "tf32", num_warps=num_warps)
    _attn_combine_kernel[(b, hkv)](m, l_, acc, out, n_chunks, out.stride(0), G=g, GP=gp, D=d,
                                   num_warps=num_warps)
    return out


__all__ = ["decode_attention", "decode_attention_ref"]

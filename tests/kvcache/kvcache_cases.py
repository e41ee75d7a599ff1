"""Inputs, the float64 oracle and torch's same-dtype baseline for the KV-cache
tests (tests/tolerances.py's rule, as tests/lsh/lsh_cases.py):

    err(tfk) <= FACTOR * err(torch in dtype) + FLOOR[dtype][output] * max(1, max |reference|)

"torch in dtype" is the reference formula evaluated in float32 on the inputs
rounded to dtype, its out rounded to dtype.
"""
from dataclasses import dataclass, replace

import torch

import tfk.ops.kvcache as kv
from tolerances import FACTOR, FLOOR, max_err


@dataclass(frozen=True)
class Case:
    B: int = 2
    H: int = 4
    Hkv: int = 2
    Lq: int = 1
    D: int = 16
    Dv: int | None = None
    Lmax: int = 80
    seqlens: tuple = (0, 37)          # s_b per sequence (len == B)
    pattern: object = None
    scale: float | None = None
    append: bool = True               # pass key/value (written in place)
    page: int = 0                     # > 0: a paged cache with pages of this size, shuffled

    @property
    def vdim(self):
        return self.D if self.Dv is None else self.Dv

    def with_(self, **kw):
        return replace(self, **kw)


def make_inputs(c: Case, seed=0):
    """float64 q (B, H, Lq, D), contiguous caches (B, Hkv, Lmax, D / Dv),
    key / value (B, Hkv, Lq, D / Dv) or None, and int32 seqlens (B,)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = r(c.B, c.H, c.Lq, c.D)
    kc, vc = r(c.B, c.Hkv, c.Lmax, c.D), r(c.B, c.Hkv, c.Lmax, c.vdim)
    key = value = None
    if c.append:
        key, value = r(c.B, c.Hkv, c.Lq, c.D), r(c.B, c.Hkv, c.Lq, c.vdim)
    return q, kc, vc, key, value, torch.tensor(c.seqlens, dtype=torch.int32)


def to_paged(cache, page, seed=1, spare=3):
    """A contiguous cache (B, Hkv, Lmax, D) laid out in shuffled pages (plus
    ``spare`` unused blocks of noise): (paged (num_blocks, Hkv, page, D),
    block_table int32 (B, Lmax / page)). Lmax must be a multiple of page."""
    B, Hkv, L, D = cache.shape
    pages = L // page
    g = torch.Generator().manual_seed(seed)
    num = B * pages + spare
    perm = torch.randperm(num, generator=g)[:B * pages]
    paged = torch.randn(num, Hkv, page, D, generator=g, dtype=cache.dtype)
    paged[perm] = cache.view(B, Hkv, pages, page, D).permute(0, 2, 1, 3, 4).reshape(B * pages, Hkv, page, D)
    return paged, perm.view(B, pages).to(torch.int32)


def layout(c: Case, q, kc, vc, key, value, seqlens, dtype):
    """The call's arguments in ``dtype``: (q, k_cache, v_cache, seqlens,
    kwargs), paged when c.page (fresh copies: the call writes into them)."""
    kw = dict(pattern=c.pattern, scale=c.scale)
    if c.append:
        kw.update(key=key.to(dtype), value=value.to(dtype))
    kc, vc = kc.to(dtype).clone(), vc.to(dtype).clone()
    if c.page:
        kc, table = to_paged(kc, c.page)
        vc, _ = to_paged(vc, c.page)
        kw["block_table"] = table
    return q.to(dtype), kc, vc, seqlens.clone(), kw


def expected(c: Case, inputs, dtype=torch.float64, compute=torch.float64):
    """The reference's (out, lse) on the inputs rounded to dtype, computed in
    ``compute``, after the append written by hand."""
    q, kc, vc, key, value, seqlens = inputs
    kc, vc = kc.to(dtype).to(compute).clone(), vc.to(dtype).to(compute).clone()
    if c.append:
        for b, s in enumerate(c.seqlens):
            kc[b, :, s:s + c.Lq] = key[b].to(dtype).to(compute)
            vc[b, :, s:s + c.Lq] = value[b].to(dtype).to(compute)
    scale = c.scale if c.scale is not None else c.D ** -0.5
    pattern = c.pattern if c.pattern is not None else tfk_causal()
    return kv.kvcache_reference(q.to(dtype).to(compute), kc, vc, seqlens, pattern, scale)


def tfk_causal():
    from tfk.patterns import causal
    return causal()


def check_case(c: Case, dtype, backend, seed=0, device="cpu"):
    """tfk's (out, lse) on ``backend`` against the float64 oracle, at the
    tolerance torch's own error in dtype sets. Returns the outputs."""
    inputs = make_inputs(c, seed)
    ref_out, ref_lse = expected(c, inputs)
    base = None
    if dtype != torch.float64:
        b_out, b_lse = expected(c, inputs, dtype, torch.float32)
        base = dict(out=b_out.to(dtype), lse=b_lse)
    q, kc, vc, seqlens, kw = layout(c, *inputs, dtype)
    on = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    out, lse = kv.attention_with_kvcache(on(q), on(kc), on(vc), on(seqlens), backend=backend, return_lse=True,
                                         **{k: on(v) for k, v in kw.items()})
    assert out.dtype == dtype and out.shape == (c.B, c.H, c.Lq, c.vdim)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, got, ref in (("out", out.cpu(), ref_out), ("lse", lse.cpu(), ref_lse)):
        assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten element, or broken math)"
        err = max_err(got, ref)
        base_err = max_err(base[name], ref) if base is not None else 0.0
        finite = ref[torch.isfinite(ref)]
        floor = FLOOR[dtype][name] * max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
        bound = FACTOR * base_err + floor
        assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g} (torch's err in {dtype}: {base_err:.3g})"
    return out, lse

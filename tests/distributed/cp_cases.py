"""Context-parallel cases, run inside spawned gloo ranks (tfk.distributed.spawn).

Every rank builds the same inputs from a fixed seed, runs the whole problem in
one process twice (float64 on the "reference" backend: the oracle; the tested
dtype on the "torch" engine: torch's own error in that dtype), then its shard
through context_parallel_attention, and measures its shard of out, lse and
every gradient against the oracle (tests/tolerances.py's rule).
"""
from __future__ import annotations

import traceback

import torch

from tfk import patterns as P
from tfk.backends import AttentionCall, get_backend
from tfk.distributed import context_parallel_attention, count_communication, shard
from tolerances import FACTOR, FLOOR, max_err

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def pattern_of(name, length):
    """Patterns by name (built in the rank: some do not pickle)."""
    if name == "dense" or name == "mask":
        return None
    if name == "causal":
        return P.causal()
    if name == "window":
        return P.sliding_window(8)
    if name == "dilated":
        return P.sliding_window(6, dilation=2)
    if name == "global":
        return P.sliding_window(4) | P.global_tokens([0, 5, length - 3])
    if name == "strided":
        return P.strided(8)
    if name == "fixed":
        return P.fixed(16, 2)
    if name == "bigbird":
        return P.bigbird(8, 3, 1, 1, seed=3)
    if name == "per_head":   # a per-head block layout (4 heads: 2 ranks), each head its own blocks
        g = torch.Generator().manual_seed(7)
        nb = length // 8
        layout = (torch.rand(4, nb, nb, generator=g) < 0.35) | torch.eye(nb, dtype=torch.bool)
        return P.block_layout(layout, 8)
    raise ValueError(name)


def case_id(c):
    extra = "".join(f"-{key}{c[key]}" for key in ("dropout", "backend", "device") if c.get(key))
    return f"{c['world']}ranks-{c['method']}-{c['layout']}-{c['pattern']}-{c['dtype']}{extra}"


def _inputs(c):
    g = torch.Generator().manual_seed(len(case_id(c)) * 7919 + 11)
    L, B, H, Hkv, D = c["length"], 2, 2 * c["world"], c["world"], 16   # GQA; ulysses splits both
    x = [torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv, H)]
    dl = torch.randn(B, H, L, generator=g)
    mask = None
    if c["pattern"] == "mask":
        mask = (torch.rand(B, 1, L, L, generator=g) < 0.4) | torch.eye(L, dtype=torch.bool)
        mask[:, :, 3] = False   # a query with no key at all
    return x, dl, mask


SEED = 1234


def _whole(backend, q, k, v, pattern, mask, do, dl, dropout_p):
    """out, lse and the gradients of sum(out * do) + sum(lse * dl) of one process."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    call = AttentionCall(q, k, v, pattern, mask, q.shape[-1] ** -0.5, dropout_p, True)
    torch.manual_seed(SEED)   # the dropout seed drawn
    out, lse = get_backend(backend).run(call)
    _loss(out, lse, do, dl).backward()
    return out, lse, q.grad, k.grad, v.grad


def _loss(out, lse, do, dl):
    finite = torch.isfinite(lse)
    return (out.float() * do.float()).sum() + (torch.where(finite, lse, 0).float() * dl.float()).sum()


def run_case(rank, world, c):
    dtype = DTYPES[c["dtype"]]
    (q, k, v, do), dl, mask = _inputs(c)
    pattern = pattern_of(c["pattern"], c["length"])
    names = ("out", "lse", "dq", "dk", "dv")
    p = c.get("dropout", 0.0)
    ref = _whole("reference", *(t.double() for t in (q, k, v)), pattern, mask, do.double(), dl.double(), p)
    low = _whole("torch", *(t.to(dtype) for t in (q, k, v)), pattern, mask, do.to(dtype), dl, p)
    layout = c["layout"]
    device = torch.device("cuda", rank) if c.get("device") == "cuda" else torch.device("cpu")
    qs, ks, vs = (shard(t.to(device, dtype), layout=layout).requires_grad_() for t in (q, k, v))
    torch.manual_seed(SEED)   # every rank as the one process: the first rank's draw is the seed
    with count_communication() as counts:
        out, lse = context_parallel_attention(qs, ks, vs, pattern, method=c["method"], layout=layout,
                                              attn_mask=None if mask is None else mask.to(device),
                                              return_lse=True, dropout_p=p, backend=c.get("backend", "auto"))
        _loss(out, lse, shard(do.to(device, dtype), layout=layout),
              shard(dl.to(device), layout=layout, dim=2)).backward()
    got = tuple(x.cpu() for x in (out, lse, qs.grad, ks.grad, vs.grad))
    result = dict(counts=dict(counts), errors={})
    for name, x, r, lo in zip(names, got, ref, low):
        r, lo = shard(r.detach(), layout=layout), shard(lo.detach(), layout=layout)
        err, base = max_err(x, r), max_err(lo, r)
        bound = FACTOR * base + FLOOR[dtype][name]
        nan = bool(torch.isnan(x).any())
        result["errors"][name] = (err, bound, nan)
    result["ok"] = all(err <= bound and not nan for err, bound, nan in result["errors"].values())
    return result


def run_cases(rank, world, cases):
    """Each case's result (or its traceback): one failing case fails its test, not the others."""
    torch.manual_seed(0)
    if any(c.get("device") == "cuda" for c in cases):
        torch.cuda.set_device(rank)
    out = {}
    for c in cases:
        try:
            out[case_id(c)] = run_case(rank, world, c)
        except Exception:  # noqa: BLE001 - reported to the test of that case
            out[case_id(c)] = dict(ok=False, error=traceback.format_exc())
    return out


def cases_for(world):
    """The matrix each world size runs."""
    L = 32 * world
    cases = []
    if world == 2:
        for dtype in ("fp32", "fp16"):
            for layout in ("zigzag", "contiguous"):
                for pat in ("causal", "window", "dilated", "global", "mask", "dense"):
                    cases.append(dict(method="ring", layout=layout, pattern=pat, dtype=dtype))
                for pat in ("causal", "window", "global", "mask"):
                    cases.append(dict(method="ulysses", layout=layout, pattern=pat, dtype=dtype))
        for pat in ("strided", "fixed", "bigbird", "per_head"):
            cases.append(dict(method="ring", layout="zigzag", pattern=pat, dtype="fp32"))
        cases += [dict(method="ring", layout="zigzag", pattern="global", dtype="fp64"),
                  dict(method="ring", layout="zigzag", pattern="causal", dtype="bf16"),
                  dict(method="ring", layout="contiguous", pattern="window", dtype="bf16", backend="cuda-sim")]
        # dropout: every piece draws its window of the one process's keep mask
        cases += [dict(method="ring", layout="zigzag", pattern="causal", dtype="fp32", dropout=0.3),
                  dict(method="ring", layout="contiguous", pattern="global", dtype="fp16", dropout=0.2),
                  dict(method="ulysses", layout="zigzag", pattern="window", dtype="fp32", dropout=0.3)]
        # the kernel backends' pieces: Triton (interpreted) and the CUDA kernels on the CPU
        cases += [dict(method="ring", layout="zigzag", pattern="causal", dtype="fp16", backend="triton", dropout=0.2),
                  dict(method="ulysses", layout="contiguous", pattern="window", dtype="fp32", backend="triton"),
                  dict(method="ring", layout="zigzag", pattern="global", dtype="fp16", backend="cuda-sim", dropout=0.2),
                  dict(method="ulysses", layout="zigzag", pattern="causal", dtype="bf16", backend="cuda-sim",
                       dropout=0.2)]
    else:
        for dtype in ("fp32", "fp16"):
            for layout in ("zigzag", "contiguous"):
                cases.append(dict(method="ring", layout=layout, pattern="causal", dtype=dtype))
            cases.append(dict(method="ulysses", layout="zigzag", pattern="causal", dtype=dtype))
        for pat in ("window", "dilated", "global", "mask"):
            cases.append(dict(method="ring", layout="zigzag", pattern=pat, dtype="fp32"))
        cases.append(dict(method="ring", layout="contiguous", pattern="window", dtype="fp32"))
        cases += [dict(method="ring", layout="zigzag", pattern="causal", dtype="fp32", dropout=0.3),
                  dict(method="ulysses", layout="zigzag", pattern="causal", dtype="fp16", dropout=0.2)]
    for c in cases:
        c.update(world=world, length=L)
    return cases


def gpu_cases():
    """On 2 GPUs over NCCL (tests/distributed/test_gpu.py): the default engine
    (Triton), the CUDA kernels, bf16 and fp16, dropout."""
    cases = [dict(method="ring", layout="zigzag", pattern="causal", dtype="bf16"),
             dict(method="ring", layout="contiguous", pattern="global", dtype="fp16", dropout=0.2),
             dict(method="ring", layout="zigzag", pattern="window", dtype="bf16", backend="cuda"),
             dict(method="ulysses", layout="zigzag", pattern="causal", dtype="fp16")]
    for c in cases:
        c.update(world=2, length=512, device="cuda")
    return cases

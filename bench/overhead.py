"""Call overhead of the SDPA drop-in: tfk against torch's own function, for
the small calls where the work before the kernel shows (decoding one token
against a cache, short sequences), in one run.

    python -m bench.overhead [--repeat N] [--calls N]

Each case is timed forward only, under torch.no_grad(), on the CPU: the
median over ``--repeat`` rounds of the mean time per call of ``--calls``
back-to-back calls, after a warm-up round. The table gives both times, their
ratio (tfk / torch, 1.0 = no overhead), the backend "auto" ran and the
largest difference between the two outputs (they must agree).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

import tfk
from tfk.ops.attention import torch_sdpa


@dataclass(frozen=True)
class Case:
    name: str
    q: tuple          # query shape; key and value are kv
    kv: tuple
    mask: str = ""    # "" | "bool" (a (B, 1, 1, S) padding mask, as decoding uses)
    causal: bool = False

    def inputs(self):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(*s, generator=g) for s in (self.q, self.kv, self.kv))
        kw = dict(is_causal=self.causal, enable_gqa=self.q[1] != self.kv[1])
        if self.mask == "bool":
            m = torch.ones(self.kv[0], 1, 1, self.kv[2], dtype=torch.bool)
            m[..., : self.kv[2] // 10] = False  # left padding
            kw["attn_mask"] = m
        return (q, k, v), kw


CASES = [
    Case("decode_gqa_mask", (1, 8, 1, 32), (1, 2, 300, 32), mask="bool"),
    Case("decode_gqa", (1, 8, 1, 64), (1, 2, 1024, 64)),
    Case("small_plain", (1, 4, 64, 32), (1, 4, 64, 32)),
    Case("small_causal", (2, 4, 128, 64), (2, 4, 128, 64), causal=True),
    Case("prefill_causal_mask", (1, 8, 256, 64), (1, 8, 256, 64), mask="bool"),
]


def _time_per_call(fn, calls, repeat):
    fn()
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls)
    return statistics.median(rounds)


def measure(case: Case, calls=200, repeat=5) -> dict:
    (q, k, v), kw = case.inputs()
    with torch.no_grad():
        with tfk.backends.record_choices() as ran:
            got = tfk.scaled_dot_product_attention(q, k, v, **kw)
        want = torch_sdpa(q, k, v, **kw)
        t_torch = _time_per_call(lambda: torch_sdpa(q, k, v, **kw), calls, repeat)
        t_tfk = _time_per_call(lambda: tfk.scaled_dot_product_attention(q, k, v, **kw), calls, repeat)
    return {"case": case.name, "backend": ran[0], "torch_us": t_torch * 1e6, "tfk_us": t_tfk * 1e6,
            "ratio": t_tfk / t_torch, "max_diff": float((got - want).abs().max())}


def format_table(rows) -> str:
    head = f"{'case':<22} {'backend':<8} {'torch us':>9} {'tfk us':>9} {'tfk/torch':>9} {'max diff':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<22} {r['backend']:<8} {r['torch_us']:>9.1f} {r['tfk_us']:>9.1f} "
                     f"{r['ratio']:>9.2f} {r['max_diff']:>9.1e}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds per case (median)")
    ap.add_argument("--calls", type=int, default=200, help="calls per round")
    args = ap.parse_args(argv)
    print(f"tfk {tfk.__version__}, torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    rows = [measure(c, args.calls, args.repeat) for c in CASES]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

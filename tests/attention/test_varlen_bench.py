"""bench.varlen runs end to end on tiny documents, and its three
implementations compute the same attention."""
import torch

from bench import varlen as bench_varlen


def test_bench_varlen_smoke(capsys):
    rows = bench_varlen.main(["--docs", "3", "64", "--min-len", "8", "--max-len", "40", "--reps", "1"])
    assert [(r["docs"], r["mode"]) for r in rows] == [(d, m) for d in (3, 64) for m in ("fwd", "fwd+bwd")]
    assert all(isinstance(r[f"{n}_s"], float) for r in rows for n in bench_varlen.IMPLS)
    assert all(r["x_padded"] > 0 and r["x_padded_causal"] > 0 and r["x_loop"] > 0 for r in rows)
    assert "padded/tfk" in capsys.readouterr().out


def test_bench_implementations_agree():
    lens = [5, 17, 1, 30]
    q, k, v, dout, cu = bench_varlen.make_inputs(lens)
    outs = {}
    for name in bench_varlen.IMPLS:
        fn = bench_varlen.impl_fn(name, lens, cu, "cpu")
        if name.startswith("padded"):
            padded = fn(*(bench_varlen._pad(x, lens) for x in (q, k, v)))     # (docs, H, longest, D)
            outs[name] = torch.cat([padded[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])
        else:
            outs[name] = fn(q, k, v)
    torch.testing.assert_close(outs["tfk"], outs["loop"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["padded"], outs["loop"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["padded_causal"], outs["loop"], atol=1e-5, rtol=1e-5)

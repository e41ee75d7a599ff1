"""Hugging Face generation through tfk against torch's SDPA, on the CPU.

    python -m bench.generate [--tokens N] [--rounds N] [--batch N] [--threads N]

A tiny Mistral with random weights (8 query heads over 2 key/value heads of
dim 32, the shapes of bench.overhead's decode cases) greedily decodes
``--tokens`` new tokens after a prompt of 200, three ways: transformers' own
"sdpa" attention, ``attn_implementation="tfk"``, and "sdpa" under
``tfk.patch_torch()``. With ``--batch 2`` the second prompt is left-padded,
so every attention call carries a padding mask.

Timing: the three decode with the model's forward and a KV cache, taking
turns step by step, each first in turn (so that other work on the machine
slows all of them alike), ``--rounds`` times; the table gives each way's mean total time, the
median over steps of its time over "sdpa"'s in the same step, and whether
its tokens equal "sdpa"'s, both in these loops and in one untimed
``model.generate`` per way.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import tfk

from . import table
from .table import Col

WAYS = ("sdpa", "tfk", "patch_torch")


def make_model(layers=2):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                        max_position_embeddings=1024)
    return transformers.MistralForCausalLM(config).eval()


def make_prompt(batch=1, length=200):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, : length // 10] = 0  # left padding
        ids[1, : length // 10] = 0
    return ids, mask


@contextlib.contextmanager
def _way(model, way):
    model.set_attn_implementation("tfk" if way == "tfk" else "sdpa")
    with tfk.patch_torch() if way == "patch_torch" else contextlib.nullcontext():
        yield


def greedy_steps(model, ids, mask, tokens):
    """Greedy decoding as ``model.generate`` does it (cache, positions from the
    padding mask), one step per iteration; yields the tokens so far."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cur, out = ids, []
    for _ in range(tokens):
        logits = model(input_ids=cur, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits
        cur = logits[:, -1].argmax(-1, keepdim=True)
        out.append(cur)
        yield torch.cat(out, 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = pos[:, -1:] + 1


def measure(tokens=100, rounds=3, batch=1, layers=2) -> list[dict]:
    model = make_model(layers)  # one model for all ways: the same weights in the same memory
    ids, mask = make_prompt(batch)
    steps = {w: [] for w in WAYS}
    with torch.no_grad():
        generated = {}
        for way in WAYS:
            with _way(model, way):
                generated[way] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                                min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        for _ in range(rounds):
            loops = {w: greedy_steps(model, ids, mask, tokens) for w in WAYS}
            last = {}
            for step in range(tokens):
                for way in WAYS[step % 3:] + WAYS[:step % 3]:  # each way first in turn
                    with _way(model, way):  # outside the timing: in use, once per generation
                        t0 = time.perf_counter()
                        last[way] = next(loops[way])
                        steps[way].append(time.perf_counter() - t0)
    return [{"way": w, "ms": sum(steps[w]) / rounds * 1e3,
             "ratio": statistics.median(a / b for a, b in zip(steps[w], steps["sdpa"])),
             "same_tokens": torch.equal(last[w], last["sdpa"]),
             "same_generate": torch.equal(generated[w], generated["sdpa"])} for w in WAYS]


def format_table(rows) -> str:
    cols = [Col("way", "<"), Col("ms"), Col("/ sdpa"), Col("same tokens"), Col("generate same")]
    return table.format_table(cols, [[r["way"], f"{r['ms']:.1f}", f"{r['ratio']:.3f}", str(r["same_tokens"]),
                                      str(r["same_generate"])] for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=3, help="timed decodes per way (summed)")
    ap.add_argument("--batch", type=int, default=1, help="prompts; the second one left-padded")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"tiny Mistral ({args.layers} layers, 8 heads over 2, head dim 32), batch {args.batch}, "
          f"prompt 200, {args.tokens} new tokens, {torch.get_num_threads()} threads")
    rows = measure(args.tokens, args.rounds, args.batch, args.layers)
    print(format_table(rows))
    return 0 if all(r["same_tokens"] and r["same_generate"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

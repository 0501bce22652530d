"""Hugging Face transformers' batched greedy `generate` next to babyllama's batch decode: a bench-only
peer (transformers on the CPU torch wheel; never a dependency of the inference path).

    python bench/hf_batch.py --shape 110M --batch 32 --new-tokens 128 --threads 2

Random weights of a llama2.c shape are exported to a Hugging Face folder (babyllama's own
exporter), then, in turns, transformers' LlamaForCausalLM.generate (greedy, the whole batch at
once, KV-cached) and babyllama's scheduler decode the same number of new tokens for `batch`
sequences from BOS; each reports aggregate generated tok/s, best of --repeats.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="110M")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import numba
    import torch
    from transformers import LlamaForCausalLM

    from babyllama.arch.llama import Weights
    from babyllama.engine import Engine
    from babyllama.evaluate import batch_speed
    from babyllama.formats.hf import export_hf
    from babyllama.testing import SHAPES, random_weights

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    cfg = SHAPES[args.shape]
    weights = Weights.from_dict(cfg, random_weights(cfg))
    engine = Engine(cfg, weights)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(Path(tmp) / "hf", cfg, weights)
        model = LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32).eval()
    ids = torch.ones((args.batch, 1), dtype=torch.long)  # BOS
    hf, ours = 0.0, 0.0
    for r in range(args.repeats + 1):  # interleaved, the first round a warm-up
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
            elapsed = time.perf_counter() - t0
        assert out.shape == (args.batch, 1 + args.new_tokens)
        if r:
            hf = max(hf, args.batch * args.new_tokens / elapsed)
        rate = batch_speed(engine, args.batch, args.new_tokens, 1)["tok_s"]
        if r:
            ours = max(ours, rate)
    print(json.dumps({"shape": args.shape, "batch": args.batch, "new_tokens": args.new_tokens, "threads": args.threads,
                      "transformers_tok_s": round(hf, 1), "babyllama_tok_s": round(ours, 1),
                      "ratio": round(ours / hf, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

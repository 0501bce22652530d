"""llama.cpp (through llama-cpp-python) next to babyllama on the same weights: a bench-only peer.

Run it with the Python of a separate virtualenv that has llama-cpp-python and gguf (never a
babyllama dependency, never in CI), e.g.

    CMAKE_ARGS=-DGGML_NATIVE=ON /tmp/lcpp/bin/pip install llama-cpp-python gguf numpy
    /tmp/lcpp/bin/python bench/llamacpp_peer.py model.bin --types f32,q8_0,q4_0 --decode 256 --prefill 256

It converts a llama2.c v0/v1 .bin to GGUF (F32, Q8_0 or Q4_0; llama2.c's interleaved RoPE pairs
are GGUF's layout already), then times llama.cpp: single-stream greedy decode from BOS (tok/s)
and one prompt of N tokens (tok/s), best of --repeats, and prints JSON lines. The .bin is read
with babyllama's own reader (formats/llama2c.py needs only numpy).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def to_gguf(bin_path: Path, out: Path, qtype: str) -> Path:
    import gguf

    from babyllama.formats.llama2c import load_fp32

    cfg, w = load_fp32(bin_path)
    t = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("babyllama-bench")
    writer.add_context_length(cfg.seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_size)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_file_type(int(t))
    writer.add_tokenizer_model("llama")
    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces = pieces[: cfg.vocab_size] + [f"t{i}".encode() for i in range(len(pieces), cfg.vocab_size)]
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * cfg.vocab_size)
    types = [2, 3, 3] + [6] * min(256, cfg.vocab_size - 3) + [1] * max(0, cfg.vocab_size - 259)
    writer.add_token_types(types[: cfg.vocab_size])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def add(name, arr, quantize=True):
        arr = np.ascontiguousarray(arr, np.float32)
        if quantize and t != gguf.GGMLQuantizationType.F32 and arr.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(arr, t), raw_shape=gguf.quant_shape_to_byte_shape(arr.shape, t),
                              raw_dtype=t)
        else:
            writer.add_tensor(name, arr)

    add("token_embd.weight", w.token_embedding)
    for i in range(cfg.n_layers):
        add(f"blk.{i}.attn_norm.weight", w.rms_att[i], False)
        add(f"blk.{i}.attn_q.weight", w.wq[i])
        add(f"blk.{i}.attn_k.weight", w.wk[i])
        add(f"blk.{i}.attn_v.weight", w.wv[i])
        add(f"blk.{i}.attn_output.weight", w.wo[i])
        add(f"blk.{i}.ffn_norm.weight", w.rms_ffn[i], False)
        add(f"blk.{i}.ffn_gate.weight", w.w1[i])
        add(f"blk.{i}.ffn_down.weight", w.w2[i])
        add(f"blk.{i}.ffn_up.weight", w.w3[i])
    add("output_norm.weight", w.rms_final, False)
    if not cfg.shared_classifier:
        add("output.weight", w.wcls)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def bench(gguf_path: Path, decode: int, prefill: int, repeats: int, threads: int, ctx: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    out = {}
    if decode:
        best = 0.0
        for _ in range(repeats + 1):
            llm.reset()
            llm.eval([1])
            t0 = time.perf_counter()
            for _ in range(decode - 1):  # greedy, never BOS/EOS, one token per eval like a decode loop
                logits = llm.scores[llm.n_tokens - 1]  # a view of the last logits (eval_logits copies to a list)
                llm.eval([int(np.argmax(logits[2:])) + 2])
            best = max(best, (decode - 1) / (time.perf_counter() - t0))
        out["decode_tok_s"] = round(best, 1)
    if prefill:
        tokens = [1] + list(np.random.default_rng(0).integers(3, llm.n_vocab(), prefill - 1).tolist())
        best = 0.0
        for _ in range(repeats + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens)
            best = max(best, prefill / (time.perf_counter() - t0))
        out["prefill_tok_s"] = round(best, 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="llama2.c fp32 .bin (v0 or v1)")
    p.add_argument("--types", default="f32,q8_0,q4_0")
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--prefill", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", type=Path, help="write the GGUF files into this folder and reuse them on later runs "
                   "(default: a temp folder, converted every run)")
    args = p.parse_args()
    from babyllama.formats.llama2c import load_checkpoint

    ctx = load_checkpoint(args.model).config.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for qtype in args.types.split(","):
            path = folder / f"{args.model.stem}_{qtype}.gguf"
            if not (args.keep and path.is_file()):
                partial = path.with_suffix(".partial")
                to_gguf(args.model, partial, qtype)
                partial.rename(path)  # a later run never reuses a half-written file
            row = {"model": args.model.name, "type": qtype, **bench(path, min(args.decode, ctx), min(args.prefill, ctx),
                                                                    args.repeats, args.threads, ctx)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llm.c interop, both directions (run by bench/llmc_interop.sh, which builds ./logits first).

1. babyllama -> llm.c: a random GPT-2 written by babyllama (formats/llmc.py) with a byte-level BPE
   trained here and written as gpt2_tokenizer.bin; llm.c's own C loader and forward (logits.c)
   give logits compared with babyllama's engine, and llm.c's tokenizer_decode's bytes compared
   with babyllama's.
2. llm.c -> babyllama: llm.c's train_gpt2.py (its GPT class, write_model for v3 fp32 and v5 bf16,
   write_tokenizer over a tiktoken Encoding) writes the files; babyllama loads them and its
   logits are compared with train_gpt2.py's torch forward and with llm.c's C forward.
3. `babyllama run` on the llm.c-written model with only gpt2_tokenizer.bin beside it.

Usage: python bench/llmc/interop.py LLMC_DIR LOGITS_BINARY WORK_DIR
"""

import subprocess
import sys
from pathlib import Path

import numpy as np

LLMC, DRIVER, WORK = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
TEXT = ("Once upon a time there was a little robot who liked to count tokens. Every day it counted "
        "more tokens than the day before, and every night it dreamed of merges. ") * 20


def c_logits(model, tokenizer, tokens, vocab):
    out = WORK / "c_logits.f32"
    res = subprocess.run([str(DRIVER), str(model), str(tokenizer), str(out), *map(str, tokens)],
                         capture_output=True, text=True, check=True)
    decoded = [line for line in res.stdout.splitlines() if line.startswith("llm.c decodes:")][0]
    return np.fromfile(out, np.float32).reshape(len(tokens), vocab), decoded


def report(label, got, want):
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    ok = diff <= 1e-4 * max(1.0, scale)
    print(f"  {label}: max |diff| {diff:.2e} (logits up to {scale:.2f}) {'OK' if ok else 'MISMATCH'}")
    return ok


def babyllama_to_llmc():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from babyllama.arch import gpt2
    from babyllama.config import ModelConfig
    from babyllama.engine import Engine
    from babyllama.formats.llmc import write_llmc, write_llmc_tokenizer
    from babyllama.testing import random_weights
    from babyllama.tokenizers.gpt2 import gpt2_conventions, llmc_pieces
    from babyllama.tokenizers.hf import HFTokenizer

    d = WORK / "ours"
    d.mkdir()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (d / "tokenizer.json").write_text(tk.to_str())
    tok = gpt2_conventions(HFTokenizer.from_file(d / "tokenizer.json", tk.get_vocab_size()))
    V = tok.vocab_size
    cfg = ModelConfig(dim=64, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=V, seq_len=32,
                      arch="gpt2")
    w = gpt2.Weights.from_dict(cfg, random_weights(cfg, seed=7, scale=0.2))
    write_llmc(d / "gpt2.bin", cfg, w)
    write_llmc_tokenizer(d / "gpt2_tokenizer.bin", *llmc_pieces(tok))
    tokens = tok.encode("Once upon a time the robot counted")
    print(f"1. babyllama -> llm.c: V {V} (padded to {-(-V // 128) * 128}), C 64, L 2, {len(tokens)} tokens")
    got, decoded = c_logits(d / "gpt2.bin", d / "gpt2_tokenizer.bin", tokens, V)
    ok = report("llm.c's forward vs babyllama's engine", got, Engine(cfg, w).logits(tokens))
    ours = "llm.c decodes:" + "".join(f" [{tok.token_bytes(-1, t).decode('utf-8', 'replace') or '<|endoftext|>'}]"
                                      for t in tokens)
    same = decoded == ours
    print(f"  llm.c's tokenizer_decode of gpt2_tokenizer.bin: {'same bytes as babyllama' if same else 'DIFFERENT'}")
    print(f"    {decoded}")
    return ok and same


def llmc_to_babyllama():
    import tiktoken
    import torch

    sys.path.insert(0, str(LLMC))
    import train_gpt2 as llmc

    from babyllama.engine import Engine
    from babyllama.formats.llmc import load_llmc
    from babyllama.tokenizers import load_tokenizer

    d = WORK / "theirs"
    d.mkdir()
    # a byte-level BPE in tiktoken (what write_tokenizer takes) of GPT-2's size, which write_model's
    # pad_vocab insists on (V == 50257): the 256 bytes, 50000 two-byte merges, then eot
    ranks = {bytes([i]): i for i in range(256)}
    for m in (b"th", b"he", b" t", b"in", b"er", b"an", b"ou", b"ok", b"en", b"s "):
        ranks[m] = len(ranks)
    for a in range(256):
        for b in range(256):
            if len(ranks) < 50256:
                ranks.setdefault(bytes([a, b]), len(ranks))
    enc = tiktoken.Encoding("tiny", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+""",
                            mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})
    V = enc.max_token_value + 1
    torch.manual_seed(0)
    model = llmc.GPT(llmc.GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=64)).eval()
    with torch.no_grad():  # GPT-2's init (std 0.02) makes near-zero logits: widen it for a sharper test
        for p in model.parameters():
            p.mul_(8.0).add_(0.02 * torch.randn_like(p))
    llmc.write_model(model, str(d / "gpt2_124M.bin"), "float32")
    llmc.write_model(model, str(d / "gpt2_124M_bf16.bin"), "bfloat16")
    llmc.write_tokenizer(enc, str(d / "gpt2_tokenizer.bin"))
    tokens = [enc.eot_token] + enc.encode("the token thinks about the other tokens")
    idx = torch.tensor([tokens])
    with torch.no_grad():
        want = model(idx, targets=idx)[0][0].numpy()  # with targets train_gpt2.py returns every position
    cfg, w = load_llmc(d / "gpt2_124M.bin")
    print(f"2. llm.c -> babyllama: train_gpt2.py's write_model (V {V}, C 64, L 2), {len(tokens)} tokens")
    got = Engine(cfg, w).logits(tokens)
    ok = report("babyllama's engine vs train_gpt2.py's torch forward", got, want)
    c, _ = c_logits(d / "gpt2_124M.bin", d / "gpt2_tokenizer.bin", tokens, V)
    ok &= report("babyllama's engine vs llm.c's C forward (same file)", got, c)
    _, w5 = load_llmc(d / "gpt2_124M_bf16.bin")
    bf16 = {n: p.detach().to(torch.bfloat16).float().numpy() for n, p in model.named_parameters()}
    exact = np.array_equal(w5.token_embedding, bf16["transformer.wte.weight"]) and \
        np.array_equal(w5.wqkv[1], bf16["transformer.h.1.attn.c_attn.weight"])
    print(f"  version 5 (bf16) file: weights {'equal' if exact else 'DIFFER from'} torch's bf16 rounding")
    tok = load_tokenizer(d / "gpt2_tokenizer.bin", V)
    same = all(tok.pieces[i] == enc.decode_bytes([i]) for i in range(V))
    print(f"  write_tokenizer's gpt2_tokenizer.bin: {V} tokens, eot {tok.bos_id}, "
          f"{'every token the same bytes as tiktoken' if same else 'DIFFERENT bytes'}")
    return ok and exact and same


def run_cli():
    model = WORK / "theirs" / "gpt2_124M.bin"
    print("3. babyllama run on the train_gpt2.py-written model (only gpt2_tokenizer.bin beside it)")
    for extra in ([], ["-i", "the"]):
        res = subprocess.run([sys.executable, "-m", "babyllama", "run", str(model), "-n", "12", "-s", "1", *extra],
                             capture_output=True, text=True)
        err = [line for line in res.stderr.splitlines() if "compiling" not in line]
        print(f"  $ babyllama run gpt2_124M.bin -n 12 -s 1 {' '.join(extra)}  -> exit {res.returncode}")
        if res.stdout.strip():
            print(f"    stdout: {res.stdout.strip()!r}")
        if err:
            print(f"    stderr: {err[-1]}")
    return True


if __name__ == "__main__":
    results = [babyllama_to_llmc(), llmc_to_babyllama(), run_cli()]
    print("llm.c interop:", "PASS" if all(results) else "FAIL")
    sys.exit(0 if all(results) else 1)

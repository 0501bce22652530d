"""The same weights in every form babyllama runs, decoded in turns: a .bin (v0) next to its Hugging
Face (fp32, bf16) and GGUF (F32, F16) forms, and v2 int8 at group size 32 next to GGUF Q8_0 (the
same integers after the repack). Issue #13: "bench on the HF and GGUF forms of a model gives its
.bin numbers, within noise".

    python bench/formats.py ../shared/data/stories260K.bin
    python bench/formats.py --shape 15M --shape 110M --rounds 5

Every round times each form once (greedy from BOS, evaluate.decode_speed, `--steps` positions); the
best round of each is reported, so a busy moment of a shared machine hits all forms alike, which
`babyllama bench A B` (all of A's runs, then all of B's) does not. Also reported: seconds to load
(map + convert + build the engine's arrays) and the file size. Needs the hf extra (safetensors,
gguf) and torch (to write the bf16 safetensors).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def forms(src: Path, tmp: Path) -> list[tuple[str, Path]]:
    """(label, path) of every form of the model at src, written into tmp."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    from babyllama.convert import convert, quantize_file
    from babyllama.formats.llama2c import load_checkpoint
    from babyllama.testing import placeholder_tokenizer

    vocab = load_checkpoint(src).config.vocab_size
    tok = tmp / "tokenizer.bin"  # decode speed does not depend on the pieces
    placeholder_tokenizer(vocab).save(tok)
    out = [(".bin v0", src)]
    convert(src, tmp / "hf", "hf")
    out.append(("HF fp32", tmp / "hf"))
    (tmp / "hf_bf16").mkdir()
    (tmp / "hf_bf16" / "config.json").write_bytes((tmp / "hf" / "config.json").read_bytes())
    tensors = load_file(str(tmp / "hf" / "model.safetensors"))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in tensors.items()},
              str(tmp / "hf_bf16" / "model.safetensors"), metadata={"format": "pt"})
    out.append(("HF bf16", tmp / "hf_bf16"))
    for kind in ("F32", "F16"):
        convert(src, tmp / f"{kind}.gguf", "gguf", tokenizer=tok, gguf_type=kind)
        out.append((f"GGUF {kind}", tmp / f"{kind}.gguf"))
    from babyllama.quant import group_size_problem

    if group_size_problem(load_checkpoint(src).config, 32, 8) is None:  # Q8_0's blocks tile every row
        quantize_file(src, tmp / "q8.bin", 8, 32)
        out.append((".bin v2 gs32", tmp / "q8.bin"))
        convert(src, tmp / "Q8_0.gguf", "gguf", tokenizer=tok, gguf_type="Q8_0")
        out.append(("GGUF Q8_0", tmp / "Q8_0.gguf"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="fp32 .bin files")
    p.add_argument("--shape", action="append", default=[], help="also a random model of this llama2.c shape")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=256)
    args = p.parse_args(argv)

    from babyllama.engine import Engine
    from babyllama.evaluate import decode_speed
    from babyllama.formats import load_for_inference
    from babyllama.testing import SHAPES, random_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = [(m.name, m) for m in args.models]
        for shape in args.shape:
            sources.append((f"random {shape}", random_model(SHAPES[shape], tmp / f"{shape}.bin")))
        print("| model | form | file MB | load s | loaded as | tok/s (best of rounds) | vs .bin |")
        print("|---|---|---|---|---|---|---|")
        for name, src in sources:
            work = tmp / name.replace(" ", "_")
            work.mkdir()
            engines = []
            for label, path in forms(src, work):
                load_for_inference(path, own_tokenizer=False, note=lambda text: None)  # imports, page cache
                t0 = time.perf_counter()
                loaded = load_for_inference(path, own_tokenizer=False, note=lambda text: None)
                engine = Engine(loaded.config, loaded.weights)
                size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
                engines.append((label, engine, time.perf_counter() - t0, size, loaded.description))
            steps = min(args.steps, engines[0][1].config.seq_len)
            best = {label: 0.0 for label, *_ in engines}
            for _ in range(args.rounds):
                for label, engine, *_ in engines:
                    best[label] = max(best[label], decode_speed(engine, steps, 1)[0])
            base = {"int8": best.get(".bin v2 gs32"), "fp32": best[".bin v0"]}
            for label, engine, load_s, size, desc in engines:
                ref = base["int8" if engine.quantized else "fp32"]
                print(f"| {name} | {label} | {size / 1e6:.1f} | {load_s:.2f} | {desc} | "
                      f"{best[label]:,.1f} | {best[label] / ref:.2f} |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

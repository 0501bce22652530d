"""The torch model and the NumPy engine are the same function: trained -> checkpoint -> exported -> run,
for llama2.c's shapes and for a Llama 3-style one (head_dim != dim / n_heads, theta, eps, rope scaling)."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity with the torch model needs the train extra")

from babyllama.config import ModelConfig, RopeScaling  # noqa: E402
from babyllama.convert import export_bin  # noqa: E402
from babyllama.engine import Engine  # noqa: E402
from babyllama.errors import CheckpointError  # noqa: E402
from babyllama.formats.ckpt import load_weights, save_weights  # noqa: E402
from babyllama.formats.llama2c import load_checkpoint  # noqa: E402
from babyllama.generation import generate_ids  # noqa: E402
from babyllama.training.model import Transformer  # noqa: E402

CONFIGS = {
    "gqa-tied": ModelConfig(dim=64, hidden_dim=172, n_layers=3, n_heads=8, n_kv_heads=4, vocab_size=128, seq_len=64),
    "mha-untied": ModelConfig(dim=48, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96, seq_len=64,
                              shared_classifier=False),
    "llama3-like": ModelConfig(dim=48, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, seq_len=64,
                               head_dim=16, rope_theta=500000.0, norm_eps=1e-6,
                               rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32)),
}


@functools.lru_cache(maxsize=None)
def trained_model(cfg: ModelConfig, steps: int = 15) -> Transformer:
    """A model a few optimizer steps away from its init, so the weights are not i.i.d. noise."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("version", [0, 1])
def test_exported_model_logits_and_greedy_tokens_match_torch(tmp_path, name, version):
    cfg = CONFIGS[name]
    model = trained_model(cfg)

    # the trainer's checkpoint -> the exporter -> a .bin -> the engine
    save_weights(tmp_path / "ckpt.pt", cfg, model.to_weights())
    cfg2, weights = load_weights(tmp_path / "ckpt.pt")
    assert cfg2 == cfg
    if version == 0 and not cfg.has_llama2c_defaults:  # run.c's format cannot hold theta, eps, head_dim, scaling
        with pytest.raises(CheckpointError, match="write --version 1, 2 or 3 instead"):
            export_bin(tmp_path / "model.bin", cfg, weights, version=version)
        return
    export_bin(tmp_path / "model.bin", cfg, weights, version=version)
    assert load_checkpoint(tmp_path / "model.bin").config == cfg
    engine = Engine.from_checkpoint(load_checkpoint(tmp_path / "model.bin"))

    tokens = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, _ = model(tokens, tokens)  # targets given -> logits at every position
    got = engine.logits(tokens[0].numpy())
    assert np.abs(got - want[0].numpy()).max() <= 1e-4

    prompt = [1, 5, 9]
    with torch.no_grad():
        torch_ids = model.generate(torch.tensor([prompt]), max_new_tokens=40, temperature=0.0)[0].tolist()
    state = engine.new_state()
    steps = len(prompt) + 40 - 1  # run.c's steps count positions: the last prompt position makes token 1 of 40
    engine_ids = prompt[:1] + list(generate_ids(engine, state, prompt, steps, lambda lg: int(np.argmax(lg))))
    # generate_ids stops early if BOS is sampled; torch does not stop, so compare the common prefix
    assert engine_ids == torch_ids[: len(engine_ids)]
    assert len(engine_ids) == len(torch_ids) or engine_ids[-1] == 1

"""The hand-written trainer end to end: llm.c's test_gpt2.c check (the same init and batch, 10 AdamW
steps, losses next to torch's), `babyllama train --backend numba` resuming itself bit for bit and
continuing torch's runs (and torch continuing its runs), non-finite losses, GPT-2 on both
backends, and its checkpoints through `babyllama export` and `run`."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from babyllama.cli import main as cli_main  # noqa: E402
from babyllama.cli.train import main as train_main  # noqa: E402
from babyllama.config import ModelConfig  # noqa: E402
from babyllama.errors import BabyLlamaError, CheckpointError, ConfigError, TrainError  # noqa: E402
from babyllama.training.grad import state  # noqa: E402
from babyllama.training.grad.adamw import AdamW  # noqa: E402
from babyllama.training.grad.layout import Layout  # noqa: E402
from babyllama.training.grad.trainer import MODELS  # noqa: E402
from babyllama.training.grad.workers import Workers  # noqa: E402
from babyllama.training.model import build_model  # noqa: E402
from conftest import shared_file  # noqa: E402
from test_train import TINY, assert_same_state, events, load  # noqa: E402

torch.set_num_threads(1)

E2E_CONFIGS = [
    pytest.param(ModelConfig(dim=48, hidden_dim=128, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=96, seq_len=40),
                 id="llama-gqa"),
    pytest.param(ModelConfig(arch="gpt2", dim=48, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96,
                             seq_len=40), id="gpt2"),
]


@pytest.mark.parametrize("cfg", E2E_CONFIGS)
def test_ten_adamw_steps_match_torch(cfg):
    """test_gpt2.c's check: one init, one B=4 batch, 10 steps of AdamW (weight decay on matrices,
    gradient clipping): every step's loss within 1e-4 relative of torch's."""
    torch.manual_seed(0)
    model = build_model(cfg)
    weights = model.to_weights()
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, cfg.vocab_size, (4, cfg.seq_len)) for _ in range(2))
    lr, wd, betas, clip = 3e-3, 0.1, (0.9, 0.95), 1.0

    params = [p for p in model.parameters()]
    opt_t = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=lr, betas=betas)
    torch_losses = []
    for _ in range(10):
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)
        torch_losses.append(loss.item())

    layout = Layout(cfg, MODELS[cfg.arch].FUSED)
    flat, grads = layout.zeros(), layout.zeros()
    state.load_into(layout, flat, weights)
    workers = Workers(MODELS[cfg.arch], cfg, layout, 4, 2)
    opt = AdamW(layout.size, layout.n_decay, wd, *betas)
    ours = []
    try:
        for _ in range(10):
            workers.zero_grad()
            ours.append(workers.forward_backward(layout.views(flat), x, y, 1.0 / x.size))
            workers.gradient(grads)
            opt.step(flat, grads, lr, opt.clip_coefficient(grads, clip))
    finally:
        workers.close()
    assert ours[-1] < ours[0] - 0.3  # it learns (the batch is memorised)
    assert np.allclose(ours, torch_losses, rtol=1e-4, atol=0), (ours, torch_losses)
    trained = state.weights_of(layout, flat)
    for name, value in model.to_weights().items():
        assert np.allclose(getattr(trained, name), value, rtol=0, atol=1e-4), name


def run(shards, out_dir, *flags) -> int:
    return train_main(["--data_dir", str(shards), "--out_dir", str(out_dir), *TINY, "--grad_accum", "2",
                       "--eval_interval", "4", *flags])


@pytest.fixture(scope="module")
def straight(excerpt_shards, tmp_path_factory):
    """8 steps in one go on each backend, from the same seed."""
    outs = {}
    for backend in ("numba", "torch"):
        outs[backend] = tmp_path_factory.mktemp(f"straight-{backend}")
        assert run(excerpt_shards, outs[backend], "--max_iters", "8", "--backend", backend) == 0
    return outs


def losses(out_dir):
    return [e["loss"] for e in events(out_dir, "train")]


def test_both_backends_train_the_same_run(straight):
    """The same seed gives the same initial model, batches and schedule: the loss curves agree to
    float32 rounding, as do the final weights."""
    a, b = losses(straight["numba"]), losses(straight["torch"])
    assert len(a) == 8 and np.allclose(a, b, rtol=1e-4, atol=0)
    va, vb = ([e["val_loss"] for e in events(straight[k], "eval")] for k in ("numba", "torch"))
    assert np.allclose(va, vb, rtol=1e-4, atol=0)
    wa, wb = load(straight["numba"])["model"], load(straight["torch"])["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4), k


def test_numba_resume_is_bit_exact(excerpt_shards, straight, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(excerpt_shards, out, "--max_iters", "4", "--lr_decay_iters", "8", "--backend", "numba") == 0
    assert load(out)["iter_num"] == 4
    assert train_main(["--out_dir", str(out), "--resume", "--max_iters", "8"]) == 0
    assert "backend: numba" in capsys.readouterr().out  # the saved setting carried the resume
    assert_same_state(load(out), load(straight["numba"]))
    keys = lambda e: (e["iter"], e["loss"], e["lr"])  # noqa: E731
    assert list(map(keys, events(out, "train"))) == list(map(keys, events(straight["numba"], "train")))


@pytest.mark.parametrize("first, then", [("torch", "numba"), ("numba", "torch")])
def test_a_run_continues_on_the_other_backend(excerpt_shards, straight, tmp_path, first, then):
    """4 steps on one backend, 4 more on the other from its ckpt.pt: the second half follows the
    straight run of the second backend (weights, AdamW moments and step came across)."""
    out = tmp_path / "out"
    assert run(excerpt_shards, out, "--max_iters", "4", "--lr_decay_iters", "8", "--backend", first) == 0
    assert train_main(["--out_dir", str(out), "--resume", "--max_iters", "8", "--backend", then]) == 0
    resumed, reference = load(out), load(straight[then])
    assert resumed["iter_num"] == 8 and resumed["train_config"]["backend"] == then
    assert np.allclose(losses(out)[4:], losses(straight[then])[4:], rtol=1e-4, atol=0)
    a, b = resumed["optimizer"]["state"], reference["optimizer"]["state"]
    assert a.keys() == b.keys()
    for i in a:
        assert float(a[i]["step"]) == float(b[i]["step"]) == 8
        assert torch.allclose(a[i]["exp_avg"], b[i]["exp_avg"], rtol=0, atol=1e-5), i
    assert resumed["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(excerpt_shards, tmp_path, monkeypatch,
                                                                    backend):
    from babyllama.training.grad.trainer import NumbaRun
    from babyllama.training.torch_loop import _TorchRun

    cls = NumbaRun if backend == "numba" else _TorchRun
    real = cls.accumulate_gradients

    def diverging(self, it):
        loss = real(self, it)
        return loss * float("nan") if it == 5 else loss  # step 6 diverges

    monkeypatch.setattr(cls, "accumulate_gradients", diverging)
    out = tmp_path / "out"
    with pytest.raises(TrainError) as err:
        run(excerpt_shards, out, "--max_iters", "8", "--backend", backend)
    message = str(err.value)
    assert "\n" not in message and message.startswith("step 6: the training loss is nan")
    assert f"{out / 'ckpt.pt'} keeps step 4, the last good one" in message
    assert load(out)["iter_num"] == 4
    assert [e["iter"] for e in events(out, "train")] == [1, 2, 3, 4, 5]  # nothing of step 6 logged


def test_a_diverged_model_before_any_save_says_nothing_was_saved(excerpt_shards, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainError, match=r"^step 1: the validation loss is (nan|inf) .*nothing was saved"):
        run(excerpt_shards, out, "--max_iters", "3", "--eval_interval", "1", "--lr", "1e30", "--min_lr", "0",
            "--warmup_iters", "0", "--grad_clip", "0", "--backend", "numba")
    assert not (out / "ckpt.pt").exists()


def test_export_and_run_take_its_checkpoint(straight, tmp_path, capsys):
    from babyllama.formats.llama2c import load_checkpoint

    ckpt = straight["numba"] / "ckpt.pt"
    model_bin = tmp_path / "model.bin"
    assert cli_main(["export", str(ckpt), str(model_bin), "--tokenizer", str(shared_file("tok512.model"))]) == 0
    exported = load_checkpoint(model_bin).weights
    for key, value in load(straight["numba"])["model"].items():
        name = key.split(".")[-2] if key.startswith("layers.") else key.split(".")[0]
        layer = int(key.split(".")[1]) if key.startswith("layers.") else None
        got = getattr(exported, name)[layer] if layer is not None else getattr(exported, name)
        assert np.array_equal(got, value.numpy()), key
    capsys.readouterr()
    assert cli_main(["run", str(model_bin), "-t", "0", "-n", "24", "-i", "Once upon a time"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_gpt2_trains_and_its_checkpoint_records_the_arch(excerpt_shards, tmp_path, backend, capsys):
    out = tmp_path / "out"
    flags = ["--arch", "gpt2", "--n_kv_heads", "0", "--max_iters", "6", "--eval_interval", "6", "--backend", backend]
    assert run(excerpt_shards, out, *flags) == 0
    ckpt = load(out)
    assert ckpt["model_config"]["arch"] == "gpt2" and ckpt["model_config"]["hidden_dim"] == 4 * 32
    assert "layers.1.wqkv.bias" in ckpt["model"] and "position_embedding.weight" in ckpt["model"]
    curve = losses(out)
    assert curve[-1] < curve[0]
    capsys.readouterr()
    assert cli_main(["export", str(out / "ckpt.pt"), str(tmp_path / "m.bin")]) == 1
    assert "gpt2" in capsys.readouterr().err
    if backend == "numba":  # the same run as torch's: same init, same batches
        ref = tmp_path / "torch"
        assert run(excerpt_shards, ref, *flags[:-1], "torch") == 0
        assert np.allclose(curve, losses(ref), rtol=1e-4, atol=0)


def test_settings_the_numba_backend_cannot_run(excerpt_shards, tmp_path, capsys):
    with pytest.raises(TrainError, match="--backend numba trains one process on the CPU .*--dropout 0.1 needs "
                                         "--backend torch") as err:
        run(excerpt_shards, tmp_path / "a", "--max_iters", "1", "--backend", "numba", "--dropout", "0.1")
    assert "\n" not in str(err.value)
    assert run(excerpt_shards, tmp_path / "b", "--max_iters", "1", "--dropout", "0.1") == 0  # auto: torch
    assert "backend: torch (auto: --dropout 0.1 needs torch)" in capsys.readouterr().out
    with pytest.raises(TrainError, match="--backend must be one of auto, torch, numba; got 'jax'"):
        run(excerpt_shards, tmp_path / "c", "--backend", "jax")


@pytest.mark.parametrize("flags, error, match", [
    (["--arch", "gpt2", "--n_kv_heads", "2"], ConfigError, r"arch gpt2: n_kv_heads must be 4 \(GPT-2 has no "
                                                           r"grouped-query attention\), found 2"),
    (["--arch", "gpt2", "--n_kv_heads", "0", "--no-shared_classifier"], ConfigError, "arch gpt2: shared_classifier must be True"),
    (["--arch", "bert"], TrainError, "--arch must be one of llama, gpt2; got 'bert'"),
])
def test_bad_architecture_settings_are_one_line_errors(excerpt_shards, tmp_path, flags, error, match):
    with pytest.raises(error, match=match) as err:
        run(excerpt_shards, tmp_path / "out", "--max_iters", "1", *flags)
    assert "\n" not in str(err.value) and isinstance(err.value, BabyLlamaError)


def test_a_checkpoint_whose_optimizer_does_not_fit_is_refused(straight, tmp_path):
    ckpt = load(straight["numba"])
    ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"][:1]
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    layout = Layout(cfg, MODELS[cfg.arch].FUSED)
    with pytest.raises(CheckpointError, match=r"expected AdamW's two parameter groups of \d+ and \d+ tensors"):
        state.restore(layout, layout.zeros(), AdamW(layout.size, layout.n_decay, 0.1, 0.9, 0.95), ckpt, "ckpt.pt")


def test_auto_takes_torch_where_a_gpu_is_present():
    from babyllama.training import TrainConfig
    from babyllama.training.config import choose_backend

    assert choose_backend(TrainConfig(), 1, cuda_available=False) == ("numba", "auto: one process on the CPU")
    assert choose_backend(TrainConfig(), 1, cuda_available=True)[0] == "torch"
    assert choose_backend(TrainConfig(device="cpu"), 1, cuda_available=True)[0] == "numba"
    assert choose_backend(TrainConfig(), 2, cuda_available=False) == ("torch", "auto: 2 processes (torchrun) needs torch")
    with pytest.raises(TrainError, match=r"--device auto \(a GPU is present\) needs --backend torch"):
        choose_backend(TrainConfig(backend="numba"), 1, cuda_available=True)

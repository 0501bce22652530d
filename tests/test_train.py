"""`babyllama train`: learning on real text, exact resume, Ctrl-C and SIGTERM, DDP == 1 process, bad settings."""

import json
import os
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from babyllama.cli.train import main as train_main  # noqa: E402
from babyllama.errors import BabyLlamaError, CheckpointError, OutputError, TrainError  # noqa: E402
from babyllama.training import TrainConfig, lr_at, parse_config  # noqa: E402
from babyllama.training.loop import Interrupts  # noqa: E402
from conftest import ROOT, shared_file  # noqa: E402

torch.set_num_threads(1)

# A model small enough for a few dozen CPU steps in a test.
TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--seq_len", "32",
        "--batch_size", "8", "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_iters", "2",
        "--eval_iters", "2", "--log_interval", "1"]


@pytest.fixture(scope="module")
def shards(excerpt_shards):
    return excerpt_shards


def run(shards, out_dir, *flags) -> int:
    return train_main(["--data_dir", str(shards), "--out_dir", str(out_dir), *TINY, *flags])


def events(out_dir, kind):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def load(out_dir):
    return torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    assert a["iter_num"] == b["iter_num"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for p in sa:
        for k in sa[p]:
            assert torch.equal(sa[p][k], sb[p][k]), (p, k)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_loss_falls_on_real_text(shards, tmp_path, capsys, backend):
    out = tmp_path / "out"
    assert run(shards, out, "--dim", "64", "--seq_len", "64", "--batch_size", "16", "--max_iters", "120",
               "--eval_interval", "60", "--log_interval", "20", "--backend", backend) == 0
    start = events(out, "eval")[0]
    assert start["iter"] == 0 and abs(start["val_loss"] - 6.24) < 0.2  # ln(512) = 6.24 before training
    train_losses = [e["loss"] for e in events(out, "train")]
    assert train_losses[-1] < 0.7 * start["val_loss"]
    assert events(out, "eval")[-1]["val_loss"] < 0.7 * start["val_loss"]
    ckpt = load(out)
    assert ckpt["iter_num"] == 120 and ckpt["model_config"]["vocab_size"] == 512
    assert sorted(p.name for p in out.iterdir()) in (["ckpt.pt", "metrics.jsonl"], ["ckpt.pt", "loss.png", "metrics.jsonl"])
    printed = capsys.readouterr().out
    assert "iter 120/120 | loss" in printed and "tok/s" in printed and "ETA" in printed
    assert f"backend: {backend} (--backend {backend})" in printed


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory):
    """8 steps in one go, with dropout and gradient accumulation so that RNG and micro-steps matter."""
    out = tmp_path_factory.mktemp("straight")
    assert run(shards, out, "--max_iters", "8", "--dropout", "0.1", "--grad_accum", "2", "--eval_interval", "4") == 0
    return out


def test_resume_is_bit_exact(shards, straight_run, tmp_path):
    out = tmp_path / "out"
    # Stop after 4 of the same 8-step schedule, then `--resume` with only the new max_iters: every
    # other setting (lr_decay_iters included) comes from the checkpoint.
    assert run(shards, out, "--max_iters", "4", "--lr_decay_iters", "8", "--dropout", "0.1", "--grad_accum", "2",
               "--eval_interval", "4") == 0
    assert load(out)["iter_num"] == 4
    assert train_main(["--out_dir", str(out), "--resume", "--max_iters", "8"]) == 0
    assert_same_state(load(out), load(straight_run))
    # the metrics log continues where it stopped: the same losses and learning rates as one run
    keys = lambda e: (e["iter"], e["loss"], e["lr"])  # noqa: E731
    assert list(map(keys, events(out, "train"))) == list(map(keys, events(straight_run, "train")))


def test_ctrl_c_saves_the_last_completed_step_and_resumes_exactly(shards, straight_run, tmp_path, monkeypatch, capsys):
    from babyllama.data import TokenWindows

    real_batch = TokenWindows.batch

    def interrupted_batch(self, step):
        if self.split == "train" and step == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while step 3 was loading
        return real_batch(self, step)

    out = tmp_path / "out"
    monkeypatch.setattr(TokenWindows, "batch", interrupted_batch)
    assert run(shards, out, "--max_iters", "8", "--dropout", "0.1", "--grad_accum", "2", "--eval_interval", "4") == 130
    assert "step 3 saved" in capsys.readouterr().out
    assert load(out)["iter_num"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    monkeypatch.setattr(TokenWindows, "batch", real_batch)
    assert train_main(["--out_dir", str(out), "--resume"]) == 0
    assert_same_state(load(out), load(straight_run))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_real_signal_exits_130_with_a_resumable_checkpoint(shards, tmp_path, sig):
    """Ctrl-C, and SIGTERM (what `kill`, torchrun and job schedulers send), both save the last step."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "babyllama", "train", "--data_dir", str(shards), "--out_dir", str(out), *TINY,
           "--max_iters", "100000", "--eval_interval", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("iter 3/"):
                break
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert f"resume with: babyllama train --out_dir {out} --resume" in rest
    assert load(out)["iter_num"] >= 3
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_an_update_waits_for_the_update_to_finish(sig):
    from babyllama.cli import _sigterm

    previous = signal.signal(signal.SIGTERM, _sigterm)  # as `babyllama` runs: SIGTERM is Ctrl-C
    try:
        steps = []
        with Interrupts() as interrupts:
            with pytest.raises(KeyboardInterrupt):
                with interrupts.update():
                    os.kill(os.getpid(), sig)
                    steps.append("finished")  # the update is not cut short
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)  # outside an update: at once
                for _ in range(1000):
                    pass
        assert steps == ["finished"]
        assert signal.getsignal(signal.SIGTERM) is _sigterm  # the handlers are restored
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_with_a_different_model_names_the_fields(shards, straight_run):
    with pytest.raises(TrainError, match=r"dim 32 \(checkpoint\) vs 48 \(requested\).*n_layers 2 \(checkpoint\) vs 3"):
        train_main(["--out_dir", str(straight_run), "--resume", "--dim", "48", "--n_layers", "3", "--max_iters", "9"])


def test_two_processes_under_torchrun_match_one(shards, tmp_path):
    flags = ["--data_dir", str(shards), *TINY, "--max_iters", "5", "--grad_accum", "2", "--eval_interval", "5",
             "--backend", "torch"]
    one = tmp_path / "one"
    assert train_main([*flags, "--out_dir", str(one)]) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "babyllama", "train", *flags, "--out_dir", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        a, b = [e[key] for e in events(one, kind)], [e[key] for e in events(two, kind)]
        assert len(a) == len(b) > 1
        assert a == pytest.approx(b, rel=1e-4)
    assert load(two)["world_size"] == 2 and len(load(two)["rng_states"]) == 2


def test_config_file_with_flags_overriding(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('dim = 48\nlr = 1\nout_dir = "somewhere"\ncompile = false\n')
    tc, explicit = parse_config(["--config", str(cfg), "--lr", "0.002", "--n-layers", "3"])
    assert (tc.dim, tc.lr, tc.n_layers, tc.out_dir) == (48, 0.002, 3, "somewhere")
    assert isinstance(tc.lr, float) and tc.batch_size == TrainConfig().batch_size
    assert set(explicit) == {"dim", "lr", "out_dir", "compile", "n_layers"}


@pytest.mark.parametrize("text, match", [
    ("learning_rate = 1e-3\n", "unknown key 'learning_rate'"),
    ('dim = "big"\n', "key 'dim' must be a int"),
    ("dim = 1.5\n", "key 'dim' must be a int"),
    ("dim = [\n", "invalid TOML"),
])
def test_bad_config_files(tmp_path, text, match):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    with pytest.raises(TrainError, match=match):
        parse_config(["--config", str(cfg)])


@pytest.mark.parametrize("flags, match", [
    (["--lr=-1e-3"], "--lr must be a positive"),
    (["--batch_size", "10", "--grad_accum", "4"], "divisible by processes x --grad_accum"),
    (["--dropout", "1.0"], "--dropout"),
    (["--max_iters", "0"], "--max_iters must be positive"),
    (["--dtype", "bf16"], "--dtype bf16 is for CUDA"),
    (["--n_heads", "5"], "divisible by n_heads"),
])
def test_bad_values_are_one_line_errors(shards, tmp_path, flags, match):
    with pytest.raises(BabyLlamaError, match=match) as err:
        run(shards, tmp_path / "out", "--device", "cpu", *flags)
    assert "\n" not in str(err.value)


def test_missing_data_dir_and_tiny_corpus(tmp_path):
    with pytest.raises(TrainError, match="no such directory"):
        train_main(["--data_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "out"), *TINY])
    from babyllama.data import pretokenize

    text = tmp_path / "tiny.txt"
    text.write_text("Once upon a time there was a cat.\nThe end.\n")
    pretokenize(shared_file("tok512.model"), text, tmp_path / "tok", val_fraction=0.0, workers=1)
    with pytest.raises(BabyLlamaError, match="smaller than one window"):
        train_main(["--data_dir", str(tmp_path / "tok"), "--out_dir", str(tmp_path / "out"), *TINY])
    assert not (tmp_path / "out").exists()


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        train_main(["--out_dir", str(tmp_path), "--resume"])


def test_resume_refuses_a_weights_only_checkpoint(tmp_path, tiny_config):
    from babyllama.arch.llama import Weights
    from babyllama.formats.ckpt import save_weights
    from conftest import random_weights

    save_weights(tmp_path / "ckpt.pt", tiny_config, Weights.from_dict(tiny_config, random_weights(tiny_config)))
    with pytest.raises(CheckpointError, match="expected keys optimizer, scaler, .* not found; it holds weights only"):
        train_main(["--out_dir", str(tmp_path), "--resume"])


def test_out_dir_that_is_the_data_dir_is_refused(shards, tmp_path):
    (tmp_path / "link").symlink_to(shards)
    for out in (shards, tmp_path / "link"):
        with pytest.raises(OutputError, match="the output is the input"):
            run(shards, out, "--max_iters", "1")
    assert not (shards / "ckpt.pt").exists() and not (shards / "metrics.jsonl").exists()


def test_out_dir_in_a_missing_folder_is_a_one_line_error(shards, tmp_path):
    with pytest.raises(OutputError, match=f"{tmp_path / 'no'} does not exist"):
        run(shards, tmp_path / "no" / "out", "--max_iters", "1")


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    lrs = [lr_at(i, tc) for i in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then never rises
    assert lrs[100] == lrs[119] == 1e-4


def test_python_m_babyllama_training_is_babyllama_train():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "babyllama.training", "--help"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: babyllama train"), proc.stderr

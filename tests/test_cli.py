"""`babyllama run`: llama2.c parity through the real CLI, --json, and one-line errors for bad input."""

import base64
import json
import subprocess
import sys

import pytest
from conftest import shared_file, shared_fixture, tiny_tokenizer_file

from babyllama.cli import main


def run_cli(capsysbinary, *argv):
    """Run the CLI in-process; returns (exit code, stdout bytes, stderr text)."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors exit directly
        code = e.code
    out = capsysbinary.readouterr()
    return code, out.out, out.err.decode()


def fixture_cases():
    path = shared_fixture("generate_stories260K.json")
    return json.loads(path.read_text())["cases"]


def case_argv(args):
    argv = ["-t", str(args["temperature"]), "-p", str(args["topp"]), "-s", str(args["seed"]), "-n", str(args["steps"])]
    if args["prompt"] is not None:
        argv += ["-i", args["prompt"]]
    return argv


@pytest.mark.parametrize("index", range(5))
def test_llama2c_fixture_stdout_and_tokens(capsysbinary, index):
    cases = fixture_cases()
    if index >= len(cases):
        pytest.skip("fixture has fewer cases")
    case = cases[index]
    model, tok = shared_file("stories260K.bin"), shared_file("tok512.bin")
    code, out, err = run_cli(capsysbinary, "run", str(model), "-z", str(tok), *case_argv(case["args"]))
    assert code == 0, err
    assert out == base64.b64decode(case["stdout_b64"])
    assert "achieved tok/s" in err

    code, out, _ = run_cli(capsysbinary, "run", str(model), "-z", str(tok), *case_argv(case["args"]), "--json")
    result = json.loads(out)
    assert result["tokens"][0] == 1
    assert result["tokens"][1:] == case["generated_ids"]
    assert result["text"] + "\n" == base64.b64decode(case["stdout_b64"]).decode()
    assert result["prompt_tokens"] >= 1 and result["generated_tokens"] >= 1
    assert result["tokens_per_second"] > 0 and result["time_to_first_token_s"] > 0


def test_tokenizer_found_beside_model(capsysbinary, tiny_model):
    code, out, err = run_cli(capsysbinary, "run", str(tiny_model), "-t", "0", "-n", "20", "-i", "the cat")
    assert code == 0, err
    assert out.startswith(b"the cat")


def test_json_step_count_and_prompt(capsysbinary, tiny_model):
    code, out, _ = run_cli(capsysbinary, "run", str(tiny_model), "-t", "0.8", "-s", "3", "-n", "30", "-i", "the", "--json")
    result = json.loads(out)
    assert code == 0
    # steps counts positions including the prompt: at most 30 tokens after the first
    assert len(result["tokens"]) <= 31
    if 1 not in result["tokens"][1:]:
        assert len(result["tokens"]) == 31
    assert result["prompt_tokens"] == 2  # BOS, " the" (a piece of the tiny vocabulary)
    assert result["text"].startswith("the")


def test_same_seed_same_text_and_seed_matters(capsysbinary, tiny_model):
    outs = [run_cli(capsysbinary, "run", str(tiny_model), "-s", str(s), "-n", "40")[1] for s in (7, 7, 8)]
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-n", "-5"], "-n (steps) must be >= 0, got -5"),
        (["-t", "-1"], "-t (temperature) must be >= 0.0, got -1"),
        (["-t", "nan"], "-t (temperature) must be finite"),
        (["-p", "1.5"], "-p (top-p) must be >= 0.0 and <= 1.0, got 1.5"),
        (["-s", "-3"], "-s (seed) must be >= 0"),
        (["-n", "abc"], "-n (steps) expects int, got 'abc'"),
        (["-k", "-2"], "-k (top-k) must be >= 0"),
        (["-m", "poem"], "invalid choice: 'poem'"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_absurd_flags_are_one_line_errors(capsysbinary, tiny_model, flags, message):
    code, out, err = run_cli(capsysbinary, "run", str(tiny_model), *flags)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert out == b""


def test_bad_files_are_one_line_errors(capsysbinary, tiny_model, tmp_path):
    cases = []
    cases.append((["run", str(tmp_path / "nope.bin")], "no such model file"))
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(tiny_model.read_bytes()[:-100])
    cases.append((["run", str(trunc), "-z", str(tmp_path / "tokenizer.bin")], "truncated"))
    wrong_vocab = tiny_tokenizer_file(tmp_path / "tok_big.bin", 400)
    cases.append((["run", str(tiny_model), "-z", str(wrong_vocab)], "300"))
    cases.append((["run", str(tiny_model), "-z", str(tmp_path / "missing_tok.bin")], "missing_tok.bin"))
    cases.append((["run", str(tiny_model), "-i", "the " * 100], "longer than the model's context of 64"))
    for argv, message in cases:
        code, out, err = run_cli(capsysbinary, *argv)
        assert code == 1, (argv, err)
        assert message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_no_tokenizer_anywhere(capsysbinary, tmp_path, tiny_model, monkeypatch):
    (tmp_path / "tokenizer.bin").unlink()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsysbinary, "run", str(tiny_model))
    assert code == 1 and "pass -z TOKENIZER" in err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "babyllama", "run", str(tmp_path / "missing.bin")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no such model file" in proc.stderr
    assert proc.stdout == ""


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_chat_mode_reads_turns_until_end_of_input(tmp_path, tiny_model):
    proc = subprocess.run(
        [sys.executable, "-m", "babyllama", "run", str(tiny_model), "-m", "chat", "-y", "be nice",
         "-n", "60", "-s", "1"],
        input="the cat\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("User: Assistant: ")


def test_inference_path_never_imports_torch(tiny_model):
    code = (
        "import sys; from babyllama.cli import main; "
        f"rc = main(['run', {str(tiny_model)!r}, '-n', '8', '-t', '0']); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# what a new user and hostile input found (issue #9)


def test_system_prompt_without_chat_mode_is_refused(capsysbinary, tiny_model):
    code, out, err = run_cli(capsysbinary, "run", str(tiny_model), "-y", "be brief")
    assert code == 1 and out == b""
    assert err.strip() == "babyllama run: error: -y (system prompt) applies to -m chat only; add -m chat or drop -y"


def test_prompt_that_is_not_utf8_is_encoded_as_its_bytes(tmp_path, tiny_model):
    """Python hands undecodable argv bytes over as lone surrogates; run.c would encode the raw
    bytes (byte tokens). babyllama does the same and says so, instead of a traceback."""
    from babyllama.tokenizers import load_tokenizer

    raw = b"caf\xe9 \xff the"  # latin-1 text, not UTF-8
    proc = subprocess.run([sys.executable.encode(), b"-m", b"babyllama", b"run", str(tiny_model).encode(),
                           b"-t", b"0", b"-n", b"20", b"--json", b"-i", raw], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert b"-i is not valid UTF-8; its bytes are encoded as they are" in proc.stderr
    assert b"Traceback" not in proc.stderr
    tok = load_tokenizer(tiny_model.parent / "tokenizer.bin", 300)
    prompt = tok.encode(raw)
    tokens = json.loads(proc.stdout)["tokens"]
    assert tokens[: len(prompt)] == prompt and 0xE9 + 3 in prompt  # the byte token of 0xE9


def test_prompt_longer_than_steps_is_cut_and_said(capsysbinary, tiny_model):
    code, out, err = run_cli(capsysbinary, "run", str(tiny_model), "-t", "0", "-n", "5", "--json",
                             "-i", "the cat and the dog and the bird")
    assert code == 0, err
    result = json.loads(out)
    assert "only its first 6 tokens are used (as run.c does)" in err
    assert len(result["tokens"]) == 6 == result["prompt_tokens"]  # BOS + 5 forced tokens, nothing sampled
    assert result["generated_tokens"] == 0 and result["prompt_tokens_dropped"] > 0


def test_interrupted_json_run_prints_what_it_has(capsysbinary, tiny_model, monkeypatch):
    """Ctrl-C during --json: the JSON of what was generated, marked interrupted, exit 130."""
    from babyllama.api import Model

    real = Model.pieces

    def interrupted(self, *args, **kwargs):
        for i, piece in enumerate(real(self, *args, **kwargs)):
            if i == 6:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(Model, "pieces", interrupted)
    code, out, err = run_cli(capsysbinary, "run", str(tiny_model), "-t", "0", "-n", "40", "-i", "the", "--json")
    assert code == 130
    result = json.loads(out)
    assert result["interrupted"] is True and len(result["tokens"]) == 7


def test_full_stdout_is_a_one_line_error(tiny_model):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "babyllama", "run", str(tiny_model), "-n", "20"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["babyllama run: error: cannot write the output (No space left on device)"]


def test_generate_takes_bytes_as_text(tiny_model):
    import babyllama

    model = babyllama.load(tiny_model)
    text = "the cat"
    assert list(model.generate(text.encode(), steps=20, temperature=0)) == list(model.generate(text, steps=20,
                                                                                                temperature=0))
    assert model.encode(b"the cat") == model.encode("the cat")


def test_python_dash_m_babyllama(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "babyllama", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("babyllama ")

import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.cli import main
from gptlab.tokenizer import Tokenizer

TINY_MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
TINY_TRAIN = ["--batch-size", "4", "--max-steps", "6", "--warmup-steps", "2", "--eval-every", "3", "--eval-batches", "2",
              "--save-every", "3", "--log-every", "1", "--device", "cpu", "--seed", "5", "-q"]  # fmt: skip


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_does_not_import_torch():
    code = "import sys; from gptlab.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    help_text = subprocess.run([sys.executable, "-m", "gptlab", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("tokenizer", "prepare", "train", "sample", "eval", "plot", "demo"):
        assert command in help_text


def test_full_pipeline_through_the_cli(tmp_path, corpus_dir, capsys, monkeypatch):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    code, out, _ = run(capsys, "prepare", "--input", str(corpus_dir), "--tokenizer", "train:300", "--out", str(data), "-q")
    assert code == 0 and "train:" in out and (data / "train_000000.bin").exists()

    code, out, _ = run(capsys, "train", "--data", str(data), "--out", str(run_dir), *TINY_MODEL, *TINY_TRAIN)
    assert code == 0 and "val loss" in out and "bpb" in out
    code, out, _ = run(capsys, "train", "--data", str(data), "--out", str(run_dir), "--resume", "--max-steps", "9", "--device", "cpu", "-q")
    assert code == 0 and "step 9" in out

    sample = ["sample", "--ckpt", str(run_dir), "--prompt", "The ", "--max-new-tokens", "20", "--seed", "3", "--device", "cpu"]
    code, first, err = run(capsys, *sample)
    assert code == 0 and first.startswith("The ") and "tokens/s" in err
    assert run(capsys, *sample)[1] == first  # seeded: identical
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("The "))
    assert run(capsys, *sample[:3], "--max-new-tokens", "20", "--seed", "3", "--device", "cpu")[1] == first  # prompt from stdin
    code, out, _ = run(capsys, "sample", "--ckpt", str(run_dir), "--prompt", "x", "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu")
    assert code == 0

    code, out, _ = run(capsys, "eval", "--ckpt", str(run_dir), "--data", str(data), "--device", "cpu", "-q")
    assert code == 0 and "perplexity" in out and "bits per byte" in out

    code, out, _ = run(capsys, "plot", str(run_dir))
    assert code == 0 and "loss.png" in out and (run_dir / "lr.png").exists()

    tok = str(data / "tokenizer.json")
    code, ids, _ = run(capsys, "tokenizer", "encode", "--tokenizer", tok, "--text", "Hello, wörld 🌍")
    code, text, _ = run(capsys, "tokenizer", "decode", "--tokenizer", tok, *ids.split())
    assert text == "Hello, wörld 🌍\n"
    code, out, _ = run(capsys, "tokenizer", "info", "--tokenizer", "gpt2")
    assert "50257" in out


def test_tokenizer_train_command(tmp_path, corpus_dir, capsys):
    out_file = tmp_path / "tok.json"
    code, out, _ = run(
        capsys, "tokenizer", "train", "--input", str(corpus_dir), "--vocab-size", "400", "--out", str(out_file),
        "--special-tokens", "<|im_start|>", "<|im_end|>", "-q",
    )  # fmt: skip
    assert code == 0 and out_file.exists() and "400 tokens" in out
    tok = Tokenizer.load(out_file)
    assert tok.special_tokens == {"<|endoftext|>": 397, "<|im_start|>": 398, "<|im_end|>": 399}
    assert tok.encode("<|im_start|>hi<|im_end|>")[0] == 398
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", "gpt2", "--text", "Hello world")
    assert out.split() == ["15496", "995"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "--input", "/no/such/file.txt", "--tokenizer", "gpt2", "--out", "{tmp}/d"], "no such file or directory"),
        (["prepare", "--input", "{corpus}", "--tokenizer", "/no/tok.json", "--out", "{tmp}/d"], "/no/tok.json"),
        (["prepare", "--input", "{corpus}", "--tokenizer", "train:abc", "--out", "{tmp}/d"], "train:N"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--n-embd", "30", "--n-head", "4"], "n_embd"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--block-size", "999999"], "block_size"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/r"], "not a prepared data directory"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--lr", "-1"], "lr"),
        (["sample", "--ckpt", "{tmp}/nothing", "--prompt", "hi"], "no such checkpoint"),
        (["eval", "--ckpt", "{tmp}", "--data", "{data}"], "no checkpoint"),
        (["tokenizer", "decode", "--tokenizer", "gpt2", "12", "abc"], "must be integers"),
        (["tokenizer", "decode", "--tokenizer", "gpt2", "99999999"], "99999999"),
        (["plot", "{tmp}"], "no metrics file"),
    ],
)
def test_bad_input_gives_a_one_line_error_and_exit_2(tmp_path, corpus_dir, data_dir, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, corpus=corpus_dir, data=data_dir) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("gptlab: error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir):
    """A tiny checkpoint and its Hugging Face export."""
    from gptlab.checkpoint import write_checkpoint_dir
    from gptlab.config import GPTConfig
    from gptlab.data import load_data
    from gptlab.hf import export_hf
    from gptlab.model import GPT

    root = tmp_path_factory.mktemp("exported")
    cfg = GPTConfig(vocab_size=512, block_size=32, n_layer=1, n_head=2, n_embd=32)
    (root / "ckpt").mkdir()
    write_checkpoint_dir(root / "ckpt", 0, GPT(cfg), cfg, load_data(data_dir).tokenizer())
    export_hf(root / "ckpt", root / "hf")
    return root / "ckpt", root / "hf"


@pytest.mark.parametrize("out", ["/proc/nope", "{tmp}/file/sub", "/proc/self/nope/deeper"])
@pytest.mark.parametrize(
    "argv",
    [
        ["export-hf", "{ckpt}", "--out", "{out}"],
        ["import-hf", "{hf}", "--out", "{out}"],
        ["train", "--data", "{data}", "--out", "{out}", *TINY_MODEL, *TINY_TRAIN],
        ["prepare", "--input", "{corpus}", "--tokenizer", "gpt2", "--out", "{out}", "-q"],
        ["tokenizer", "train", "--input", "{corpus}", "--vocab-size", "300", "--out", "{out}/tok.json", "-q"],
        ["plot", "{ckpt_run}", "--out", "{out}"],
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_an_output_that_cannot_be_created_gives_one_line_and_exit_2(tmp_path, corpus_dir, data_dir, exported, capsys, argv, out):
    (tmp_path / "file").write_text("a file where a directory should be")
    ckpt, hf = exported
    run_dir = tmp_path / "run"
    if argv[0] == "plot":  # a run with metrics to plot
        assert run(capsys, "train", "--data", str(data_dir), "--out", str(run_dir), *TINY_MODEL, *TINY_TRAIN)[0] == 0
    out = out.format(tmp=tmp_path)
    fields = dict(tmp=tmp_path, corpus=corpus_dir, data=data_dir, ckpt=ckpt, hf=hf, out=out, ckpt_run=run_dir)
    code, _, err = run(capsys, *[a.format(**fields) for a in argv])
    assert code == 2 and err.startswith("gptlab: error: ") and err.count("\n") == 1, err
    assert str(Path(out).parent) in err, err  # the message names the output or what blocks it


def test_long_prompt_and_corrupted_checkpoint_through_the_cli(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--data", str(data_dir), "--out", str(run_dir), *TINY_MODEL, *TINY_TRAIN)[0] == 0
    code, _, err = run(capsys, "sample", "--ckpt", str(run_dir), "--prompt", "the " * 100, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "prompt has" in err and "block_size) is 32" in err
    weights = sorted(run_dir.glob("checkpoints/step_*/model.safetensors"))[-1]  # the latest, which sample loads
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    code, _, err = run(capsys, "sample", "--ckpt", str(run_dir), "--prompt", "a", "--device", "cpu")
    assert code == 2 and "corrupted" in err


def test_sample_batches_streaming_stops_and_speculative(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--data", str(data_dir), "--out", str(run_dir), *TINY_MODEL, *TINY_TRAIN)[0] == 0
    base = ["sample", "--ckpt", str(run_dir), "--device", "cpu", "--max-new-tokens", "12", "--temperature", "0", "--ignore-eot"]
    code, plain, err = run(capsys, *base, "--prompt", "the ")
    assert code == 0 and plain.startswith("the ") and "tokens/s" in err
    code, streamed, _ = run(capsys, *base, "--prompt", "the ", "--stream")
    assert code == 0 and streamed == plain  # streaming prints the same text

    batch = tmp_path / "prompts.jsonl"
    batch.write_text('"the "\n{"prompt": "a\\nb"}\n\n"x"\n', encoding="utf-8")
    code, out, _ = run(capsys, *base, "--batch-file", str(batch), "--repetition-penalty", "1.3", "--min-p", "0.1")
    assert code == 0 and out.count("===== ") == 3 and "a\nb" in out
    lines = tmp_path / "prompts.txt"
    lines.write_text("the \nthe \n", encoding="utf-8")
    code, out, _ = run(capsys, *base, "--batch-file", str(lines))
    texts = [part.split("\n", 1)[1] for part in out.split("===== ")[1:]]
    assert code == 0 and texts[0] == texts[1] == plain  # each row as if alone

    stop = plain[len("the ") :][3:5]
    code, out, _ = run(capsys, *base, "--prompt", "the ", "--stop", stop)
    assert code == 0 and out == plain[: plain.index(stop, len("the "))] + "\n"

    code, out, err = run(capsys, *base, "--prompt", "the ", "--draft-ckpt", str(run_dir), "--draft-tokens", "3")
    assert code == 0 and out == plain and "draft acceptance 100%" in err

    code, out, _ = run(capsys, *base, "--prompt", "the " * 40, "--sliding-window", "--max-new-tokens", "40")
    assert code == 0

    code, _, err = run(capsys, *base, "--batch-file", str(lines), "--stream")
    assert code == 2 and "--stream" in err
    code, _, err = run(capsys, *base, "--batch-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "cannot read batch file" in err
    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    code, _, err = run(capsys, *base, "--batch-file", str(tmp_path / "bad.jsonl"))
    assert code == 2 and "bad.jsonl:1: not JSON" in err


def test_train_with_only_max_steps_derives_the_warmup_and_says_so(tmp_path, data_dir, capsys):
    # the bar a new user runs first: no --warmup-steps, a short run
    base = ["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY_MODEL, "--device", "cpu", "-q"]
    code, out, err = run(capsys, *base, "--max-steps", "30")
    assert code == 0, err
    assert "schedule: 30 steps" in out and "warmup 3 steps (auto: a tenth of the steps" in out and "step 30: val loss" in out
    code, _, err = run(capsys, *base[:4], str(tmp_path / "run2"), *base[5:], "--max-steps", "30", "--warmup-steps", "100")
    assert code == 2 and "warmup_steps must be an integer in [0, max_steps=30], got 100" in err


def test_duration_flags():
    from gptlab.cli import duration

    assert [duration(t) for t in ("600", "90s", "10m", "1.5h", "0.5m")] == [600.0, 90.0, 600.0, 5400.0, 30.0]
    for bad in ("", "m", "ten minutes", "-5m", "0", "inf", "nan"):
        with pytest.raises(__import__("argparse").ArgumentTypeError):
            duration(bad)


def test_train_time_budget_through_the_cli(tmp_path, data_dir, capsys):
    import time

    base = ["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY_MODEL, "--device", "cpu", "--eval-batches", "2", "-q"]
    t0 = time.perf_counter()
    code, out, err = run(capsys, *base, "--time-budget", "5s")
    seconds = time.perf_counter() - t0
    assert code == 0, err
    plan = next(line for line in out.splitlines() if line.startswith("time budget 5.0s"))
    steps = int(plan.split("-> ")[1].split()[0])
    assert f"schedule: {steps} steps" in out and (f"step {steps}: val loss" in out or "the time budget ended the run" in out)
    assert seconds < 5.0 + 2.0, seconds  # on time, with slack for a busy machine
    code, _, err = run(capsys, *base[:4], str(tmp_path / "run2"), *base[5:], "--time-budget", "5m", "--max-steps", "10")
    assert code == 2 and "not both" in err


def test_prepare_prints_the_real_validation_share_and_allows_none(tmp_path, corpus_dir, capsys):
    text = "".join(p.read_text() for p in sorted(corpus_dir.iterdir()))  # ~120 KB as one file, as a new user's own
    (tmp_path / "one_file.txt").write_text(text, encoding="utf-8")
    code, out, _ = run(capsys, "prepare", "--input", str(tmp_path / "one_file.txt"), "--tokenizer", "gpt2", "--val-fraction", "0.02",
                       "--out", str(tmp_path / "d"), "-q")  # fmt: skip
    share = float(out.split("validation share: ")[1].split("%")[0]) / 100
    assert code == 0 and "(asked for 2.00%)" in out and abs(share - 0.02) < 0.004, out

    code, out, _ = run(capsys, "prepare", "--input", str(corpus_dir), "--tokenizer", "train:300", "--val-fraction", "0",
                       "--out", str(tmp_path / "d0"), "-q")  # fmt: skip
    assert code == 0 and "validation: none" in out and "val: 0 tokens" in out
    code, out, err = run(capsys, "train", "--data", str(tmp_path / "d0"), "--out", str(tmp_path / "r"), *TINY_MODEL, *TINY_TRAIN)
    assert code == 0 and "no validation split (evaluation off)" in out and "val loss" not in out, err
    code, _, err = run(capsys, "eval", "--ckpt", str(tmp_path / "r"), "--data", str(tmp_path / "d0"), "--device", "cpu", "-q")
    assert code == 2 and "the val split holds no tokens" in err
    code, out, _ = run(capsys, "eval", "--ckpt", str(tmp_path / "r"), "--text", str(tmp_path / "one_file.txt"), "--device", "cpu", "-q")
    assert code == 0 and "bits per byte" in out
    code, _, err = run(capsys, "prepare", "--input", str(corpus_dir), "--tokenizer", "gpt2", "--val-fraction", "1", "--out", str(tmp_path / "x"))
    assert code == 2 and "val_fraction must be in [0, 1)" in err


def readme_commands() -> list[list[str]]:
    """Every `gptlab ...` command in the README's shell blocks (also after `|` or `torchrun ... -m`), as argv."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            words = words[len(words) - words[::-1].index("|") :] if "|" in words else words  # the command after a pipe
            if "-m" in words and "gptlab" in words[words.index("-m") + 1 :][:1]:
                commands.append(words[words.index("-m") + 2 :])
            elif words[:1] == ["gptlab"]:
                commands.append(words[1:])
    return commands


def test_every_command_in_the_readme_parses():
    from gptlab.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 25 and any(c[:1] == ["train"] and "--time-budget" in c for c in commands)
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: gptlab {' '.join(argv)}")

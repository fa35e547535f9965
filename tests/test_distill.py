"""Knowledge distillation (gptlab.compress.distill): the loss against a hand computation and against
torch's KL, plain cross-entropy at alpha = 0 (a whole run included), and the command: training,
resuming, and refusing a teacher with another tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from gptlab.cli import main
from gptlab.compress.distill import DistillConfig, distillation_loss, student_config
from gptlab.config import GPTConfig
from gptlab.errors import ConfigError
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
TRAIN = ["--batch-size", "4", "--warmup-steps", "2", "--eval-every", "3", "--eval-batches", "2", "--log-every", "1", "--device", "cpu", "--seed", "5", "-q"]


def test_the_loss_is_the_hand_computed_mix_of_soft_kl_and_hard_cross_entropy():
    student = torch.tensor([[[1.0, 0.0, -1.0, 9.0], [0.5, 0.5, 2.0, 9.0], [3.0, 3.0, 3.0, 3.0]]])  # (1, 3, 4); column 3 is padding
    teacher = torch.tensor([[[2.0, 1.0, 0.0, -9.0, 5.0], [0.0, 1.0, 1.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0]]])  # (1, 3, 5)
    targets = torch.tensor([[0, 2, -100]])  # the third position is not scored
    cfg = DistillConfig(temperature=2.0, alpha=0.3)
    loss, kl, ce = distillation_loss(student, teacher, targets, cfg, vocab=3)

    def softmax(xs: list[float], tau: float) -> list[float]:
        e = [math.exp(x / tau) for x in xs]
        return [v / sum(e) for v in e]

    kls, ces = [], []
    for s, t, y in [([1.0, 0.0, -1.0, 9.0], [2.0, 1.0, 0.0], 0), ([0.5, 0.5, 2.0, 9.0], [0.0, 1.0, 1.0], 2)]:
        p, q = softmax(t, 2.0), softmax(s[:3], 2.0)  # only the tokenizer's 3 ids enter the KL
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        ces.append(-math.log(softmax(s, 1.0)[y]))  # cross-entropy over the student's whole head
    want_kl, want_ce = sum(kls) / 2, sum(ces) / 2
    assert kl.item() == pytest.approx(want_kl, rel=1e-6) and ce.item() == pytest.approx(want_ce, rel=1e-6)
    assert loss.item() == pytest.approx(0.3 * 4 * want_kl + 0.7 * want_ce, rel=1e-6)


def test_the_kl_term_is_torchs_and_alpha_zero_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[1, 0] = -100
    _, kl, ce = distillation_loss(student, teacher, targets, DistillConfig(3.0, 0.5), vocab=11)
    keep = targets != -100
    ref = F.kl_div(F.log_softmax(student[keep] / 3, -1), F.log_softmax(teacher[keep] / 3, -1), reduction="batchmean", log_target=True)
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5)
    loss0, _, _ = distillation_loss(student, teacher, targets, DistillConfig(3.0, 0.0), vocab=11)
    assert loss0.item() == pytest.approx(F.cross_entropy(student.view(-1, 11), targets.view(-1), ignore_index=-100).item(), rel=1e-6)
    assert kl.item() > 0 and distillation_loss(teacher, teacher, targets, DistillConfig(3.0, 1.0), vocab=11)[1].item() == pytest.approx(0, abs=1e-6)


def reference(student, teacher, targets, cfg, vocab):
    """The loss as autograd would compute it from the formula, the slow path the fused one is checked against."""
    keep = targets != -100
    s, t = student[keep].float(), teacher[keep].float()
    log_p_t, log_p_s = F.log_softmax(t[:, :vocab] / cfg.temperature, -1), F.log_softmax(s[:, :vocab] / cfg.temperature, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return cfg.alpha * cfg.temperature**2 * kl + (1 - cfg.alpha) * F.cross_entropy(s, targets[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignored", [False, True])
def test_the_fused_loss_and_its_gradient_equal_autograds_on_the_formula(dtype, ignored):
    g = torch.Generator().manual_seed(7)
    student = (3 * torch.randn(3, 10, 70, generator=g)).to(dtype).requires_grad_()  # 70 = 64 ids + padding rows of the head
    teacher = (3 * torch.randn(3, 10, 66, generator=g)).to(dtype)
    targets = torch.randint(0, 64, (3, 10), generator=g)
    if ignored:
        targets[0, :4] = -100
    cfg = DistillConfig(temperature=1.7, alpha=0.6)
    loss, _, _ = distillation_loss(student, teacher, targets, cfg, vocab=64, chunk_elems=4 * 70)  # 4 rows a chunk: several chunks
    (grad,) = torch.autograd.grad(loss, student)
    want = reference(student, teacher, targets, cfg, 64)
    (want_grad,) = torch.autograd.grad(want, student)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and grad.dtype == dtype
    assert torch.allclose(grad.float(), want_grad.float(), atol=tol * want_grad.float().abs().max().item())


def test_bad_settings_and_the_default_student():
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="alpha"):
        DistillConfig(alpha=1.5)
    teacher = GPTConfig(n_layer=6)
    assert student_config(teacher, {}).n_layer == 3 and student_config(teacher, {"n_embd": 384}) == teacher.replace(n_embd=384)


def test_the_distill_command_trains_resumes_and_at_alpha_zero_is_plain_training(tmp_path, data_dir, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", "--data", str(data_dir), "--out", str(teacher), *TINY, *TRAIN, "--max-steps", "8"]) == 0
    student = tmp_path / "student"
    base = ["distill", "--teacher", str(teacher), "--data", str(data_dir), *TRAIN]
    assert main([*base, "--out", str(student), "--n-layer", "1", "--max-steps", "6", "--stop-at", "3", "--temperature", "2", "--alpha", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "bpb" in out and "kl" in out
    assert main([*base, "--out", str(student), "--resume", "--max-steps", "6", "--alpha", "0.2"]) == 2  # a resumed run keeps its settings
    assert "alpha 0.7, not 0.2" in capsys.readouterr().err
    assert main([*base, "--out", str(student), "--n-layer", "1", "--resume", "--max-steps", "6"]) == 0
    ckpt = find_checkpoint(student)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert meta["step"] == 6 and meta["model_config"]["n_layer"] == 1 and meta["distill"]["alpha"] == 0.7
    assert meta["distill"]["teacher"] == str(find_checkpoint(teacher))

    # alpha = 0: the teacher takes no part, and the run is a plain training run, step for step
    assert main([*base, "--out", str(tmp_path / "a0"), "--n-layer", "1", "--max-steps", "4", "--alpha", "0"]) == 0
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "plain"), *TINY, *TRAIN, "--n-layer", "1", "--max-steps", "4"]) == 0
    a, b = load_checkpoint(tmp_path / "a0").model.state_dict(), load_checkpoint(tmp_path / "plain").model.state_dict()
    # to float32 rounding: distillation's chunks and plain training's native loss kernel sum in different orders
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)
    capsys.readouterr()

    other = GPT(GPTConfig(vocab_size=50304, block_size=32, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "gpt2", 1, other, other.config, Tokenizer.gpt2())
    assert main([*base[:2], str(tmp_path / "gpt2"), *base[3:], "--out", str(tmp_path / "bad"), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another tokenizer" in err

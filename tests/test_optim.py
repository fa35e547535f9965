"""Muon (optim.MuonAdamW) against a reference Newton-Schulz iteration and hand-computed steps, its AdamW half
against torch.optim.AdamW, and a Muon training run resumed bit-identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tokens
from safetensors.torch import load_file, save_file

from gptlab import optim
from gptlab.checkpoint import load_checkpoint
from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import ConfigError
from gptlab.model import GPT
from gptlab.optim import MuonAdamW, newton_schulz
from gptlab.train import build_optimizer, train


def reference_newton_schulz(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration as Jordan et al. (2024) publish it, written out in float64, one row at a time where we can."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


@pytest.mark.parametrize("shape", [(16, 16), (48, 16), (16, 40)])
def test_newton_schulz_is_the_reference_iteration_and_nearly_orthogonalises(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = newton_schulz(G, steps=5)
    assert torch.allclose(X, reference_newton_schulz(G, 5), atol=1e-12)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3, s  # every singular value pushed towards 1 (not exactly: the quintic trades that for speed)
    # same singular vectors: X = U diag(f(S)) V^T with f > 0
    assert torch.allclose(U.T @ X @ Vh.T, torch.diag(torch.diagonal(U.T @ X @ Vh.T)), atol=1e-8)


@pytest.mark.parametrize("shape", [(64, 64), (192, 48), (48, 160)])
def test_newton_schulz_in_bfloat16_stays_near_the_float64_iteration(shape):
    # an ill-conditioned G (singular values over three decades), as gradients are
    g = torch.Generator().manual_seed(3)
    G = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(-3, 0, shape[1]))
    X = newton_schulz(G, steps=5, dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    ref = reference_newton_schulz(G, 5)
    rel = ((X.double() - ref).norm() / ref.norm()).item()
    assert rel < 0.04, rel  # measured 1.5-2.3% at 256-1536 wide; float32 is at 1e-5
    assert rel > 1e-4, rel  # the iteration really ran in bfloat16 (float32's error is ~1e-6 here)
    s, s_ref = torch.linalg.svdvals(X.float()), torch.linalg.svdvals(ref.float())
    assert (s.max() - s_ref.max()).abs() < 0.03 and (s.min() - s_ref.min()).abs() < 0.03, (s, s_ref)


def test_muon_steps_match_the_hand_computed_update():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(12, 4, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    lr, wd, beta = 0.05, 0.1, 0.9
    opt = MuonAdamW([{"params": [p], "muon": True, "split": [4, 8], "weight_decay": wd}], lr=lr, momentum=beta)
    m = torch.zeros_like(w0)
    w = w0.clone()
    for _ in range(3):
        grad = torch.randn(12, 4, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        m = beta * m + (1 - beta) * grad
        u = (1 - beta) * grad + beta * m  # Nesterov
        top, bottom = u[:4], u[4:]  # the split: each part orthogonalised alone, scaled by sqrt(max(1, rows / cols))
        ortho = torch.cat([reference_newton_schulz(top, 5) * 1.0, reference_newton_schulz(bottom, 5) * 2 ** 0.5])
        w = w * (1 - lr * wd) - lr * ortho
        assert torch.allclose(p.detach(), w, atol=1e-12)


def test_the_adamw_groups_are_torch_adamw():
    g = torch.Generator().manual_seed(2)
    a = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    b = [torch.nn.Parameter(t.detach().clone()) for t in a]
    ours = MuonAdamW([{"params": [a[0]], "weight_decay": 0.1}, {"params": [a[1]], "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": [b[0]], "weight_decay": 0.1}, {"params": [b[1]], "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn(t.shape, generator=g) for t in a]
        for x, y, gr in zip(a, b, grads, strict=True):
            x.grad, y.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-6)
    assert ours.state[a[0]].keys() == ref.state[b[0]].keys()  # torch's layout: the embedding-table path reads it alike


def test_build_optimizer_puts_the_blocks_matrices_under_muon_and_the_rest_under_adamw():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=2, mlp="gated", activation="silu", tie_weights=False))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)]: g["split"] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert muon == {
        **{f"transformer.h.{i}.attn.c_attn.weight": [32, 16, 16] for i in range(2)},  # q, then the 2 shared key and value heads
        **{f"transformer.h.{i}.mlp.c_fc.weight": [128, 128] for i in range(2)},  # gate and up
        **{f"transformer.h.{i}.{n}.c_proj.weight": None for i in range(2) for n in ("attn", "mlp")},
    }
    assert all(g["lr"] == 0.02 and g["lr_scale"] == 20.0 for g in opt.param_groups if g["muon"])
    adam = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} <= adam
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, muon"):
        TrainConfig(optimizer="sgd")


def test_newton_schulz_dtype_is_bfloat16_only_where_bf16_matmuls_are_native(monkeypatch):
    import gptlab.train as train_module

    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(train_module, "fast_bf16", lambda device, native=native: native)
        assert build_optimizer(model, TrainConfig(optimizer="muon"), "cpu").ns_dtype == expected
        for name in ("float32", "bfloat16"):  # an explicit choice wins
            assert build_optimizer(model, TrainConfig(optimizer="muon", muon_ns_dtype=name), "cpu").ns_dtype == getattr(torch, name)
    with pytest.raises(ConfigError, match="muon_ns_dtype must be one of auto, float32, bfloat16"):
        TrainConfig(optimizer="muon", muon_ns_dtype="float16")


def test_a_muon_step_in_bfloat16_moves_the_weights_as_in_float32():
    g = torch.Generator().manual_seed(4)
    w0, grad = torch.randn(96, 32, generator=g), torch.randn(96, 32, generator=g)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(w0.clone())
        opt = MuonAdamW([{"params": [p], "muon": True, "split": [32, 64]}], lr=0.02, ns_dtype=dtype)
        p.grad = grad.clone()
        opt.step()
        assert p.dtype == torch.float32 and opt.state[p]["momentum_buffer"].dtype == torch.float32
        moved[dtype] = p.detach() - w0
    rel = ((moved[torch.bfloat16] - moved[torch.float32]).norm() / moved[torch.float32].norm()).item()
    assert 1e-4 < rel < 0.04, rel


def _muon_problem(ns_dtype: torch.dtype, process_group) -> tuple[dict[str, torch.nn.Parameter], MuonAdamW, list[tuple[int, int]]]:
    """Five Muon matrices (two fused q/k/v-like ones split in three, three plain) and an AdamW vector, with a list
    that records the shape of every Newton-Schulz call the optimizer makes."""
    g = torch.Generator().manual_seed(11)
    shapes = {"a": (48, 16), "b": (48, 16), "c": (16, 16), "d": (16, 32), "e": (32, 16), "gain": (16,)}
    params = {k: torch.nn.Parameter(torch.randn(*shape, generator=g)) for k, shape in shapes.items()}
    groups = [{"params": [params["a"], params["b"]], "muon": True, "split": [16, 16, 16], "weight_decay": 0.1},
              {"params": [params["c"], params["d"], params["e"]], "muon": True}, {"params": [params["gain"]]}]  # fmt: skip
    return params, MuonAdamW(groups, lr=0.02, ns_dtype=ns_dtype, process_group=process_group), []


def _muon_steps(params, opt, calls) -> None:
    g = torch.Generator().manual_seed(12)
    real = optim.newton_schulz
    optim.newton_schulz = lambda G, *a, **k: (calls.append(tuple(G.shape)), real(G, *a, **k))[1]
    try:
        for _ in range(3):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    finally:
        optim.newton_schulz = real


def _split_muon_worker(rank: int, store: str, ns_dtype: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        params, opt, calls = _muon_problem(getattr(torch, ns_dtype), dist.group.WORLD)
        _muon_steps(params, opt, calls)
        save_file({**{k: p.detach() for k, p in params.items()}, "calls": torch.tensor(len(calls))}, f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_muon_splits_newton_schulz_among_replicas_and_moves_the_weights_as_one_process(ns_dtype, tmp_path: Path):
    """Under DDP (equal gradients on every process, process_group given) each process orthogonalises its share of the
    matrices and receives the rest: 5 matrices in rounds of 2 give process 0 matrices a, c, e (3 + 1 + 1 calls a step)
    and process 1 b, d (3 + 1), and both end bitwise where one process making all 9 calls a step ends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same kernels, so bitwise equality is the bar
    try:
        params, opt, calls = _muon_problem(getattr(torch, ns_dtype), None)
        _muon_steps(params, opt, calls)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3 * 9
    mp.spawn(_split_muon_worker, args=(str(tmp_path / "store"), ns_dtype, str(tmp_path)), nprocs=2)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert [int(r.pop("calls")) for r in ranks] == [3 * 5, 3 * 4]
    for got in ranks:
        assert all(torch.equal(got[k], p.detach()) for k, p in params.items())


def test_a_muon_run_learns_and_resumes_bit_identically(tmp_path, data_dir):
    cfg = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32, pos_encoding="rope", norm="rmsnorm")
    tcfg = TrainConfig(batch_size=4, max_steps=8, warmup_steps=2, eval_every=4, eval_batches=2, save_every=4, log_every=2, seed=5,
                       device="cpu", optimizer="muon", lr=3e-3, muon_lr=0.02)  # fmt: skip
    train(cfg, tcfg, data_dir, tmp_path / "full", progress=False)
    full = load_checkpoint(tmp_path / "full").model.state_dict()
    train(cfg, tcfg, data_dir, tmp_path / "split", stop_at=4, progress=False)
    train(cfg, tcfg, data_dir, tmp_path / "split", resume=True, progress=False)
    resumed = load_checkpoint(tmp_path / "split").model.state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # the momentum buffers and Adam moments came back
    model = GPT(cfg).train()
    opt = build_optimizer(model, tcfg, "cpu")
    idx = tokens((4, 17), 512, 0)
    losses = []
    for _ in range(25):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses

"""Properties of the latent models (sizes, layers, autoencoder, operator, residual flow, consistency).

Deterministic (fixed seeds), a few seconds each on a CPU.
"""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from ups_lightning.models.autoencoder import Autoencoder
from ups_lightning.models.diffusion import (
    ConsistencyStudent,
    ResidualFlow,
    consistency_distillation_loss,
    ema_update,
)
from ups_lightning.models.layers import (
    Attention,
    FlashAttentionUnavailable,
    FourierFeatures,
    RMSNorm,
    TransformerBlock,
    naive_attention,
    set_attention_backend,
)
from ups_lightning.models.operator import PDETransformer
from ups_lightning.models.sizes import SUPPORTED_DIMS, ModelSizes, model_sizes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster and immune to oversubscription on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def perturb_(m: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised (AdaLN-Zero, output) layers become active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return m


def fronts(batch: int, n: int, seed: int = 0, width: float = 0.01) -> torch.Tensor:
    """Random periodic fields with sharp fronts: sines plus tanh steps (width ~1-3 cells)."""
    g = torch.Generator().manual_seed(seed)
    x = grid(n)
    u = torch.zeros(batch, n)
    for k in (1, 2, 3):
        a = torch.rand(batch, 1, generator=g) / k
        ph = torch.rand(batch, 1, generator=g) * 2 * math.pi
        u += a * torch.sin(2 * math.pi * k * x + ph)
    c = torch.rand(batch, 1, generator=g)
    h = torch.rand(batch, 1, generator=g) + 0.5
    d = torch.remainder(x - c + 0.5, 1.0) - 0.5  # periodic sawtooth around the front: a shock wave
    u += h * (torch.tanh(-d / width) * 0.5 + d)
    return u.unsqueeze(-1)


# ------------------------------------------------------------------------------------------ sizes

def test_model_sizes_rule() -> None:
    for dim in SUPPORTED_DIMS:
        s = model_sizes(dim)
        assert isinstance(s, ModelSizes)
        assert s.hidden == 2 * dim
        assert s.heads == max(1, min(8, dim // 16))
        assert dim % s.heads == 0 and s.hidden % s.groups == 0
        assert s.groups == math.gcd(8, s.hidden)
        assert (s.n_tokens, s.depth) == (32, 4)
    assert model_sizes(64, n_tokens=16, depth=6).n_tokens == 16
    with pytest.raises(ValueError, match="divisible"):
        model_sizes(50)  # 3 heads do not divide 50
    with pytest.raises(ValueError):
        model_sizes(0)


def build_all(s: ModelSizes, cond_dim: int = 2):
    ae = Autoencoder(dim=s.dim, n_tokens=s.n_tokens, heads=s.heads, hidden=s.hidden)
    op = PDETransformer(s.dim, s.n_tokens, depth=s.depth, heads=s.heads, hidden=s.hidden, cond_dim=cond_dim)
    flow = ResidualFlow(s.dim, s.n_tokens, heads=s.heads, hidden=s.hidden, cond_dim=cond_dim)
    student = ConsistencyStudent(s.dim, s.n_tokens, heads=s.heads, hidden=s.hidden, cond_dim=cond_dim)
    return ae, op, flow, student


def test_param_counts_every_size_without_running() -> None:
    counts = []
    for dim in SUPPORTED_DIMS:
        with torch.device("meta"):
            models = build_all(model_sizes(dim))
        counts.append([n_params(m) for m in models])
    for i in range(4):  # every model grows with dim
        assert all(a[i] < b[i] for a, b in zip(counts, counts[1:]))
    assert counts[-1][1] > 5_000_000  # dim 512 operator is a real model


@pytest.mark.parametrize("dim", [8, 16, 24, 32, 48, 64])
def test_shapes_run(dim: int) -> None:
    torch.manual_seed(0)
    s = model_sizes(dim)
    ae, op, flow, student = build_all(s)
    B, X = 2, 256
    u, x, cond = torch.randn(B, X, 1), grid(X), torch.randn(B, 2)
    z = ae.encode(u, x)
    assert z.shape == (B, s.n_tokens, dim)
    assert ae.decode(z, x).shape == (B, X, 1) and ae(u, x).shape == (B, X, 1)
    assert op(z, cond).shape == z.shape and op.delta(z, cond).shape == z.shape
    assert flow.velocity(z, 0.3, z, cond).shape == z.shape
    assert flow.loss(z, z, cond).dim() == 0
    assert flow.sample(z, cond, steps=2).shape == z.shape
    assert student(z, torch.rand(B), z, cond).shape == z.shape
    assert student.sample(z, cond, steps=2).shape == z.shape


# ------------------------------------------------------------------------------------------ layers

def manual_attention(attn: Attention, x: torch.Tensor, ctx: torch.Tensor, bias=None) -> torch.Tensor:
    """Attention written out by hand: projections, per-head RMS norm of q and k, softmax."""
    B, L, D = x.shape
    H, Dh = attn.heads, attn.head_dim
    q = (x @ attn.to_q.weight.T + attn.to_q.bias).view(B, L, H, Dh)
    kv = ctx @ attn.to_kv.weight.T + attn.to_kv.bias
    k, v = kv[..., :D].reshape(B, -1, H, Dh), kv[..., D:].reshape(B, -1, H, Dh)
    rms = lambda t, w: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    logits = torch.einsum("blhd,bshd->bhls", q, k) / math.sqrt(Dh)
    if bias is not None:
        logits = logits + bias
    out = torch.einsum("bhls,bshd->blhd", logits.softmax(-1), v).reshape(B, L, D)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_sdpa_equals_naive_softmax_attention() -> None:
    torch.manual_seed(0)
    attn = perturb_(Attention(32, heads=4), std=0.3)
    x, ctx = torch.randn(3, 7, 32), torch.randn(3, 5, 32)
    bias = torch.randn(1, 4, 7, 5)
    torch.testing.assert_close(attn(x), manual_attention(attn, x, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, ctx), manual_attention(attn, x, ctx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, ctx, attn_bias=bias), manual_attention(attn, x, ctx, bias),
                               atol=1e-5, rtol=1e-5)
    q, k, v = attn.qkv(x, ctx)
    ref = attn.proj(naive_attention(q, k, v).transpose(1, 2).reshape(3, 7, 32))
    torch.testing.assert_close(attn(x, ctx), ref, atol=1e-5, rtol=1e-5)


def test_rmsnorm_on_queries_and_keys_everywhere() -> None:
    s = model_sizes(32)
    for model in build_all(s):
        attns = [m for m in model.modules() if isinstance(m, Attention)]
        assert attns, type(model).__name__
        for a in attns:
            assert isinstance(a.q_norm, RMSNorm) and isinstance(a.k_norm, RMSNorm)
            assert a.backend == "sdpa"
    # the normalised queries and keys have unit RMS per head (gain 1 at init)
    a = Attention(32, heads=2)
    q, k, _ = a.qkv(torch.randn(2, 5, 32) * 7.0)
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 2, 5), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k.pow(2).mean(-1), torch.ones(2, 2, 5), atol=1e-4, rtol=1e-4)
    assert not isinstance(Attention(32, 2, qk_norm=False).q_norm, RMSNorm)


def test_flash_backend_without_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    with pytest.raises(FlashAttentionUnavailable, match="flash_attn"):
        Attention(32, 2, backend="flash")
    with pytest.raises(ImportError, match="sdpa"):
        PDETransformer(32, 8, heads=2, attn_backend="flash")
    op = PDETransformer(32, 8, heads=2)
    with pytest.raises(FlashAttentionUnavailable):
        set_attention_backend(op, "flash")
    with pytest.raises(Exception, match="backend"):
        Attention(32, 2, backend="xformers")


def test_adaln_conditioning_changes_output() -> None:
    torch.manual_seed(0)
    blk = TransformerBlock(32, 2, cond_dim=8)
    x, c = torch.randn(2, 6, 32), torch.randn(2, 8)
    torch.testing.assert_close(blk(x, c), x)  # AdaLN-Zero: identity at init
    perturb_(blk)
    assert not torch.allclose(blk(x, c), blk(x, c + 1.0), atol=1e-4)

    op = perturb_(PDETransformer(32, 16, heads=2))
    z = torch.randn(2, 16, 32)
    c1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    c2 = torch.tensor([[2.0, 0.0], [1.0, 0.5]])  # dt changes in sample 0, nu in sample 1
    d1, d2 = op.delta(z, c1), op.delta(z, c2)
    assert ((d1 - d2).abs().amax(dim=(1, 2)) > 1e-3).all()


def test_fourier_features_periodic() -> None:
    ff = FourierFeatures(8)
    x = torch.rand(10)
    out = ff(x)
    assert out.shape == (10, 16)
    torch.testing.assert_close(ff(x + 1.0), out, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 0], torch.sin(2 * math.pi * x))


# ------------------------------------------------------------------------------------------ autoencoder

def test_any_point_decoding_and_resolutions() -> None:
    torch.manual_seed(0)
    assert Autoencoder(dim=16, n_tokens=32, heads=1, hidden=32).patch == 8  # canonical grid: 256 cells
    assert Autoencoder(dim=16, n_tokens=16, heads=1, hidden=32).patch == 16
    with pytest.raises(ValueError, match="patch"):
        Autoencoder(dim=16, n_tokens=24, heads=1, hidden=32)
    ae = Autoencoder(dim=16, n_tokens=8, heads=1, hidden=32, n_fourier=16, patch=8)
    for X in (128, 256, 64):
        u = fronts(3, X)
        z = ae.encode(u, grid(X))
        assert z.shape == (3, 8, 16)
    z = ae.encode(fronts(3, 256), grid(256))
    assert ae.decode(z, grid(512)).shape == (3, 512, 1)
    assert ae.decode(z, grid(37)).shape == (3, 37, 1)
    pts = torch.rand(3, 11)
    per_sample = ae.decode(z, pts)
    assert per_sample.shape == (3, 11, 1)
    for b in range(3):  # (B, Q) coordinates == per-sample (Q,) decoding
        torch.testing.assert_close(per_sample[b], ae.decode(z[b:b + 1], pts[b])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.decode(z, pts + 1.0), per_sample, atol=1e-4, rtol=1e-4)  # periodic
    # continuous in x, also where the local head switches token pairs (token centres) and across 0/1
    perturb_(ae.decoder, std=0.1)
    c = torch.cat([grid(8), torch.tensor([0.0])])
    left, right = ae.decode(z, c - 1e-5), ae.decode(z, c + 1e-5)
    assert (left - right).abs().max() < 1e-2 * ae.decode(z, grid(256)).abs().max()
    with pytest.raises(ValueError):
        ae.encode(fronts(1, 4), grid(4))  # fewer cells than tokens


def test_reconstruction_loss_decreases() -> None:
    torch.manual_seed(0)
    ae = Autoencoder(dim=16, n_tokens=8, heads=1, hidden=32, depth=1, decoder_depth=1, n_fourier=16, patch=8)
    u, x = fronts(16, 64, width=0.02), grid(64)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    with torch.no_grad():
        first = F.mse_loss(ae(u, x), u).item()
    for _ in range(50):
        loss = F.mse_loss(ae(u, x), u)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = F.mse_loss(ae(u, x), u).item()
    assert last < 0.2 * first, (first, last)


# ------------------------------------------------------------------------------------------ operator

def test_operator_is_a_residual_update() -> None:
    torch.manual_seed(0)
    for levels, depth in ((1, 4), (2, 5), (0, 2)):
        op = PDETransformer(32, 16, depth=depth, heads=2, levels=levels)
        z, cond = torch.randn(3, 16, 32), torch.randn(3, 2)
        assert torch.equal(op(z, cond), z)  # zero-initialised output: persistence
        assert torch.equal(op.delta(z, cond), torch.zeros_like(z))
        perturb_(op)
        d = op.delta(z, cond)
        assert d.abs().mean() > 1e-2
        torch.testing.assert_close(op(z, cond), z + d)
    with pytest.raises(ValueError):
        PDETransformer(32, 12, heads=2, levels=3)  # 12 tokens not divisible by 8
    with pytest.raises(ValueError):
        PDETransformer(32, 16, depth=2, heads=2, levels=1)


def test_operator_trains_from_identity() -> None:
    """Gradients reach the whole U-shaped stack after the first step (AdaLN-Zero + zero head)."""
    torch.manual_seed(0)
    op = PDETransformer(16, 8, depth=3, heads=1)
    z, cond = torch.randn(32, 8, 16), torch.rand(32, 2)
    target = z + 0.3 * torch.roll(z, 1, dims=1)  # a shift-like update
    opt = torch.optim.Adam(op.parameters(), lr=3e-3)
    first = F.mse_loss(op(z, cond), target).item()
    for _ in range(60):
        loss = F.mse_loss(op(z, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert op.down_blocks[0].ada[1].weight.abs().sum() > 0


# ------------------------------------------------------------------------------------------ diffusion

TOY_N, TOY_D = 4, 8


def toy_batch(B: int, g: torch.Generator):
    """Conditional two-mode toy: r = 0.5 z_pred + s * pattern + 0.1 noise, s = +-1 with prob 1/2.
    Given z_pred, every element has mean 0.5 z_pred and std sqrt(1 + 0.01)."""
    z_pred = torch.randn(B, TOY_N, TOY_D, generator=g)
    s = torch.randint(0, 2, (B, 1, 1), generator=g).float() * 2 - 1
    r = 0.5 * z_pred + s * toy_pattern() + 0.1 * torch.randn(B, TOY_N, TOY_D, generator=g)
    return r, z_pred, torch.zeros(B, 2)


def toy_pattern() -> torch.Tensor:
    return torch.where(torch.arange(TOY_N * TOY_D) % 3 == 0, -1.0, 1.0).view(TOY_N, TOY_D)


def toy_flow() -> ResidualFlow:
    return ResidualFlow(TOY_D, TOY_N, depth=2, heads=2, width=32)


@pytest.fixture(scope="module")
def trained_toy_flow():
    return train_toy_flow()


def train_toy_flow():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    flow = toy_flow()
    opt = torch.optim.Adam(flow.parameters(), lr=4e-3)
    eval_batch = toy_batch(512, torch.Generator().manual_seed(99))
    with torch.no_grad():
        untrained = flow.loss(*eval_batch, generator=torch.Generator().manual_seed(5)).item()
    for _ in range(600):
        loss = flow.loss(*toy_batch(128, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = flow.loss(*eval_batch, generator=torch.Generator().manual_seed(5)).item()
    return flow.eval(), untrained, trained


def test_flow_matching_learns_two_mode_toy(trained_toy_flow) -> None:
    flow, untrained, trained = trained_toy_flow
    assert trained < 0.6 * untrained, (untrained, trained)
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(1, TOY_N, TOY_D, generator=g)
    M = 256
    z_pred, cond = z1.expand(M, -1, -1), torch.zeros(M, 2)
    samples = flow.sample(z_pred, cond, steps=16, generator=g)
    # different noise -> distinct samples
    assert torch.cdist(samples.flatten(1)[:16], samples.flatten(1)[:16]).add(torch.eye(16) * 99).min() > 0.2
    # noise in = sample out (deterministic ODE given the noise)
    e = torch.randn(M, TOY_N, TOY_D, generator=g)
    torch.testing.assert_close(flow.sample(z_pred, cond, noise=e), flow.sample(z_pred, cond, noise=e))
    # the toy's conditional mean and spread, and both modes
    mean, std = samples.mean(0), samples.std(0)
    assert (mean - 0.5 * z1[0]).abs().mean() < 0.2, (mean - 0.5 * z1[0]).abs().mean()
    assert 0.75 < std.mean() < 1.25, std.mean()
    mode = ((samples - 0.5 * z1) * toy_pattern()).mean(dim=(1, 2))  # ~ +-1
    assert 0.25 < (mode > 0).float().mean() < 0.75
    assert (mode.abs() - 1).abs().mean() < 0.3


def test_consistency_boundary_condition_is_exact() -> None:
    torch.manual_seed(0)
    student = perturb_(ConsistencyStudent(16, 8, depth=2, heads=1), std=0.5)
    x, z_pred, cond = torch.randn(4, 8, 16) * 3, torch.randn(4, 8, 16), torch.randn(4, 2)
    assert torch.equal(student(x, 1.0, z_pred, cond), x)
    assert torch.equal(student(x, torch.ones(4), z_pred, cond), x)
    assert not torch.allclose(student(x, 0.5, z_pred, cond), x)


def distill_toy(teacher: ResidualFlow, steps: int = 300) -> dict:
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    student = ConsistencyStudent.from_teacher(teacher)
    target = copy.deepcopy(student).requires_grad_(False)
    g = torch.Generator().manual_seed(7)
    ge = torch.Generator().manual_seed(11)
    z_eval = torch.randn(256, TOY_N, TOY_D, generator=ge)
    cond = torch.zeros(256, 2)
    e = torch.randn(256, TOY_N, TOY_D, generator=ge)
    ref = teacher.sample(z_eval, cond, steps=16, noise=e)

    def gap() -> float:
        return F.mse_loss(student.sample(z_eval, cond, steps=1, noise=e), ref).item()

    before = gap()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(steps):
        r, z_pred, c = toy_batch(128, g)
        loss = consistency_distillation_loss(student, target, teacher, r, z_pred, c, n_grid=16, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(target, student, 0.9)
    two = student.sample(z_eval, cond, steps=2, noise=e, generator=g)
    one = student.sample(z_eval, cond, steps=1, noise=e)
    spread = lambda t: (t - 0.5 * z_eval).std().item()  # noqa: E731
    return dict(gap_before=before, gap_after=gap(), ref_std=spread(ref), one_std=spread(one),
                two_std=spread(two), two_mean_err=(two.mean(0) - ref.mean(0)).abs().mean().item())


def test_student_from_teacher_starts_as_one_euler_step(trained_toy_flow) -> None:
    teacher = trained_toy_flow[0]
    student = ConsistencyStudent.from_teacher(teacher)
    g = torch.Generator().manual_seed(0)
    z_pred, cond = torch.randn(8, TOY_N, TOY_D, generator=g), torch.zeros(8, 2)
    e = torch.randn(8, TOY_N, TOY_D, generator=g)
    torch.testing.assert_close(student.sample(z_pred, cond, steps=1, noise=e),
                               teacher.sample(z_pred, cond, steps=1, noise=e))


def test_consistency_distillation_matches_teacher(trained_toy_flow) -> None:
    """Tolerance: after 300 distillation steps the paired error between the 1-step student and the
    16-step teacher (same noise) falls below 0.25x its starting value (0.84 -> 0.08 measured) (the student starts as the
    teacher's 1-step Euler sampler, which collapses the two modes), the 2-step student's spread is
    within 25% of the teacher's, and the 1-step student's spread does not collapse (> 0.75x)."""
    m = distill_toy(trained_toy_flow[0])
    assert m["gap_after"] < 0.25 * m["gap_before"], m
    assert abs(m["two_std"] / m["ref_std"] - 1) < 0.25, m
    assert m["one_std"] > 0.75 * m["ref_std"], m


@pytest.mark.slow
def test_reconstruction_of_shocks_reaches_a_few_percent() -> None:
    """~1 min: dim 32, fields with tanh shocks of width 0.01 (2.6 cells) on 256 cells, 600 steps of
    batch 64 with 96 random query points each; relative L2 on held-out fields must be < 5%
    (measured 3.0%; 2.4% after 1000 steps with one-cell fronts, width 0.004)."""
    torch.manual_seed(0)
    X = 256
    x = grid(X)
    train, test = fronts(2048, X, seed=1, width=0.01), fronts(256, X, seed=2, width=0.01)
    s = model_sizes(32)
    ae = Autoencoder(dim=s.dim, n_tokens=s.n_tokens, heads=s.heads, hidden=s.hidden, decoder_depth=1)
    opt = torch.optim.AdamW(ae.parameters(), lr=4e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=600, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        u = train[torch.randint(0, len(train), (64,), generator=g)]
        qi = torch.randint(0, X, (64, 96), generator=g)
        loss = F.mse_loss(ae.decode(ae.encode(u, x), x[qi]), torch.gather(u, 1, qi.unsqueeze(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        out = ae(test, x)
    rel = ((out - test).pow(2).mean((1, 2)).sqrt() / test.pow(2).mean((1, 2)).sqrt()).mean().item()
    assert rel < 0.05, rel

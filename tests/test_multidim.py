"""Multi-channel and 2D paths of the autoencoder and the metrics, and 1D backward compatibility.

Tiny models, fixed seeds, one thread: each test takes well under a few seconds on a CPU.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ups_lightning.eval import metrics as M
from ups_lightning.models.autoencoder import Autoencoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grid1d(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def grid2d(h: int, w: int) -> torch.Tensor:
    """Cell centres (h, w, 2) in [0, 1)^2, coordinate k along spatial axis k."""
    return torch.stack(torch.meshgrid(grid1d(h), grid1d(w), indexing="ij"), dim=-1)


def fill_(m: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter and buffer set from one generator in sorted-name order: the values depend only
    on the names and shapes, not on the order the modules were built in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, v in sorted(m.state_dict().items()):
            v.copy_(torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) * std)
    return m


def tiny(**kw) -> Autoencoder:
    base = dict(dim=16, depth=1, heads=2, hidden=32, n_fourier=8, decoder_depth=1)
    base.update(kw)
    return Autoencoder(**base)


def fields1d(B: int, X: int, C: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = grid1d(X)
    u = torch.zeros(B, X, C)
    for k in (1, 2, 3):
        a = torch.rand(B, 1, C, generator=g) / k
        ph = torch.rand(B, 1, C, generator=g) * 2 * math.pi
        u += a * torch.sin(2 * math.pi * k * x[None, :, None] + ph)
    return u + torch.tanh((x[None, :, None] - 0.5) / 0.02)


def fields2d(B: int, H: int, W: int, C: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = grid2d(H, W).double()
    u = torch.zeros(B, H, W, C, dtype=torch.float64)
    for k in (1, 2):
        a = torch.rand(B, 1, 1, C, generator=g, dtype=torch.float64) / k
        b = torch.rand(B, 1, 1, C, generator=g, dtype=torch.float64) / k
        u += a * torch.sin(2 * math.pi * k * xy[None, ..., 0:1])
        u += b * torch.cos(2 * math.pi * k * xy[None, ..., 1:2])
    return u + 0.5


def assert_all_grads(m: torch.nn.Module) -> None:
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    dead = [n for n, p in m.named_parameters() if float(p.grad.abs().sum()) == 0.0]
    assert not dead, dead


# ------------------------------------------------------------------------------------------ 1D compat

@pytest.mark.parametrize("kw", [dict(n_tokens=32), dict(n_tokens=16, in_channels=2),
                                dict(n_tokens=32, local_head=False), dict(n_tokens=8, patch=8)])
def test_1d_spatial_shape_matches_legacy_build(kw) -> None:
    """spatial_shape=(256,) (or the grid an explicit patch implies) builds the very model the old
    call (no spatial_shape) built: same state_dict keys and shapes, same outputs for the same weights."""
    cells = 256 if "patch" not in kw else kw["n_tokens"] * kw["patch"]
    torch.manual_seed(0)
    legacy = tiny(**kw)
    torch.manual_seed(0)
    new = tiny(**kw, spatial_shape=(cells,))
    sl, sn = legacy.state_dict(), new.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sl.items()] == [(k, tuple(v.shape)) for k, v in sn.items()]
    assert all(torch.equal(sl[k], sn[k]) for k in sl)  # same initialisation too
    fill_(legacy, seed=3)
    new.load_state_dict(legacy.state_dict())
    assert new.patch == legacy.patch and new.spatial_shape == (cells,)
    C = kw.get("in_channels", 1)
    for X in (cells, cells // 2):
        u, x = fields1d(2, X, C), grid1d(X)
        with torch.no_grad():
            z = legacy.encode(u, x)
            assert torch.equal(z, new.encode(u, x))
            for q in (x, grid1d(37), torch.rand(2, 9)):
                assert torch.equal(legacy.decode(z, q), new.decode(z, q))


def test_1d_outputs_equal_pre_change_values() -> None:
    """Weights set by name (fill_), fixed input: the values the 1D autoencoder gave before it learnt
    2D (recorded from the pre-change implementation)."""
    ae = fill_(tiny(n_tokens=32, spatial_shape=(256,)))
    x64 = (torch.arange(256, dtype=torch.float64) + 0.5) / 256
    u = torch.sin(2 * torch.pi * torch.stack([x64, 2 * x64])).unsqueeze(-1).float()
    x = x64.float()
    with torch.no_grad():
        z = ae.encode(u, x)
        y = ae.decode(z, x)
        q = ae.decode(z, torch.tensor([0.0, 0.123, 0.5, 0.987]))
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z[0, :2, :4], torch.tensor(
        [[0.5497027039527893, 1.5104620456695557, -0.13521131873130798, 1.29351806640625],
         [0.2566467523574829, 1.328700304031372, 0.22080035507678986, 0.2424168884754181]]), **close)
    torch.testing.assert_close(z[1, -1, :4], torch.tensor(
        [0.14658276736736298, 1.5966424942016602, -0.15159326791763306, 1.4896445274353027]), **close)
    torch.testing.assert_close(y[:, ::51, 0], torch.tensor(
        [[-1.8220497369766235, 2.971238136291504, 3.031498908996582, 1.4495697021484375,
          -0.7792743444442749, 0.6751739978790283],
         [-1.6510370969772339, 2.580897808074951, -3.5858771800994873, -0.6678045392036438,
          -0.8165038228034973, 0.4173997640609741]]), **close)
    torch.testing.assert_close(q[..., 0], torch.tensor(
        [[-2.632321834564209, -2.6949896812438965, -3.450003147125244, 2.5427560806274414],
         [-2.5982940196990967, -2.352623462677002, -3.1671175956726074, 3.1970458030700684]]), **close)
    assert float(y.double().abs().sum()) == pytest.approx(1189.9000643491745, rel=1e-5)


def test_1d_patch_rule_from_the_grid() -> None:
    assert tiny(n_tokens=32, spatial_shape=(256,)).patch == 8
    assert tiny(n_tokens=32, spatial_shape=(1024,)).patch == 32
    assert tiny(n_tokens=32, spatial_shape=(64,)).patch == 2
    ae = tiny(n_tokens=32, spatial_shape=(100,))  # not a multiple: floor, cells averaged onto 96
    assert ae.patch == 3 and ae.encoder.model_grid == (96,)
    u = fields1d(2, 100, 1)
    assert ae(u, grid1d(100)).shape == (2, 100, 1)
    with pytest.raises(ValueError, match="n_tokens"):
        tiny(n_tokens=32, spatial_shape=(16,))
    with pytest.raises(ValueError, match="patch"):  # the legacy call keeps its rule
        tiny(n_tokens=24)


# ------------------------------------------------------------------------------------------ 1D, 2 channels

def test_two_channel_1d_autoencoder_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    B, X, C = 3, 64, 2
    ae = tiny(n_tokens=16, in_channels=C, spatial_shape=(X,))
    u, x = fields1d(B, X, C), grid1d(X)
    z = ae.encode(u, x)
    assert z.shape == (B, 16, 16)
    y = ae.decode(z, x)
    assert y.shape == (B, X, C)
    pts = torch.rand(B, 11)
    assert ae.decode(z, pts).shape == (B, 11, C)
    torch.testing.assert_close(ae.decode(z, pts.unsqueeze(-1)), ae.decode(z, pts))  # (B, Q, 1) == (B, Q)
    loss = (y - u).pow(2).mean() + (ae.decode(z, pts) ** 2).mean()
    loss.backward()
    assert_all_grads(ae)


def _rollout(shape, seed=0, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(shape, generator=g, dtype=torch.float64) + 0.3
    pred = true + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return pred, true


def _check_nrmse_identities(true: torch.Tensor) -> None:
    B, T, C = true.shape[0], true.shape[1], true.shape[-1]
    zeros = torch.zeros_like(true)
    f64 = dict(dtype=torch.float64)
    assert torch.equal(M.nrmse_per_channel(true, true), torch.zeros(C, **f64))
    torch.testing.assert_close(M.nrmse_per_channel(zeros, true), torch.ones(C, **f64))
    assert torch.equal(M.frame_nrmse(true, true), torch.zeros(B, T, C, **f64))
    torch.testing.assert_close(M.frame_nrmse(zeros, true), torch.ones(B, T, C, **f64))
    assert torch.equal(M.sample_nrmse(true, true), torch.zeros(B, **f64))
    torch.testing.assert_close(M.sample_nrmse(zeros, true), torch.ones(B, **f64))
    assert M.pdebench_metrics(true, true)["nrmse"] == 0.0
    assert M.pdebench_metrics(torch.zeros_like(true), true)["nrmse"] == pytest.approx(1.0)


def _check_all_metrics(pred, true, allow_nan=()):
    ens = pred[None] + 0.1 * torch.randn(4, *pred.shape, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(9))
    out = M.all_metrics(pred, true, u0=true[:, 0], ens=ens, ks=(1, 2))
    for k, v in out.items():
        assert isinstance(v, float), k
        assert math.isfinite(v) or k in allow_nan, (k, v)
    m = M.RolloutMetrics()
    m.update(pred[:1], true[:1])
    m.update(pred[1:], true[1:])
    got = m.compute()
    for k, v in M.pdebench_metrics(pred, true).items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), k
    return out


def test_two_channel_1d_metrics() -> None:
    pred, true = _rollout((3, 4, 32, 2))
    _check_all_metrics(pred, true)
    _check_nrmse_identities(true)
    # per-channel nRMSE is the channel's own figure, the headline their mean
    per = M.nrmse_per_channel(pred, true)
    for c in range(2):
        assert float(per[c]) == pytest.approx(M.pdebench_metrics(pred[..., c], true[..., c])["nrmse"], rel=1e-12)
    assert float(per.mean()) == pytest.approx(M.pdebench_metrics(pred, true)["nrmse"], rel=1e-12)
    # preallocated states in 1D
    m = M.RolloutMetrics(n_frames=4, nx=32, channels=2)
    m.update(pred, true)
    assert m.compute()["frmse_high"] == pytest.approx(M.pdebench_metrics(pred, true)["frmse_high"], rel=1e-12)


def test_sample_nrmse_is_the_training_figure() -> None:
    """sample_nrmse = the relative L2 over all but the batch axis (what stages/base computed)."""
    pred, true = _rollout((4, 3, 16, 2), seed=5)
    dims = tuple(range(1, pred.ndim))
    ref = (pred - true).pow(2).mean(dims).sqrt() / true.pow(2).mean(dims).sqrt().clamp_min(1e-12)
    assert torch.equal(M.sample_nrmse(pred, true), ref)
    assert torch.isfinite(M.sample_nrmse(pred, torch.zeros_like(true))).all()  # clamped denominator
    p = pred.clone().requires_grad_(True)
    M.sample_nrmse(p, true).sum().backward()  # differentiable, dtype kept
    assert p.grad is not None and M.sample_nrmse(pred.float(), true.float()).dtype == torch.float32


# ------------------------------------------------------------------------------------------ 2D

def test_2d_autoencoder_grid_and_any_point() -> None:
    torch.manual_seed(0)
    B, H, W, C = 2, 16, 16, 2
    ae = tiny(n_tokens=16, in_channels=C, spatial_shape=(H, W))
    assert ae.patch == (4, 4) and ae.spatial_dims == 2
    u, xy = fields2d(B, H, W, C).float(), grid2d(H, W)
    z = ae.encode(u, xy)
    assert z.shape == (B, 16, 16)
    torch.testing.assert_close(ae.encode(u, xy.reshape(-1, 2)), z)  # (H*W, 2) point list
    y = ae.decode(z, xy)
    assert y.shape == (B, H, W, C) and ae(u, xy).shape == (B, H, W, C)
    assert ae(u, xy.reshape(-1, 2)).shape == (B, H, W, C)
    flat = ae.decode(z, xy.reshape(-1, 2))  # shared points (Q, 2)
    assert flat.shape == (B, H * W, C)
    torch.testing.assert_close(flat.reshape(B, H, W, C), y, atol=1e-5, rtol=1e-5)
    pts = torch.rand(B, 7, 2)
    per = ae.decode(z, pts)  # per-sample points (B, Q, 2)
    assert per.shape == (B, 7, C)
    torch.testing.assert_close(ae.decode(z, pts, batched=True), per)
    for b in range(B):
        torch.testing.assert_close(per[b], ae.decode(z[b:b + 1], pts[b])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.decode(z, xy.expand(B, -1, -1, -1)), y, atol=1e-5, rtol=1e-5)  # (B, H, W, 2)
    assert ae.decode(z, grid2d(32, 24)).shape == (B, 32, 24, C)  # any grid
    torch.testing.assert_close(ae.decode(z, pts + 1.0), per, atol=1e-4, rtol=1e-4)  # periodic
    # a 3-dim query equal to the model grid is the grid, whatever the batch size
    z16 = z[:1].expand(H, -1, -1)
    assert ae.decode(z16, xy).shape == (H, H, W, C)
    assert ae.decode(z16, xy, batched=True).shape == (H, W, C)
    loss = (y - u).pow(2).mean() + per.pow(2).mean()
    loss.backward()
    assert_all_grads(ae)


def test_2d_encoder_patches_match_decoder_token_centres() -> None:
    """Token i * s + j holds the cells [i ph, (i+1) ph) x [j pw, (j+1) pw) (the raw values ride in the
    patch vector), and the decoder places that token at ((i + 0.5) / s, (j + 0.5) / s)."""
    B, H, W, C = 1, 8, 12, 1
    ae = tiny(n_tokens=4, in_channels=C, spatial_shape=(H, W))
    assert ae.patch == (4, 6)
    seen = {}

    def keep_input(module, inputs, output) -> None:
        seen["h"] = inputs[0]

    ae.encoder.patch_proj.register_forward_hook(keep_input)
    u = torch.arange(H * W, dtype=torch.float32).reshape(1, H, W, 1)
    with torch.no_grad():
        ae.encode(u, grid2d(H, W))
    h = seen["h"].reshape(B, 4, 4, 6, -1)[..., -C:]  # raw values of each token's cells
    centres = ae.decoder.token_centres()
    for i in range(2):
        for j in range(2):
            n = i * 2 + j
            assert torch.equal(h[0, n, ..., 0], u[0, i * 4:(i + 1) * 4, j * 6:(j + 1) * 6, 0])
            torch.testing.assert_close(centres[n], torch.tensor([(i + 0.5) / 2, (j + 0.5) / 2]))


def test_2d_resolutions_continuity_and_settings() -> None:
    torch.manual_seed(0)
    ae = tiny(n_tokens=16, spatial_shape=(16, 16))
    for H, W in ((32, 32), (8, 8), (16, 24), (12, 20)):  # finer, coarser, mixed grids
        assert ae.encode(fields2d(2, H, W, 1).float(), grid2d(H, W)).shape == (2, 16, 16)
    z = ae.encode(fields2d(2, 16, 16, 1).float(), grid2d(16, 16))
    # continuous across the lines where the local head switches tokens (token centres) and across 0/1
    with torch.no_grad():
        for p in ae.decoder.parameters():
            p.add_(0.1 * torch.randn(p.shape))
        c = torch.tensor([0.125, 0.375, 0.0, 0.6])
        a = torch.stack([c, torch.full_like(c, 0.3)], -1)
        eps = torch.tensor([1e-5, 0.0])
        left, right = ae.decode(z, a - eps), ae.decode(z, a + eps)
        assert (left - right).abs().max() < 1e-2 * ae.decode(z, grid2d(16, 16)).abs().max()
        left, right = ae.decode(z, a.flip(-1) - eps.flip(-1)), ae.decode(z, a.flip(-1) + eps.flip(-1))
        assert (left - right).abs().max() < 1e-2 * ae.decode(z, grid2d(16, 16)).abs().max()
    with pytest.raises(ValueError, match="n_tokens"):
        tiny(n_tokens=8, spatial_shape=(16, 16))  # not a perfect square
    with pytest.raises(ValueError, match="n_tokens"):
        tiny(n_tokens=64, spatial_shape=(12, 12))  # 8 x 8 tokens do not divide 12 x 12
    with pytest.raises(ValueError):
        ae.encode(fields1d(2, 16, 1), grid1d(16))  # a 1D field into a 2D model
    with pytest.raises(ValueError):
        ae.decode(z, torch.rand(5))  # 1D queries into a 2D model


def test_2d_metrics_shapes_and_identities() -> None:
    B, T, H, W, C = 3, 4, 16, 16, 2
    true = fields2d(B * T, H, W, C).reshape(B, T, H, W, C)
    pred = true + 0.05 * torch.randn(true.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = _check_all_metrics(pred, true, allow_nan=("frmse_high",))
    assert math.isnan(out["frmse_high"])  # 16 x 16: radial bins 0..7, the high band [12, ...) is empty
    _check_nrmse_identities(true)
    assert M.spectral_energy_error(true, true) == 0.0
    assert M.spectral_energy_error(2 * true, true) == pytest.approx(3.0)
    assert M.correlation_horizon(true, true) == T + 1
    m = M.RolloutMetrics(n_frames=T, nx=(H, W), channels=C)
    m.update(pred, true)
    assert m.nx == (H, W)
    assert m.compute()["frmse_mid"] == pytest.approx(M.pdebench_metrics(pred, true)["frmse_mid"])


def _pdebench_2d_reference(pred, true, Lx, Ly):
    """PDEBench's 2D brmse and fRMSE written out with loops (one batch = all samples)."""
    p, t = pred.numpy(), true.numpy()
    B, T, nx, ny, C = p.shape
    e = p - t
    K = min(nx // 2, ny // 2)
    bd, bands = [], {"low": [], "mid": [], "high": []}
    for b in range(B):
        for tt in range(T):
            for c in range(C):
                s = (e[b, tt, 0, :, c] ** 2).sum() + (e[b, tt, -1, :, c] ** 2).sum()
                s += (e[b, tt, :, 0, c] ** 2).sum() + (e[b, tt, :, -1, c] ** 2).sum()
                bd.append(math.sqrt(s / (2 * nx + 2 * ny)))
    for tt in range(T):
        for c in range(C):
            F = np.zeros((B, K))
            for b in range(B):
                E = np.abs(np.fft.fftn(e[b, tt, :, :, c])) ** 2
                for i in range(nx // 2):
                    for j in range(ny // 2):
                        k = int(math.floor(math.sqrt(i * i + j * j)))
                        if k <= K - 1:
                            F[b, k] += E[i, j]
            per_k = np.sqrt(F.mean(0)) / (nx * ny) * Lx * Ly
            bands["low"].append(per_k[:4].mean())
            bands["mid"].append(per_k[4:12].mean())
            bands["high"].append(per_k[12:].mean())
    return {"brmse": np.mean(bd), **{f"frmse_{k}": np.mean(v) for k, v in bands.items()}}


def test_2d_pdebench_metrics_match_reference() -> None:
    pred, true = _rollout((2, 2, 32, 26, 2), seed=4)
    got = M.pdebench_metrics(pred, true, domain_length=(2.0, 0.5))
    ref = _pdebench_2d_reference(pred, true, 2.0, 0.5)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-10), k
    c = 0.25  # a constant offset: only the k = 0 bin has error, c * Lx * Ly
    off = M.pdebench_metrics(true + c, true)
    for k in ("rmse", "crmse", "brmse", "max_err"):
        assert off[k] == pytest.approx(c)
    assert off["frmse_low"] == pytest.approx(c / 4)
    assert off["frmse_mid"] == pytest.approx(0.0, abs=1e-12) and off["frmse_high"] == pytest.approx(0.0, abs=1e-12)


def test_2d_physics_metrics() -> None:
    H = W = 16
    xy = grid2d(H, W).double()
    u0 = (torch.sin(2 * math.pi * xy[..., 0]) * torch.cos(2 * math.pi * xy[..., 1]) + 1.5)[None, ..., None]
    u0 = u0.repeat(2, 1, 1, 1)  # (B, H, W, 1)
    T = 5
    decay = torch.linspace(0.9, 0.5, T, dtype=torch.float64).view(1, T, 1, 1, 1)
    pred = 1.5 + (u0 - 1.5)[:, None] * decay
    assert M.mass_drift(pred, u0=u0) == pytest.approx(0.0, abs=1e-12)
    assert M.energy_increase(pred, u0=u0) == 0.0 and M.tv_increase(pred, u0=u0) == 0.0
    grow = 1.5 + (u0 - 1.5)[:, None] * torch.linspace(1.1, 1.5, T, dtype=torch.float64).view(1, T, 1, 1, 1)
    assert M.tv_increase(grow, u0=u0) == pytest.approx(0.5, rel=1e-9)  # TV scales with the amplitude
    # TV sums both axes: a field varying along y only still has a TV
    stripes = torch.sin(2 * math.pi * xy[..., 1])[None, None, ..., None]
    tv = M._total_variation(stripes)
    ref = (torch.roll(stripes, -1, dims=3) - stripes).abs().sum()
    assert float(tv) == pytest.approx(float(ref)) and float(ref) > 0
    # the shell spectrum holds every mode once (Parseval)
    spec = M._energy_spectrum(grow)
    torch.testing.assert_close(spec.sum(-1), H * W * grow.pow(2).sum(dim=(2, 3, 4)))
    with pytest.raises(ValueError, match="u0"):
        M.mass_drift(pred, u0=u0[:, :8])  # a frame of another grid

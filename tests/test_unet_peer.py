"""The U-Net peer (PDEBench's UNet1d): shapes, size, refusals, learning, state-dict round trip."""
from __future__ import annotations

import math

import pytest
import torch

from ups_lightning.bench.unet import UNetPeer, UNetSettings, build_unet


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _expected_params(c_in: int, c_out: int, f: int, dims: int = 1) -> int:
    """PDEBench's UNet1d (UNet2d: dims=2) counted from its layer shapes."""
    k, up = 3 ** dims, 2 ** dims      # cells of a 3-tap (3 x 3) kernel and of a 2 (2 x 2) up-convolution

    def block(a: int, w: int) -> int:
        # Conv(a, w, 3, bias=False) + BN(w) + Conv(w, w, 3, bias=False) + BN(w); BN: weight + bias
        return a * w * k + 2 * w + w * w * k + 2 * w

    def upconv(a: int, w: int) -> int:
        # ConvTranspose(a, w, kernel 2) with bias: weight (a, w, 2[, 2]) + bias (w)
        return a * w * up + w

    enc = block(c_in, f) + block(f, 2 * f) + block(2 * f, 4 * f) + block(4 * f, 8 * f)
    bottleneck = block(8 * f, 16 * f)
    dec = (upconv(16 * f, 8 * f) + block(16 * f, 8 * f) + upconv(8 * f, 4 * f) + block(8 * f, 4 * f)
           + upconv(4 * f, 2 * f) + block(4 * f, 2 * f) + upconv(2 * f, f) + block(2 * f, f))
    head = f * c_out + c_out                                     # Conv(f, out, 1) with bias
    return enc + bottleneck + dec + head


def test_settings_round_trip():
    s = UNetSettings.from_mapping({"init_features": 16, "grad_frames": 5, "not_a_field": 1})
    assert s.init_features == 16 and s.grad_frames == 5
    assert UNetSettings.from_mapping(s.as_dict()) == s
    assert UNetSettings().init_features == 32


@pytest.mark.parametrize("channels", [1, 2])
def test_output_shape(channels):
    torch.manual_seed(0)
    model = build_unet(4, channels, UNetSettings(init_features=4))
    out = model(torch.randn(3, 4, 32, channels))
    assert out.shape == (3, 32, channels)
    model.eval()
    assert model(torch.randn(1, 4, 48, channels)).shape == (1, 48, channels)


def test_parameter_count_matches_layer_arithmetic():
    model = build_unet(10, 1)
    # PDEBench's configuration: in = initial_step * channels = 10, out = 1, f = 32
    assert _n_params(model) == _expected_params(10, 1, 32) == 2_708_673
    assert _n_params(build_unet(10, 2)) == _expected_params(20, 2, 32)
    assert _n_params(build_unet(3, 1, UNetSettings(init_features=8))) == _expected_params(3, 1, 8)


@pytest.mark.parametrize("x", [30, 40, 8])
def test_grid_not_multiple_of_16_is_refused(x):
    model = build_unet(2, 1, UNetSettings(init_features=4))
    with pytest.raises(ValueError, match=rf"X={x}.*multiple of 16"):
        model(torch.randn(2, 2, x, 1))


@pytest.mark.parametrize("shape", [(2, 3, 32, 1), (2, 2, 32, 2), (2, 32, 1), (2, 2, 32, 1, 1)])
def test_wrong_window_shape_is_refused(shape):
    model = build_unet(2, 1, UNetSettings(init_features=4))
    with pytest.raises(ValueError, match="UNetPeer expects"):
        model(torch.randn(*shape))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="init_features"):
        UNetPeer(2, 1, UNetSettings(init_features=0))


def test_learns_next_frame_of_shifted_sine():
    torch.manual_seed(0)
    k, nx, n = 4, 32, 8
    x = torch.arange(nx) / nx
    phase = torch.linspace(0.0, 2 * math.pi, n + 1)[:-1]
    t = torch.arange(k + 1) * 0.05                                # a sine moving right by 0.05 per frame
    traj = torch.sin(2 * math.pi * (x[None, None, :] - t[None, :, None]) + phase[:, None, None])[..., None]
    window, target = traj[:, :k], traj[:, k]                      # (n, k, nx, 1), (n, nx, 1)
    model = build_unet(k, 1, UNetSettings(init_features=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = torch.mean((model(window) - target) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, losses


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_unet(3, 2, UNetSettings(init_features=4))
    model.train()
    model(torch.randn(4, 3, 16, 2))                              # move the BatchNorm running statistics
    model.eval()
    path = tmp_path / "unet.pt"
    torch.save(model.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert any("running_mean" in key for key in sd)
    torch.manual_seed(1)
    other = build_unet(3, 2, UNetSettings(init_features=4))
    other.load_state_dict(sd)                                    # strict
    other.eval()
    w = torch.randn(2, 3, 16, 2)
    with torch.no_grad():
        assert torch.equal(model(w), other(w))


def test_the_2d_unet_is_pdebenchs_unet2d_in_shape_and_size():
    torch.manual_seed(0)
    model = build_unet(3, 2, UNetSettings(init_features=4), spatial_shape=(32, 16))
    out = model(torch.randn(2, 3, 32, 16, 2))
    assert out.shape == (2, 32, 16, 2) and model.dims == 2
    assert _n_params(build_unet(10, 2, spatial_shape=(64, 64))) == _expected_params(20, 2, 32, dims=2)
    with pytest.raises(ValueError, match="multiple of 16 on each axis"):
        model(torch.randn(1, 3, 32, 24, 2))
    with pytest.raises(ValueError, match=r"expects \(B, 3, X, Y, 2\) windows"):
        model(torch.randn(1, 3, 32, 2))

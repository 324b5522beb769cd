"""The fast paths of issue 20 compute what the direct paths compute: the decoder's grid plan, the
fused RMSNorm, batches indexed in one call, and a whole guarded rollout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from ups_lightning.data.datamodule import _TensorItems, _Windows
from ups_lightning.models.autoencoder import Autoencoder
from ups_lightning.models.layers import RMSNorm


def _grid(shape):
    axes = [(torch.arange(n) + 0.5) / n for n in shape]
    return axes[0] if len(shape) == 1 else torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def _random_ae(C, shape, n_tokens, decoder_depth=1, local_head=True, seed=0):
    torch.manual_seed(seed)
    ae = Autoencoder(in_channels=C, spatial_shape=shape, dim=16, n_tokens=n_tokens, depth=1, heads=2, hidden=32,
                     n_fourier=8, decoder_depth=decoder_depth, local_head=local_head).eval()
    with torch.no_grad():   # the zero-initialised layers too: every term of the decode must count
        for p in ae.parameters():
            p.add_(0.1 * torch.randn_like(p))
            p.requires_grad_(False)   # frozen, as a latent stage holds it: the decoder may cache its plan
    return ae


def _both_paths(ae, z, x, **kw):
    with torch.no_grad():
        fast = ae.decode(z, x, **kw)
        ae.decoder.fast_decode = False
        try:
            direct = ae.decode(z, x, **kw)
        finally:
            ae.decoder.fast_decode = True
    return fast, direct


@pytest.mark.parametrize("C,shape,n_tokens,depth,local_head", [
    (1, (64,), 8, 1, True), (2, (64,), 16, 2, True), (1, (60,), 8, 1, True), (1, (64,), 8, 1, False),
    (1, (16, 16), 16, 1, True), (2, (16, 8), 4, 2, True)])
def test_planned_decode_equals_the_direct_decode(C, shape, n_tokens, depth, local_head):
    ae = _random_ae(C, shape, n_tokens, depth, local_head)
    x = _grid(shape)
    z = torch.randn(5, n_tokens, 16)
    kw = {"batched": False} if len(shape) == 2 else {}
    fast, direct = _both_paths(ae, z, x, **kw)
    assert "_plan" in ae.decoder.__dict__           # the fast path was taken
    assert fast.shape == direct.shape == (5, *shape, C)
    assert torch.allclose(fast, direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))


def test_plan_follows_weight_and_grid_changes():
    ae = _random_ae(1, (64,), 8)
    x, z = _grid((64,)), torch.randn(3, 8, 16)
    with torch.no_grad():
        ae.decode(z, x)
        ae.decoder.head_skip.weight.mul_(2.0)    # an in-place edit of a weight the plan folds in
        ae.decoder.query[0].bias.add_(0.5)      # ... and one the grid queries use
    fast, direct = _both_paths(ae, z, x)
    assert torch.allclose(fast, direct, rtol=1e-5, atol=1e-5)
    x2 = x[::2].clone()                          # another grid: another plan
    fast, direct = _both_paths(ae, z, x2)
    assert fast.shape == (3, 32, 1) and torch.allclose(fast, direct, rtol=1e-5, atol=1e-5)


def test_training_the_decoder_takes_the_direct_path_and_gets_gradients():
    ae = _random_ae(1, (64,), 8).train()
    for p in ae.parameters():
        p.requires_grad_(True)
    x, z = _grid((64,)), torch.randn(3, 8, 16)
    ae.decode(z, x).pow(2).mean().backward()
    assert "_plan" not in ae.decoder.__dict__
    assert ae.decoder.query[0].weight.grad is not None and ae.decoder.query[0].weight.grad.abs().sum() > 0


def test_a_trainable_decoder_never_decodes_stale_weights():
    """Validation of the autoencoder stage decodes under no_grad between optimizer steps. A fused
    AdamW step changes the weights without bumping their tensor versions, so a plan cached then
    would decode the old weights: a trainable decoder must not cache one."""
    ae = _random_ae(1, (64,), 8)
    for p in ae.parameters():
        p.requires_grad_(True)
    x, z = _grid((64,)), torch.randn(3, 8, 16)
    opt = torch.optim.AdamW(ae.parameters(), lr=0.05, fused=True)
    with torch.no_grad():
        before = ae.decode(z, x)
    ae.decode(z, x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        after = ae.decode(z, x)
        ae.decoder.fast_decode = False
        direct = ae.decode(z, x)
    assert "_plan" not in ae.decoder.__dict__
    assert not torch.allclose(after, before) and torch.equal(after, direct)


def test_frozen_decoder_plans_and_passes_gradients_to_the_latents():
    ae = _random_ae(1, (64,), 8)
    x = _grid((64,))
    z = torch.randn(3, 8, 16, requires_grad=True)
    ae.decode(z, x).pow(2).mean().backward()
    assert "_plan" in ae.decoder.__dict__
    g_fast = z.grad.clone()
    z.grad = None
    ae.decoder.fast_decode = False
    ae.decode(z, x).pow(2).mean().backward()
    assert torch.allclose(g_fast, z.grad, rtol=1e-4, atol=1e-6)


def test_plan_refuses_per_sample_queries():
    ae = _random_ae(1, (64,), 8)
    with pytest.raises(ValueError, match="shared by the batch"):
        ae.decoder.plan(torch.rand(3, 64))


def test_fused_rmsnorm_is_the_formula():
    torch.manual_seed(0)
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.normal_()
    for x in (torch.randn(4, 7, 24), torch.randn(4, 7, 24).bfloat16()):
        xf = x.float()
        ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight).to(x.dtype)
        assert norm(x).dtype == x.dtype
        assert torch.allclose(norm(x).float(), ref.float(), rtol=1e-6, atol=1e-6)


def test_batches_indexed_in_one_call_equal_collated_items():
    g = torch.Generator().manual_seed(0)
    z, u, cond = torch.randn(6, 11, 4, 3, generator=g), torch.randn(6, 11, 16, 2, generator=g), torch.randn(6, 5)
    ds = _Windows(z, u, cond, np.arange(11 - 3), 3)
    assert len(ds) == 6 * 8
    ks = torch.randperm(len(ds), generator=g)[:10].tolist()
    batched, collated = ds.__getitems__(ks), default_collate([ds[k] for k in ks])
    assert set(batched) == {"z", "u", "cond"}
    for key in batched:
        assert torch.equal(batched[key], collated[key]), key
    assert torch.equal(batched["z"][0], z[ks[0] // 8, ks[0] % 8: ks[0] % 8 + 4])
    frames = _TensorItems({"u": u.flatten(0, 1)})
    ks = [5, 0, 65, 5]
    assert torch.equal(frames.__getitems__(ks)["u"], default_collate([frames[k] for k in ks])["u"])


def test_guarded_rollout_fast_and_direct_paths_agree(smoke_run):
    """A whole guarded rollout (re-encode + projection, evaluate's default) of the trained smoke
    pipeline, every mode's building block: the fast decode path gives the direct path's frames."""
    from ups_lightning.artifacts import load_stage
    from ups_lightning.data.datamodule import open_run_data, unit_coords
    from ups_lightning.inference.rollout import Guard, Surrogate, ensemble_rollout, rollout
    from ups_lightning.pdes import get_pde

    cfg, records = smoke_run
    module = load_stage(cfg.run_dir, "distill", records["distill"])
    data = open_run_data(cfg.data)
    cond = module.contract.conditioning("burgers1d", data.params["burgers1d"], data.meta.dt)
    sur = Surrogate(module, unit_coords(data), cond, guard=Guard(reencode=True, invariants=True),
                    pde=get_pde("burgers1d"))
    k = int(cfg.data.initial_step)
    u0 = torch.from_numpy(data.read("test")[:, k - 1]).float()
    steps = data.meta.n_t - k
    decoder = module.autoencoder.decoder
    fast = rollout(sur, u0, steps)
    fast_ens = ensemble_rollout(sur, u0, steps, 2, "student", generator=torch.Generator().manual_seed(0))
    assert sur._plan is not None   # the rollout decoded through its plan of the grid
    decoder.fast_decode = False
    try:
        direct = rollout(sur, u0, steps)
        direct_ens = ensemble_rollout(sur, u0, steps, 2, "student", generator=torch.Generator().manual_seed(0))
    finally:
        decoder.fast_decode = True
    assert fast.shape == (len(u0), steps, data.meta.n_x, 1) and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, direct, rtol=1e-4, atol=1e-4 * float(direct.abs().max()))
    torch.testing.assert_close(fast_ens, direct_ens, rtol=1e-4, atol=1e-4 * float(direct.abs().max()))


def test_prepared_conditioning_and_fused_adaln_are_the_formula():
    """The operator with its conditioning made once (the unroll's and rollout's path) gives what the
    raw-cond call gives, and that is the AdaLN formula with separate multiply and add."""
    import ups_lightning.models.layers as layers
    from ups_lightning.models.operator import PDETransformer

    torch.manual_seed(0)
    op = PDETransformer(dim=16, n_tokens=8, depth=3, heads=2, cond_dim=3, levels=1)
    with torch.no_grad():   # non-zero AdaLN and head weights, so every modulation and gate acts
        for p in op.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z, cond = torch.randn(4, 8, 16), torch.randn(4, 3)
    raw = op(z, cond)
    torch.testing.assert_close(op(z, op.condition(cond)), raw, rtol=0, atol=0)
    fused = (layers.modulate, layers.gated)
    try:
        layers.modulate = lambda x, shift, scale: x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        layers.gated = lambda x, g, y: x + g.unsqueeze(1) * y
        separate = op(z, cond)
    finally:
        layers.modulate, layers.gated = fused
    torch.testing.assert_close(raw, separate, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw, z)   # the test is not of the identity map


def test_compile_setting_is_a_switch_or_a_list_of_stages(tmp_path):
    from conftest import smoke_cfg

    from ups_lightning.config import validate_train_config
    from ups_lightning.errors import UserError
    from ups_lightning.training import compiles

    assert compiles(True, "autoencoder") and not compiles(False, "operator")
    assert compiles(["operator"], "operator") and not compiles(["operator"], "autoencoder")
    cfg = smoke_cfg(tmp_path, "trainer.compile=[operator,diffusion]")
    assert list(validate_train_config(cfg).trainer.compile) == ["operator", "diffusion"]
    for bad in ("[opertor]", "maybe"):
        with pytest.raises(UserError, match="trainer.compile"):
            validate_train_config(smoke_cfg(tmp_path, f"trainer.compile={bad}"))

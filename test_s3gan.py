"""Tests of s3gan.py and fid.py: CPU only, seeded, the whole suite in minutes.

Run: python -m pytest -q test_s3gan.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import s3gan
from s3gan import Config

ROOT = Path(__file__).resolve().parent
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny(method='s3gan-co', resolution=32, **kw):
    kw = dict(dict(ch=4, num_classes=5), **kw)
    return Config(method=method, resolution=resolution, **kw)


# ----------------------------------------------------------------------------------------------
# Networks (SPEC A1)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('resolution', [32, 64, 128, 256, 512])
def test_shapes_and_ranges_at_every_resolution(resolution):
    torch.manual_seed(0)
    cfg = tiny(resolution=resolution, ch={32: 4, 64: 8, 128: 8, 256: 4, 512: 4}[resolution])
    G, D = s3gan.build_models(cfg)
    z, y = torch.randn(2, cfg.z_dim), torch.tensor([1, 3])
    with torch.no_grad():
        x = G(z, y)
        out = D(x, torch.tensor([2, -1]))
    assert x.shape == (2, 3, resolution, resolution)
    assert 0 <= x.min() and x.max() <= 1
    assert out.logits.shape == (2,) and out.rot_logits.shape == (2, 4)
    assert out.cls_logits.shape == (2, 5) and out.y_used[0] == 2


PAPER_COUNTS = [  # (resolution, method, G, D): SPEC A1, compare_gan resnet_biggan_test.py
    (128, 'biggan', 70_433_988, 87_982_370),
    (128, 's3gan', 70_433_988, 87_988_518),
    (128, 's3gan-co', 70_433_988, 89_525_518),
    (256, 'biggan', 82_097_604, 98_635_298),
]


@pytest.mark.parametrize('resolution,method,g_count,d_count', PAPER_COUNTS)
def test_parameter_counts_match_the_paper(resolution, method, g_count, d_count, monkeypatch):
    monkeypatch.setattr(s3gan, 'init_weights', lambda module: None)   # counting needs no init
    with torch.device('meta'):                                         # nor any memory
        G, D = s3gan.build_models(Config(method=method, resolution=resolution, num_classes=1000))
    assert sum(p.numel() for p in G.parameters()) == g_count
    assert sum(p.numel() for p in D.parameters()) == d_count


def test_spectral_norm_makes_the_largest_singular_value_one():
    torch.manual_seed(0)
    conv = s3gan.SNConv2d(8, 16, 3)
    with torch.no_grad():
        conv.weight.mul_(5)
    for _ in range(30):                      # each forward in training mode is one iteration
        conv(torch.randn(1, 8, 4, 4))
    W = s3gan.spectral_normalize(conv.weight, conv.u, update=False)
    assert torch.linalg.matrix_norm(W.flatten(1), ord=2).item() == pytest.approx(1, abs=1e-3)
    u = conv.u.clone()
    conv.eval()(torch.randn(1, 8, 4, 4))
    assert torch.equal(u, conv.u), 'eval mode must not run the power iteration'


def test_unpool_is_zero_insertion():
    x = torch.arange(1., 5.).view(1, 1, 2, 2)
    expected = torch.tensor([[1., 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]])
    assert torch.equal(s3gan.unpool(x)[0, 0], expected)
    x = torch.randn(2, 3, 4, 5)
    up = s3gan.unpool(x)
    assert torch.equal(up[:, :, ::2, ::2], x)
    assert torch.allclose(up.abs().sum(), x.abs().sum())


def test_conditional_bn_depends_on_label_and_z_chunk():
    torch.manual_seed(0)
    G, _ = s3gan.build_models(tiny(method='biggan'))
    bn = G.blocks[0].bn1
    x = torch.randn(4, bn.gamma.out_features, 4, 4)
    c = torch.randn(4, bn.gamma.in_features)
    out = bn(x, c)
    assert not torch.allclose(out, bn(x, c + torch.eye(c.shape[1])[-1]))    # embedding part
    assert not torch.allclose(out, bn(x, c + torch.eye(c.shape[1])[0]))     # z-chunk part
    # and in G: a different label or a different z chunk changes the image
    z, y = torch.randn(2, G.chunk * G.num_chunks), torch.tensor([0, 1])
    x0 = G(z, y)
    z2 = z.clone()
    z2[:, G.chunk:2 * G.chunk] += 1                                         # block 1's chunk
    assert not torch.allclose(x0, G(z, torch.tensor([2, 3])))
    assert not torch.allclose(x0, G(z2, y))


def test_cbn_has_no_plus_one_and_standardizes_over_the_batch():
    bn = s3gan.ConditionalBatchNorm(3, 2, eps=1e-5)
    bn.gamma.eval(), bn.beta.eval()            # fixed u: the same gamma(c), beta(c) each call
    x = torch.randn(8, 3, 5, 5) * 3 + 2
    c = torch.randn(8, 2)
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    expected = x_hat * bn.gamma(c)[:, :, None, None] + bn.beta(c)[:, :, None, None]
    assert torch.allclose(bn(x, c), expected, atol=1e-5)


def test_d_logit_is_the_projection_formula():
    torch.manual_seed(0)
    _, D = s3gan.build_models(tiny(method='biggan'))
    D.eval()                                   # fixed u, so the SN weights are reproducible
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 4, 2])
    out = D(x, y)
    h = x
    for block in D.blocks:
        h = block(h)
    h = F.relu(h).sum((2, 3))
    w = D.final_fc.normalized_weight()
    E = D.embed_y.normalized_weight()          # (C, K)
    by_hand = h @ w[0] + D.final_fc.bias + (E.t()[y] * h).sum(1)
    assert torch.allclose(out.logits, by_hand, atol=1e-4)


def test_d_block_with_equal_widths_has_no_skip():
    torch.manual_seed(0)
    block = s3gan.DBlock(6, 6, down=True).eval()   # fixed u: the same weights each call
    x = torch.randn(2, 6, 8, 8)
    convs_only = F.avg_pool2d(block.conv2(F.relu(block.conv1(F.relu(x)))), 2)
    assert block.shortcut is None and torch.allclose(block(x), convs_only)


def test_init_is_orthogonal_with_zero_bias_and_zero_attention_gain():
    torch.manual_seed(0)
    G, D = s3gan.build_models(tiny(resolution=64, ch=8))
    W = D.blocks[1].conv1.weight.flatten(1)           # (out, in*9) with out <= in*9
    assert torch.allclose(W @ W.t(), torch.eye(W.shape[0]), atol=1e-4)
    assert D.blocks[1].conv1.bias.abs().sum() == 0 and G.attn.sigma == 0 and D.attn.sigma == 0


# ----------------------------------------------------------------------------------------------
# Losses and batch layout (SPEC A2)
# ----------------------------------------------------------------------------------------------

def test_hinge_losses_equal_their_equations():
    d_real, d_fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - [2, .5, -1]) = [0, .5, 2]; relu(1 + [-2, 0, 1.5]) = [0, 1, 2.5]
    assert s3gan.hinge_loss_d(d_real, d_fake).item() == pytest.approx(2.5 / 3 + 3.5 / 3)
    assert s3gan.hinge_loss_g(d_fake).item() == pytest.approx(0.5 / 3)   # -mean([-2, 0, 1.5])


def test_rotation_loss_keeps_the_epsilon_inside_the_log():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([2, 3])
    # row 0: -log(1/4 + 1e-10); row 1: p = e^-100 ~ 0, so -log(1e-10) = 23.03 (not inf)
    expected = (-np.log(0.25 + 1e-10) - np.log(np.exp(-100) + 1e-10)) / 2
    assert s3gan.rotation_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_class_loss_averages_over_labeled_rows_only():
    logits = torch.randn(4, 3)
    y = torch.tensor([2, -1, 0, -1])
    ce = F.cross_entropy(logits[[0, 2]], y[[0, 2]])
    assert s3gan.class_loss(logits, y).item() == pytest.approx(ce.item(), rel=1e-6)
    assert s3gan.class_loss(logits, torch.full((4,), -1)).item() == 0


def test_rotate_batch_layout_on_a_worked_example():
    x = torch.arange(6 * 2 * 2.).view(6, 1, 2, 2)           # six distinct 2x2 images
    y = torch.tensor([10, 11, 12, 13, 14, 15])
    x_all, y_all, rot = s3gan.rotate_batch(x, y, 2)
    assert x_all.shape == (12, 1, 2, 2)
    assert torch.equal(x_all[:6], x)
    for k in (1, 2, 3):                                      # rows 6 + 2(k-1) .. : rot90^k
        expected = np.rot90(x[4:].numpy(), k, axes=(2, 3))
        assert np.array_equal(x_all[4 + 2 * k:6 + 2 * k].numpy(), expected)
    assert y_all.tolist() == [10, 11, 12, 13, 14, 15, 14, 15, 14, 15, 14, 15]
    assert rot.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]          # targets of the last 4n rows
    assert torch.equal(x_all[-8:-6], x[-2:])                 # class 0: the unrotated sources


def test_label_mixing_keeps_labels_and_passes_no_gradient_to_the_classifier():
    y = torch.tensor([3, -1, 0, -1])
    cls_logits = torch.eye(6)[[1, 2, 2, 5]]
    assert s3gan.mix_labels(y, cls_logits).tolist() == [3, 2, 0, 5]
    torch.manual_seed(0)
    _, D = s3gan.build_models(tiny(method='s2gan-co'))
    out = D(torch.rand(4, 3, 32, 32), y)
    out.logits.sum().backward()               # the GAN logits only: projection and trunk
    assert D.classifier.weight.grad is None or D.classifier.weight.grad.abs().sum() == 0
    assert D.embed_y.weight.grad.abs().sum() > 0

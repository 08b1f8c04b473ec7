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


def test_conv_unpooled_equals_unpool_then_conv():
    torch.manual_seed(0)
    for k in (3, 1):
        conv = s3gan.SNConv2d(5, 7, k).eval()
        x = torch.randn(2, 5, 6, 6)
        assert torch.allclose(s3gan.conv_unpooled(conv, x), conv(s3gan.unpool(x)), atol=1e-5)


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


# ----------------------------------------------------------------------------------------------
# Training (SPEC A2, A4, B2, B5, B6)
# ----------------------------------------------------------------------------------------------

def tiny_npz(path, n=48, resolution=32, classes=3, seed=0):
    """A small labeled image set as an .npz (x uint8 NHWC, y int)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)
    x[..., 0] = (y * 80)[:, None, None]                       # a class cue, so labels matter
    np.savez(path, x=x, y=y)
    return str(path)


def train_cfg(tmp_path, method='s3gan-co', **kw):
    base = dict(data=tiny_npz(tmp_path / 'data.npz'), resolution=32, ch=4, batch_size=8,
                steps=2, out=str(tmp_path / 'run'), num_workers=0, log_every=1,
                sample_every=1000, ckpt_every=1000, standing_batches=2, labeled_fraction=0.5,
                pretrain_steps=4, pretrain_batch_size=8)
    return Config(method=method, **dict(base, **kw))


@pytest.mark.parametrize('method', s3gan.METHODS)
def test_one_step_of_each_method(method):
    torch.manual_seed(0)
    cfg = tiny(method=method, num_classes=4, batch_size=8)
    G, D = s3gan.build_models(cfg)
    G_ema = s3gan.copy.deepcopy(G)
    rt = s3gan.Runtime('cpu')
    opts = rt.adam(G.parameters(), 1e-4, cfg), rt.adam(D.parameters(), 5e-4, cfg)
    y_true = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    y_real = torch.where(torch.arange(8) < 4, y_true, -1) if method.endswith('-co') else y_true
    if method == 'single-label':                               # one class (method_labels)
        y_real = torch.zeros_like(y_true)
    batches = [(torch.rand(8, 3, 32, 32), y_real, y_true) for _ in range(cfg.disc_iters)]
    seen = []
    D.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out.y_used)))
    stats = s3gan.train_step((G, D, G_ema, G, D), opts, batches, cfg, rt, ema_decay=0.0)

    assert all(torch.isfinite(v) for v in stats.values())
    assert len(seen) == cfg.disc_iters + 1                     # 2 D steps, then the G step
    n = 8 // (4 * cfg.rotated_batch_fraction) if s3gan.uses_rotation(method) else 0
    for k, (x_seen, y_used) in enumerate(seen[:-1]):           # each D step: its own reals
        assert torch.equal(x_seen[:8], batches[k][0]) and x_seen.shape[0] == 2 * (8 + 3 * n)
        y_proj = y_used[:8]
        if method == 'random-label':                           # redrawn, not the stored label
            assert not torch.equal(y_proj, y_real)
        elif method.endswith('-co'):                           # known labels kept, rest argmax
            assert torch.equal(y_proj[:4], y_true[:4]) and (y_proj >= 0).all()
        else:
            assert torch.equal(y_proj, y_real)
    assert not torch.equal(seen[0][0][:8], seen[1][0][:8])     # fresh real data per D step
    # which heads learn: rotation with rotation methods, classifier with co-training methods
    rot_grad = D.rotation is not None and D.rotation.weight.grad.abs().sum() > 0
    cls_grad = D.classifier is not None and D.classifier.weight.grad.abs().sum() > 0
    assert rot_grad == s3gan.uses_rotation(method) and cls_grad == method.endswith('-co')
    assert ('loss_rot_g' in stats) == s3gan.uses_rotation(method)
    assert all(p.grad is not None for p in G.parameters() if p.requires_grad)
    assert all(torch.equal(a, b) for a, b in zip(G_ema.parameters(), G.parameters()))  # decay 0


def test_ema_arithmetic():
    torch.manual_seed(0)
    G, _ = s3gan.build_models(tiny(method='biggan'))
    G_ema = s3gan.copy.deepcopy(G)
    before = [p.clone() for p in G_ema.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G.fc_noise.u.mul_(-1)
    s3gan.ema_update(G_ema, G, 0.9)
    for b, p, e in zip(before, G.parameters(), G_ema.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p, atol=1e-6)
    assert torch.equal(G_ema.fc_noise.u, G.fc_noise.u)        # G's u is used, not averaged


def test_endless_sampler_splits_global_batches_and_resumes():
    full = list(__import__('itertools').islice(iter(s3gan.EndlessSampler(10, 3)), 30))
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert full[:10] != full[10:20]                            # a new permutation each epoch
    r0 = list(__import__('itertools').islice(iter(s3gan.EndlessSampler(10, 3, 4, 0, 2)), 5))
    r1 = list(__import__('itertools').islice(iter(s3gan.EndlessSampler(10, 3, 4, 1, 2)), 5))
    assert r0 == full[4:14:2] and r1 == full[5:15:2]


def _ckpt_tensors(path):
    ckpt = torch.load(path, weights_only=True)
    flat = {}
    for key in ('G', 'G_ema', 'D'):
        flat.update({f'{key}.{k}': v for k, v in ckpt[key].items()})
    for key in ('opt_G', 'opt_D'):
        for i, state in ckpt[key]['state'].items():
            flat.update({f'{key}.{i}.{k}': v for k, v in state.items()})
    return ckpt['step'], flat


def test_resume_equals_an_unbroken_run(tmp_path):
    broken = train_cfg(tmp_path, steps=4, out=str(tmp_path / 'a'))
    s3gan.train(broken)
    s3gan.train(s3gan.dataclasses.replace(broken, steps=8))
    s3gan.train(train_cfg(tmp_path, steps=8, out=str(tmp_path / 'b')))
    step_a, a = _ckpt_tensors(tmp_path / 'a' / 'ckpt.pt')
    step_b, b = _ckpt_tensors(tmp_path / 'b' / 'ckpt.pt')
    assert step_a == step_b == 8 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), 'resumed run differs from the unbroken one'
    log = [json.loads(line) for line in open(tmp_path / 'a' / 'log.jsonl')]
    assert [row['step'] for row in log] == list(range(1, 9))
    assert {'loss_d', 'loss_g', 'd_real', 'd_fake', 'rot_acc', 'cls_acc', 'images_per_s'} <= set(log[-1])
    assert (tmp_path / 'a' / 'samples' / 'step_0000008.png').exists()


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = train_cfg(tmp_path, method='biggan', steps=6, ckpt_every=2, log_every=2)
    calls = []
    real_hinge = s3gan.hinge_loss_g

    def hinge_that_breaks(d_fake):   # G's loss turns NaN in the 3rd step
        calls.append(1)
        return real_hinge(d_fake) * (float('nan') if len(calls) == 3 else 1.0)
    monkeypatch.setattr(s3gan, 'hinge_loss_g', hinge_that_breaks)
    with pytest.raises(s3gan.TrainingDiverged, match='at step 3'):
        s3gan.train(cfg)
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 2
    assert all(torch.isfinite(v).all() for v in ckpt['G'].values() if v.is_floating_point())


def test_sample_writes_what_fid_reads(tmp_path):
    import fid
    cfg = train_cfg(tmp_path, method='biggan', steps=1)
    s3gan.train(cfg)
    x, y = s3gan.sample(cfg.out, 10, str(tmp_path / 's.npz'), device='cpu', batch_size=4)
    data = np.load(tmp_path / 's.npz')
    assert data['x'].shape == (10, 32, 32, 3) and data['x'].dtype == np.uint8
    assert data['y'].dtype == np.int64 and set(data['y']) <= {0, 1, 2}
    s3gan.sample(cfg.out, 3, str(tmp_path / 'pngs'), device='cpu')
    assert len(os.listdir(tmp_path / 'pngs')) == 3
    for source in (tmp_path / 's.npz', tmp_path / 'pngs'):
        images = list(fid.iterate_images(str(source), batch_size=4))
        assert sum(len(b) for b in images) == (10 if source.suffix else 3)


@pytest.mark.parametrize('argv,message', [
    (['train', '--method', 'bigan'], "--method: unknown method 'bigan'"),
    (['train', '--labeled-fraction', '1.5'], '--labeled-fraction must be in (0, 1]'),
    (['train', '--resolution', '48'], '--resolution: 48 is not supported'),
    (['train', '--data', '/no/such/folder'], '/no/such/folder'),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        s3gan.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_cli_error_for_a_batch_the_rotation_layout_cannot_split(tmp_path, capsys):
    data = tiny_npz(tmp_path / 'd.npz')
    with pytest.raises(SystemExit):
        s3gan.main(['train', '--data', data, '--resolution', '32', '--batch-size', '12',
                    '--method', 's3gan-co', '--out', str(tmp_path / 'r')])
    assert '--batch-size 12' in capsys.readouterr().err


def test_cli_corrupt_image_names_the_file_without_traceback(tmp_path):
    for c in ('a', 'b'):
        (tmp_path / 'data' / c).mkdir(parents=True)
        from PIL import Image
        Image.new('RGB', (40, 40), (10, 20, 30)).save(tmp_path / 'data' / c / 'ok.png')
    (tmp_path / 'data' / 'b' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    r = subprocess.run([sys.executable, str(ROOT / 's3gan.py'), 'train', '--data',
                        str(tmp_path / 'data'), '--resolution', '32', '--ch', '4',
                        '--batch-size', '8', '--steps', '1', '--method', 'biggan',
                        '--num-workers', '0', '--out', str(tmp_path / 'run')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'broken.jpg' in r.stderr and 'Traceback' not in r.stderr


TWO_PROCESS_SCRIPT = '''
import os, sys, torch
sys.path.insert(0, {root!r})
import s3gan
rt = s3gan.Runtime('cpu')
torch.manual_seed(0)
G, _ = s3gan.build_models(s3gan.Config(method='biggan', resolution=32, ch=4, num_classes=5))
G_train = rt.wrap(G)
g = torch.Generator().manual_seed(1)
z, y = torch.randn(8, G.chunk * G.num_chunks, generator=g), torch.randint(0, 5, (8,), generator=g)
rows = slice(rt.rank * 8 // rt.world, (rt.rank + 1) * 8 // rt.world)
x = G_train(z[rows], y[rows])                  # batch norms see the moments of all 8 images
loss = (x - 0.3).square().mean()               # DDP averages: the mean over the global batch
loss.backward()
torch.save(dict(x=x.detach(), grads=[p.grad for p in G.parameters()]),
           os.path.join({out!r}, f'rank{{rt.rank}}_of{{rt.world}}.pt'))
'''


def test_two_processes_with_torchrun_equal_one_process(tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(TWO_PROCESS_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    '--nproc_per_node=2', str(script)], check=True, env=env, timeout=300)
    one = torch.load(tmp_path / 'rank0_of1.pt')
    r0, r1 = torch.load(tmp_path / 'rank0_of2.pt'), torch.load(tmp_path / 'rank1_of2.pt')
    assert torch.allclose(torch.cat([r0['x'], r1['x']]), one['x'], atol=1e-5)   # global moments
    for g1, g0, g_1 in zip(one['grads'], r0['grads'], r1['grads']):
        assert torch.allclose(g0, g1, atol=1e-5, rtol=1e-4) and torch.equal(g0, g_1)

"""The demo (`python s3gan.py`, or `s3gan.demo(**overrides)`): S3GAN with 10% labels on the
embedded shapes set, then its samples measured three ways against real images, and its picture.

It lives here, not in s3gan.py, because it is a measuring instrument, not the paper: the paper
measures FID and IS on ImageNet; on the embedded set the true labels are free, so we can ask
directly whether G draws the class it is asked for. examples/paper_table.py uses the same report.

Three measures of class-conditioning, each next to its ceiling on held-out real images (the
embedded set drawn with another seed, never trained on):

(a) judge A: the label stage's own recipe (s3gan.FeatureNet, rotations + labels) trained on all
    true labels. It sees what the label stage sees, so it may favour methods built on it.
(b) judge B: a plain CNN (`PlainCNN`: no residuals, no rotation, nothing shared with the label
    stage) trained with cross-entropy on all true labels. Both judges score the fraction of the
    samples asked for class c that they call c; neither sees whether the samples vary.
(c) CAS, the Classification Accuracy Score (Ravuri & Vinyals, NeurIPS 2019): a PlainCNN trained
    on G's samples alone, labelled with the class asked for, tested on real images; its ceiling
    is the same classifier trained on as many real images (which is judge B). It needs no judge
    and drops when the samples of a class lack variety; it cannot say which class G gets wrong.

Methods without true labels (clustering, single-label) are scored after the best one-to-one
matching of G's classes to the true ones; a class G has none for counts 0. FD is the Frechet
distance between samples and real images in judge A's 128-d features, the set's stand-in for FID.

The demo's settings (s3gan.DEMO) were chosen with judge A's class accuracy: Adam at 2e-4 for G
and D, or 1e-4 / 4e-4 (near the paper's, meant for batch 2048 and 250k steps), stays near chance
after 1,500 steps; 5e-4 reaches 0.64, 1e-3 0.85, 2e-3 is unstable. G's last block 2 x ch wide
(compare_gan: 4 x ch) makes a step 20% cheaper at equal accuracy; batch 16 or 24, or 1 D step
per G step, learns slower.

    python s3gan.py                      # the demo, about 9 min on 2 idle CPU cores
    python -c "import s3gan; s3gan.demo(method='biggan', labeled_fraction=1.0)"
"""
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import s3gan  # noqa: E402

CNN_STEPS = 400        # judge B and CAS: Adam steps of batch 64 (at most the label stage's)
LABEL_FREE = ('single-label', 'random-label', 'clustering', 'clustering-ss')


def held_out(cfg: s3gan.Config, num: int) -> tuple:
    """num real images no judge or G trained on: (x (num, 3, R, R) in [0, 1], y (num,))."""
    ds = s3gan.make_dataset(dataclasses.replace(cfg, num_images=num, seed=cfg.seed + 1000))
    return torch.stack([ds[i][0] for i in range(num)]), torch.as_tensor(ds.labels)


def all_images(cfg: s3gan.Config) -> tuple:
    """The whole training set as tensors: (x (N, 3, R, R) in [0, 1], y (N,))."""
    ds = s3gan.make_dataset(cfg)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.as_tensor(ds.labels)


class PlainCNN(nn.Sequential):
    """Judge B and CAS's classifier: three stages of 3x3 conv, BN, ReLU and 2x2 max-pooling
    (32, 64, 128 channels), global average pooling, a linear layer."""

    def __init__(self, num_classes: int, width: int = 32):
        layers, c = [], 3
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = w
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def fit_classifier(x, y, num_classes: int, steps: int, seed: int, device) -> PlainCNN:
    """Plain supervised cross-entropy on (x in [0, 1], y): Adam, one-cycle learning rate."""
    torch.manual_seed(seed)
    net = PlainCNN(num_classes).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(net((x[i] * 2 - 1).to(device)), y[i].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def predict(net: PlainCNN, x, device) -> torch.Tensor:   # (N, 3, R, R) in [0, 1] -> classes
    return torch.cat([net((b * 2 - 1).to(device)).argmax(1).cpu() for b in x.split(500)])


def cas(x, y, x_test, y_test, num_classes: int, steps: int, seed: int, device,
        matched: bool = False) -> float:
    """CAS (Ravuri & Vinyals 2019): a PlainCNN trained on (x, y), G's samples labelled with the
    class asked for, scored on real images (x_test, y_test); `matched`: after the best one-to-one
    matching of its classes to the true ones (methods without true labels)."""
    pred = predict(fit_classifier(x, y, num_classes, steps, seed, device), x_test, device)
    return (s3gan.cluster_accuracy(pred, y_test) if matched
            else (pred == y_test).float().mean().item())


def load_judges(cfg: s3gan.Config, device) -> tuple:
    """(judge A, judge B), each trained once on all of cfg's true labels and cached in cfg.out.
    Judge A: S4L (s3gan.pretrain) for half the label stage's default steps; judge B: CNN_STEPS.
    Neither trains longer than cfg.pretrain_steps (a short demo has short judges)."""
    default_steps = s3gan.label_stage(s3gan.Config(resolution=cfg.resolution))[0]
    ds = s3gan.make_dataset(cfg)
    steps = min(cfg.pretrain_steps or default_steps, default_steps // 2)
    path_a, path_b = (os.path.join(cfg.out, f'judge_{n}_{cfg.resolution}.pt') for n in 'AB')
    if not os.path.exists(path_a):
        print(f'judge A: the label stage\'s recipe on all {len(ds)} true labels', flush=True)
        torch.manual_seed(cfg.seed + 1)
        s3gan.save_checkpoint(path_a, s3gan.pretrain(cfg, ds, np.ones(len(ds), bool),
                                                     ds.num_classes, steps,
                                                     torch.device(device)).state_dict())
    if not os.path.exists(path_b):
        print(f'judge B: a plain CNN on all {len(ds)} true labels', flush=True)
        s3gan.save_checkpoint(path_b, fit_classifier(*all_images(cfg), ds.num_classes,
                                                     min(steps, CNN_STEPS), cfg.seed + 2,
                                                     device).state_dict())
    judge_a, judge_b = s3gan.feature_net(cfg.resolution, ds.num_classes), PlainCNN(ds.num_classes)
    for net, path in ((judge_a, path_a), (judge_b, path_b)):
        net.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
    return judge_a.to(device).eval(), judge_b.to(device, memory_format=torch.channels_last).eval()


def measure(G, cfg: s3gan.Config, rt: s3gan.Runtime, judges: tuple, num: int = 1000) -> dict:
    """The three measures for G (with standing statistics) and their ceilings on held-out real
    images: judge_a/judge_b (class accuracy), cas, fd; real_judge_a, real_judge_b (= CAS's
    ceiling: the same classifier trained on as many real images), real_fd; `real`: the images.
    Judges score `num` samples; CAS trains on as many samples as G's training set has images."""
    import fid   # lazily, as in s3gan
    judge_a, judge_b = judges
    x_real, y_real = held_out(cfg, 2 * num)
    xs, ys = zip(*s3gan.generate_uint8(G, max(num, cfg.num_images), cfg, rt, seed=cfg.seed + 7))
    x, y = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2) / 255, np.concatenate(ys)
    with torch.no_grad():   # judge A's features (N, 128) and classes
        h_fake, h_real, h_real2 = (torch.cat([judge_a(b.to(rt.device)).cpu() for b in v.split(250)])
                                   for v in (x[:num], x_real[:num], x_real[num:]))
        called_a, real_a = (judge_a.cls_head(h.to(rt.device)).argmax(1).cpu()
                            for h in (h_fake, h_real))
    K, C = G.embed_y.num_embeddings, judge_a.cls_head.out_features   # classes G can be asked for
    matched, y_test = cfg.method in LABEL_FREE, y_real[:num]

    def class_acc(called):   # of the samples asked for class c, the fraction called c
        if matched:          # one-to-one matching; K < C: the classes left over count 0
            return s3gan.cluster_accuracy(y[:num], called) * min(1, K / C)
        return float((called.numpy() == y[:num]).mean())

    def frechet(h1, h2):
        return fid.frechet_distance(*fid.feature_statistics(h1), *fid.feature_statistics(h2))

    steps = min(cfg.pretrain_steps or CNN_STEPS, CNN_STEPS)
    return dict(judge_a=class_acc(called_a),
                judge_b=class_acc(predict(judge_b, x[:num], rt.device)),
                cas=cas(x, torch.as_tensor(y), x_real[:num], y_test, K, steps, cfg.seed + 3,
                        rt.device, matched), fd=frechet(h_fake, h_real),
                real_judge_a=(real_a == y_test).float().mean().item(),
                real_judge_b=(predict(judge_b, x_real[:num], rt.device) == y_test).float().mean()
                .item(), real_fd=frechet(h_real2, h_real), real=(x_real[:num], y_test))


def report(s: dict, num: int, num_cas: int) -> str:
    """The three measures and their ceilings, one line each."""
    return (f'Class-conditioning of G_ema (chance 0.10; in brackets: held-out real images, the '
            f'ceiling):\n'
            f'  (a) judge A, the label stage\'s recipe (ResNet, rotations + labels), {num} samples:'
            f' {s["judge_a"]:.2f} ({s["real_judge_a"]:.3f})\n'
            f'  (b) judge B, a plain CNN trained on the true labels, {num} samples: '
            f'{s["judge_b"]:.2f} ({s["real_judge_b"]:.3f})\n'
            f'  (c) CAS, a plain CNN trained on {num_cas} samples, tested on real images: '
            f'{s["cas"]:.2f} ({s["real_judge_b"]:.3f}: trained on as many real images)\n'
            f'  FD in judge A\'s features: {s["fd"]:.2f} (real images: {s["real_fd"]:.2f})')


def save_named_rows(rows: list, path: str, scale: int = 2, heads: tuple = ()):
    """One PNG, a row per (name, images (N, 3, R, R) in [0, 1]): the name, then the images
    (NaN images are left blank), enlarged `scale` times; heads: (column, text) above them."""
    from PIL import ImageFont
    font, R, top = ImageFont.load_default(), rows[0][1].shape[-1] * scale, 16 if heads else 0
    left = max(font.getbbox(name)[2] for name, _ in rows) + 8
    img = Image.new('RGB', (left + max(len(x) for _, x in rows) * R, top + len(rows) * R), 'white')
    for c, text in heads:
        ImageDraw.Draw(img).text((left + c * R, 2), text, fill='black', font=font)
    for r, (name, x) in enumerate(rows):
        ImageDraw.Draw(img).text((4, top + r * R + R // 2 - 6), name, fill='black', font=font)
        for c, tile in enumerate((x.nan_to_num(1) * 255).round().byte().permute(0, 2, 3, 1)):
            img.paste(Image.fromarray(tile.numpy()).resize((R, R), Image.NEAREST),
                      (left + c * R, top + r * R))
    img.save(path)


def g_step_seconds(out: str) -> float:
    """Median seconds per G step of the run in `out`, from its log (images_per_s)."""
    with open(os.path.join(out, 'log.jsonl')) as fh:
        rows = [json.loads(line) for line in fh if 'images_per_s' in line]
    cfg = json.load(open(os.path.join(out, 'config.json')))
    images_per_step = cfg['batch_size'] * cfg['disc_iters']
    return images_per_step / float(np.median([r['images_per_s'] for r in rows]))


def demo(**overrides):
    """Train with s3gan.DEMO (and any Config field in overrides), then measure and draw."""
    cfg = s3gan.Config(**{**s3gan.DEMO, **overrides})
    print(f'S3GAN demo: {cfg.method} on the embedded shapes set, {cfg.resolution}x'
          f'{cfg.resolution}, {cfg.labeled_fraction:.0%} labels, {cfg.steps} G steps, output in '
          f'{cfg.out}/')
    t = time.time()
    result = s3gan.train(cfg)
    cfg, G_ema, t_measure = result['cfg'], result['G_ema'], time.time()
    rt = s3gan.Runtime(cfg.device)
    s = measure(G_ema, cfg, rt, load_judges(cfg, rt.device))
    t_end = time.time()
    labels = ('no label stage' if result['label_acc'] is None else
              f'label inference ({result["label_acc"]:.1%} of the inferred labels right)')
    print(f'\nDone in {(t_end - t) / 60:.1f} min: {labels}, {result["step"]} G steps, then the '
          f'measures ({t_end - t_measure:.0f} s, as long as '
          f'{(t_end - t_measure) / g_step_seconds(cfg.out):.0f} G steps of this run).\n'
          + report(s, 1000, max(1000, cfg.num_images)))
    (x_real, y_real), K = s['real'], cfg.num_classes
    z = torch.randn(K * 8, cfg.z_dim, generator=torch.Generator().manual_seed(1))
    y = torch.arange(K).repeat_interleave(8) % G_ema.embed_y.num_embeddings
    x = s3gan.generate(G_ema, z.to(rt.device), y.to(rt.device), rt)
    gap = torch.full((1,) + x.shape[1:], float('nan'))
    save_named_rows([(name, torch.cat([x_real[y_real == c][:4], gap, x[8 * c:8 * c + 8]]))
                     for c, name in enumerate(s3gan.SHAPES)], f'{cfg.out}/samples/final.png',
                    heads=((0, 'real images'),
                           (5, f'G_ema ({cfg.method}): judge A {s["judge_a"]:.2f}, judge B '
                               f'{s["judge_b"]:.2f}, CAS {s["cas"]:.2f}')))
    print(f'Samples (a row per class: 4 real images, then 8 of G_ema): '
          f'{cfg.out}/samples/final.png\nCheckpoint: {cfg.out}/ckpt.pt   log: {cfg.out}/log.jsonl')
    return s


if __name__ == '__main__':
    demo()

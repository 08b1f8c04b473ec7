"""D's 2x2 average pooling, three ways, timed side by side: forward + backward of the whole
discriminator (s3gan.Discriminator with the rotation head, training mode) on one batch.

- conv, then F.avg_pool2d: compare_gan's order (resnet_ops: conv2, then tf.nn.avg_pool), the
  implementation before s3gan.conv_pooled;
- conv, then reshape-and-mean: the same pooling as a view (B, C, H/2, 2, W/2, 2) and a mean;
- s3gan.conv_pooled (today): pooling fused into conv2, one stride-2 conv with a 4x4 kernel.

The shortcut's pooling (F.avg_pool2d before its 1x1 conv) is the same in all three. The
variants are swapped in one process by replacing s3gan.conv_pooled, timed interleaved, the
fastest of --reps kept; the outputs and input gradients of each are checked against the first.

    python benchmarks/pooling.py                        # CPU, 128x128, ch 96, batch 4
    python benchmarks/pooling.py --device cuda --precision bf16 --batch 64
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import s3gan  # noqa: E402

VARIANTS = {
    'conv, then F.avg_pool2d (before)': lambda conv, x: F.avg_pool2d(conv(x), 2),
    'conv, then reshape-and-mean': lambda conv, x: conv(x).unflatten(2, (-1, 2))
                                                        .unflatten(4, (-1, 2)).mean((3, 5)),
    's3gan.conv_pooled (today)': s3gan.conv_pooled,
}


def forward_backward(D, x, y, rt):
    """D(x, y) and the gradient of its logits' sum with respect to x and D's weights."""
    with rt.autocast():
        logits = D(x, y).logits
    grad_x, = torch.autograd.grad(logits.float().sum(), x)   # weights' grads are computed too
    return logits.detach().float(), grad_x.float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'))
    p.add_argument('--resolution', type=int, default=128)
    p.add_argument('--ch', type=int, default=96)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--reps', type=int, default=3, help='timed passes per variant, interleaved')
    p.add_argument('--channels-last', action='store_true')
    args = p.parse_args(argv)
    cfg = s3gan.Config(resolution=args.resolution, ch=args.ch, num_classes=1000)
    rt = s3gan.Runtime(args.device, args.precision)
    torch.manual_seed(0)
    D = s3gan.Discriminator(cfg.num_classes, cfg.ch, cfg.d_mult, cfg.d_attn, True, False)
    D = D.to(rt.device)
    x = torch.rand(args.batch, 3, cfg.resolution, cfg.resolution, device=rt.device)
    if args.channels_last:
        D, x = D.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = torch.randint(0, cfg.num_classes, (args.batch,), device=rt.device)
    fused, best, results = s3gan.conv_pooled, {}, {}
    try:
        for rep in range(args.reps + 1):                    # pass 0 warms up and checks
            for name, pool in VARIANTS.items():
                s3gan.conv_pooled = pool                    # DBlock.forward calls it by name
                D.eval()                                    # fixed u: equal weights for all
                if rep == 0:
                    results[name] = forward_backward(D, x, y, rt)
                    continue
                D.train()                                   # the previous pass has synced
                t = time.perf_counter()
                out = forward_backward(D, x, y, rt)
                float(out[1].sum())                         # waits for the device
                best[name] = min(best.get(name, float('inf')), time.perf_counter() - t)
    finally:
        s3gan.conv_pooled = fused
    ref_logits, ref_grad = next(iter(results.values()))
    print(f'D forward + backward, {args.resolution}x{args.resolution}, ch {args.ch}, batch '
          f'{args.batch}, {args.precision}, {rt.device}'
          f'{" (" + str(torch.get_num_threads()) + " threads)" if rt.type == "cpu" else ""}'
          f'{", channels_last" if args.channels_last else ""}, fastest of {args.reps}:')
    print('| pooling | ms | speed vs before | max difference of D(x, y) / of its gradient in x '
          '(relative) |')
    print('|---|---|---|---|')
    first = next(iter(best.values()))
    for name, seconds in best.items():
        logits, grad = results[name]
        diff = ((logits - ref_logits).abs().max() / ref_logits.abs().max(),
                (grad - ref_grad).abs().max() / ref_grad.abs().max())
        print(f'| {name} | {seconds * 1e3:.1f} | x{first / seconds:.2f} '
              f'| {diff[0]:.1e} / {diff[1]:.1e} |', flush=True)


if __name__ == '__main__':
    main()

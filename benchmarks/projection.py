"""The paper's ImageNet run (250k G steps of global batch 2,048) on one node of N GPUs: the step,
the data loader and the gradient all-reduce, each term printed with what it assumes.

- step: --step-img-s real images per second per GPU (default 1,190: one H200, bf16, compiled,
  batch 256 per GPU; `benchmarks/throughput.py` row in the README; give the end-to-end figure
  from a training log instead when it is the slower), i.e. disc_iters x batch per GPU / rate
  seconds per G step.
- all-reduce: the bytes s3gan's train_step exchanges per G step under torchrun, counted from the
  models (built on the meta device, no weights): DDP's fp32 gradient all-reduce of D in each of
  the 2 D steps and of G in the G step (D is not wrapped in the G step), plus BatchStandardize's
  (2, C) moments of every G batch norm, all-reduced in the 3 G forwards (2 under no_grad) and
  once more in the G backward. Time: NCCL's ring all-reduce moves 2 (N - 1) / N x bytes through
  each GPU's link (nccl-tests doc/PERFORMANCE.md, "bus bandwidth"), at --link-gbs per direction
  (default 450 GB/s: NVLink 4 on H100/H200 SXM, 900 GB/s both directions, NVIDIA's data
  sheet), plus --latency-us per call (default 20 us, an assumption for small messages on one
  NVSwitch node), the calls being DDP's buckets (25 MiB, the first 1 MiB) and the moments.
  Counted as if nothing overlapped with compute (DDP overlaps the buckets with the backward):
  an upper bound on this term.
- loader: --cores-per-gpu host cores per GPU (default 14: DGX H200, 2 x 56-core Xeon 8480C for
  8 GPUs), one of them the training process, the rest DataLoader workers at
  --loader-img-s-per-worker (default: measured here with `benchmarks/loader.py`'s path and one
  worker). The workers run while the GPU computes: a G step takes the longer of the two.

    python benchmarks/projection.py
    python benchmarks/projection.py --step-img-s 900 --loader-img-s-per-worker 180
"""

import argparse
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import s3gan  # noqa: E402

PAPER_G_STEPS, PAPER_BATCH = 250_000, 2048      # compare_gan biggan_imagenet128.gin


def ddp_buckets(module, first=2 ** 20, cap=25 * 2 ** 20):
    """How many all-reduce calls DDP's default bucketing makes for module's fp32 gradients:
    parameters in reverse order, a bucket closed once it holds `cap` bytes (the first: `first`)."""
    n, size, limit = 0, 0, first
    for p in reversed(list(module.parameters())):
        size += 4 * p.numel()
        if size >= limit:
            n, size, limit = n + 1, 0, cap
    return n + (size > 0)


def allreduce_per_g_step(cfg):
    """[(what, calls, bytes)] exchanged by one train_step (disc_iters D steps + the G step)."""
    with torch.device('meta'):
        G, D = s3gan.build_models(cfg)
    bns = [m for m in G.modules() if isinstance(m, s3gan.BatchStandardize)]
    moments = sum(2 * 4 * m.accu_mean.numel() for m in bns)        # (2, C) fp32 each
    passes = cfg.disc_iters + 2                                    # G forwards + G's backward
    d_bytes, g_bytes = (4 * sum(p.numel() for p in m.parameters()) for m in (D, G))
    return [(f'D gradients, {cfg.disc_iters} D steps', cfg.disc_iters * ddp_buckets(D),
             cfg.disc_iters * d_bytes),
            ('G gradients, the G step', ddp_buckets(G), g_bytes),
            (f'G batch-norm moments, {len(bns)} layers x {passes} passes', len(bns) * passes,
             passes * moments)]


def hours(seconds):
    return f'{seconds / 3600:.1f} h' + (f' ({seconds / 86400:.2f} d)' if seconds > 86400 else '')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--method', default='s3gan', choices=s3gan.METHODS)
    p.add_argument('--resolution', type=int, default=128)
    p.add_argument('--ch', type=int, default=96)
    p.add_argument('--gpus', type=int, default=8)
    p.add_argument('--step-img-s', type=float, default=1190.0, help='real img/s per GPU')
    p.add_argument('--link-gbs', type=float, default=450.0, help='GB/s per direction per GPU')
    p.add_argument('--latency-us', type=float, default=20.0, help='per all-reduce call')
    p.add_argument('--cores-per-gpu', type=int, default=14)
    p.add_argument('--loader-img-s-per-worker', type=float, default=0.0,
                   help='0: measure it here (benchmarks/loader.py, one worker)')
    args = p.parse_args(argv)
    cfg = s3gan.Config(method=args.method, resolution=args.resolution, ch=args.ch,
                       num_classes=1000, batch_size=PAPER_BATCH)
    per_gpu = PAPER_BATCH // args.gpus
    n = args.gpus

    rows = allreduce_per_g_step(cfg)
    calls, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    ring_s = 2 * (n - 1) / n * total / (args.link_gbs * 1e9)
    allreduce_s = ring_s + calls * args.latency_us * 1e-6
    print(f'All-reduce per G step, {args.resolution}x{args.resolution}, ch {args.ch}, '
          f'{args.method}, {n} GPUs:\n| what | calls | MB |\n|---|---|---|')
    for what, c, b in rows + [('total', calls, total)]:
        print(f'| {what} | {c} | {b / 1e6:,.2f} |')
    print(f'time: ring 2 ({n}-1)/{n} x {total / 1e6:,.1f} MB / {args.link_gbs:g} GB/s = '
          f'{ring_s * 1e3:.2f} ms, + {calls} calls x {args.latency_us:g} us = '
          f'{allreduce_s * 1e3:.2f} ms per G step\n')

    if not args.loader_img_s_per_worker:
        import loader
        with tempfile.TemporaryDirectory() as root:
            loader.write_jpegs(root, 96)
            torch.set_num_threads(1)
            args.loader_img_s_per_worker = loader.loader_rate(root, args.resolution, 32, 2, 1)
        print(f'loader: {args.loader_img_s_per_worker:.0f} img/s with one worker, measured here '
              f'(benchmarks/loader.py path, {os.cpu_count()} cores)')
    step_s = cfg.disc_iters * per_gpu / args.step_img_s
    workers, rate = args.cores_per_gpu - 1, args.loader_img_s_per_worker
    loader_s = cfg.disc_iters * per_gpu / (workers * rate)
    g_step_s = max(step_s + allreduce_s, loader_s)
    print(f'Paper run: {PAPER_G_STEPS:,} G steps of batch {PAPER_BATCH} = {per_gpu} per GPU x '
          f'{n} GPUs, {cfg.disc_iters} real batches per G step:\n'
          f'| term | per G step | what it assumes |\n|---|---|---|\n'
          f'| step | {step_s * 1e3:.0f} ms | {args.step_img_s:,.0f} real img/s per GPU at batch '
          f'{per_gpu} |\n'
          f'| all-reduce | {allreduce_s * 1e3:.1f} ms | {args.link_gbs:g} GB/s per direction, '
          f'ring, {args.latency_us:g} us a call, no overlap |\n'
          f'| loader (in parallel) | {loader_s * 1e3:.0f} ms | {workers} workers per GPU x '
          f'{rate:.0f} img/s = {workers * rate:,.0f} img/s '
          f'({math.ceil(args.step_img_s / rate) + 1} cores per GPU keep up) |\n'
          f'| **G step** | **{g_step_s * 1e3:.0f} ms** | max(step + all-reduce, loader): '
          f'{"the loader" if loader_s > step_s + allreduce_s else "the GPU"} sets the pace |')
    print(f'paper run: {PAPER_G_STEPS:,} x {g_step_s:.3f} s = {hours(PAPER_G_STEPS * g_step_s)} '
          f'on {n} GPUs (step alone: {hours(PAPER_G_STEPS * step_s)}); still a lower bound for '
          f'anything not counted (stragglers, evaluation, checkpoints)')


if __name__ == '__main__':
    main()

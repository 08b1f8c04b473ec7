"""Throughput of S3GAN training on this machine, and what it means for the paper's run.

For every configuration (batch per device x precision x compile x channels_last) it times real
`s3gan.train_step` calls (2 D sub-steps + 1 G step + EMA) on one fixed synthetic batch already
on the device, after warm-up, with the device synchronised, and prints one markdown table row:

- img/s: real images consumed per second (one batch per D sub-step), what a data loader must feed;
- ms per G step; GFLOP per G step, counted by torch.utils.flop_counter.FlopCounterMode on an
  eager step (matmuls, convolutions, attention, forward and backward; not Adam or elementwise
  ops). FLOPs are affine in the batch (spectral norm's power iteration does not depend on it):
  they are counted at two small batches and extended to the timed one, exactly;
- TFLOP/s achieved and MFU, model FLOPs utilisation, against the device's dense peak: bf16
  tensor-core peak for bf16 rows, TF32 for fp32 rows on CUDA (s3gan enables TF32), and on a CPU
  the rate of a large fp32 matmul timed in the same run (--peak-tflops overrides);
- peak memory (CUDA: allocated by torch; CPU: the process's maximum resident set so far);
- the projected wall time of the paper's run (ImageNet, 250k G steps of global batch 2048):
  250,000 x (ms per G step) x 2048 / (devices x batch per device). It assumes the time per image
  measured here holds at batch 2048 / devices and that N devices scale perfectly (gradient
  all-reduce and data loading not counted): a lower bound for N > 1. One device cannot hold
  batch 2048: its column is the compute time, not a command one can run. benchmarks/
  projection.py adds the all-reduce and the loader to a measured rate.

With --data DIR it also times the data loader alone on that folder (decoding, crop, resize,
transfer to the device) and warns when it is slower than the fastest step measured.

    python benchmarks/throughput.py --resolution 128 --ch 96 --batch 8 --compile both
    python benchmarks/throughput.py --device cuda --batch 256,512 --precision bf16,fp32
    python benchmarks/throughput.py --device cuda --batch 256 --data /imagenet/train
"""

import argparse
import copy
import dataclasses
import os
import resource
import sys
import time

import torch
from torch.utils import flop_counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import s3gan  # noqa: E402

PAPER_G_STEPS, PAPER_BATCH = 250_000, 2048   # biggan_imagenet128.gin
# Dense peaks in TFLOP/s from NVIDIA's data sheets (sparsity figures halved): bf16 tensor, TF32
# tensor, fp32. The first name that occurs in torch.cuda.get_device_name() wins.
PEAKS = {
    'H200': (989.4, 494.7, 66.9),
    'H100 PCIe': (756.0, 378.0, 51.2),
    'H100 NVL': (835.0, 417.5, 60.0),
    'H100': (989.4, 494.7, 66.9),        # SXM
    'A100': (312.0, 156.0, 19.5),
    'L40S': (362.1, 183.0, 91.6),
    'L4': (121.0, 60.0, 30.3),
    'A10': (125.0, 62.5, 31.2),
}

# FlopCounterMode knows the CUDA attention kernels but not the CPU one; count it the same way.
@flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


@flop_counter.register_flop_formula(
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

def build_models_once(cfg, cache={}, build=s3gan.build_models):
    """s3gan.build_models, memoised per architecture: the orthogonal initialisation of a 128x128
    model takes longer on a CPU than the timing itself, and the values do not change the time."""
    key = (cfg.method, cfg.resolution, cfg.ch, cfg.num_classes)
    if key not in cache:
        cache[key] = build(cfg)
    return copy.deepcopy(cache[key])


def synthetic_batches(cfg, rt, batch):
    """cfg.disc_iters views of one fixed (x_real, y_real, y_true) batch on the device."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand(batch, 3, cfg.resolution, cfg.resolution, generator=g)
    y_true = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    y_real = y_true.clone()
    if s3gan.uses_classifier(cfg.method):    # co-training: the labeled fraction, -1 elsewhere
        y_real[torch.rand(batch, generator=g) >= cfg.labeled_fraction] = -1
    return [tuple(t.to(rt.device) for t in (x, y_real, y_true))] * cfg.disc_iters


def synchronize(rt, stats):
    s3gan.device_sync(rt.device)
    float(stats['loss_g'])   # waits for the device (CUDA, XLA) to finish the step


def flops_per_step(cfg, rt, cache={}):
    """(FLOPs at batch 0, FLOPs per image) of one eager train_step, from counts at two batches."""
    key = (cfg.method, cfg.resolution, cfg.ch, cfg.num_classes, rt.type)
    if key not in cache:
        b1 = s3gan.NUM_ROTATIONS * cfg.rotated_batch_fraction    # the smallest valid batch
        counts = [count_flops(cfg, rt, b) for b in (b1, 2 * b1)]
        per_image = (counts[1] - counts[0]) / b1
        cache[key] = (counts[0] - per_image * b1, per_image)
    return cache[key]


def count_flops(cfg, rt, batch):
    cfg = dataclasses.replace(cfg, batch_size=batch, compile=False)
    G, D, G_ema, opt_G, opt_D = s3gan.build_training(cfg, rt)
    batches = synthetic_batches(cfg, rt, batch)
    with flop_counter.FlopCounterMode(display=False) as counter:
        s3gan.train_step((G, D, G_ema, G, D), (opt_G, opt_D), batches, cfg, rt, 0.0)
    return counter.get_total_flops()


def cpu_peak_tflops(n=2048, reps=5):
    """fp32 TFLOP/s of the best of `reps` n x n matmuls: what this CPU's BLAS reaches."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float('inf')
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def device_peak(rt, precision, override, cache={}):
    """(TFLOP/s, which peak) for MFU."""
    if override:
        return override, 'given'
    if rt.type == 'cuda':
        name = torch.cuda.get_device_name(rt.device)
        for key, (bf16, tf32, fp32) in PEAKS.items():
            if key in name:
                if precision == 'bf16':
                    return bf16, 'bf16'
                return ((tf32, 'tf32') if torch.backends.cuda.matmul.allow_tf32
                        else (fp32, 'fp32'))
        return None, f'unknown ({name}): use --peak-tflops'
    if rt.type == 'cpu':
        if 'cpu' not in cache:
            cache['cpu'] = cpu_peak_tflops()
        return cache['cpu'], 'fp32 matmul'
    return None, 'unknown: use --peak-tflops'


def device_name(rt):
    if rt.type == 'cuda':
        return torch.cuda.get_device_name(rt.device)
    if rt.type == 'cpu':
        return f'CPU ({torch.get_num_threads()} threads)'
    return str(rt.device)


def duration(seconds):
    return f'{seconds / 86400:.1f} d' if seconds >= 2 * 86400 else f'{seconds / 3600:.1f} h'


HEADER = ('| device | res | ch | method | batch/dev | precision | compile | channels_last | img/s '
          '| ms per G step | GFLOP per G step | TFLOP/s | MFU (peak TFLOP/s) | memory GiB '
          '| warm-up s | paper run, 1 device | paper run, {n} devices |')


class Bench:
    """One configuration: built and warmed up at construction, timed by `time()`, which keeps
    the fastest of its calls (several calls, interleaved with the other configurations, see
    through a machine shared with other work)."""

    def __init__(self, cfg, args):
        self.cfg, self.args, self.step_s = cfg, args, float('inf')
        self.rt = rt = s3gan.Runtime(cfg.device, cfg.precision)
        a, per_image = flops_per_step(cfg, rt)
        self.flops = a + per_image * cfg.batch_size
        if rt.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(rt.device)
        G, D, G_ema, opt_G, opt_D = s3gan.build_training(cfg, rt)
        self.models, self.opts = (G, D, G_ema, G, D), (opt_G, opt_D)
        self.batches = synthetic_batches(cfg, rt, cfg.batch_size)
        t = time.perf_counter()
        self.run(args.warmup)      # the first steps compile, pick kernels, create Adam state
        self.warmup_s = time.perf_counter() - t

    def run(self, steps):
        for _ in range(steps):
            stats = s3gan.train_step(self.models, self.opts, self.batches, self.cfg, self.rt, 0.0)
            s3gan.device_sync(self.rt.device)
        synchronize(self.rt, stats)

    def time(self):
        t = time.perf_counter()
        self.run(self.args.steps)
        self.step_s = min(self.step_s, (time.perf_counter() - t) / self.args.steps)

    def profile(self, top=15):
        """The operators that take the time in one step (torch.profiler), self time first."""
        from torch.profiler import ProfilerActivity, profile
        cuda = [ProfilerActivity.CUDA] if self.rt.type == 'cuda' else []
        with profile(activities=[ProfilerActivity.CPU] + cuda) as prof:
            self.run(1)
        sort = 'self_cuda_time_total' if cuda else 'self_cpu_time_total'
        print(prof.key_averages().table(sort_by=sort, row_limit=top), flush=True)

    def row(self):
        cfg, rt, args, step_s = self.cfg, self.rt, self.args, self.step_s
        batch = cfg.batch_size
        if rt.type == 'cuda':
            memory = torch.cuda.max_memory_allocated(rt.device) / 2 ** 30
        else:   # Linux reports kilobytes
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        peak, peak_kind = device_peak(rt, cfg.precision, args.peak_tflops)
        tflops = self.flops / step_s / 1e12
        mfu = f'{tflops / peak:.1%} ({peak:.4g} {peak_kind})' if peak else peak_kind
        paper = PAPER_G_STEPS * step_s * PAPER_BATCH / batch
        return (f'| {device_name(rt)} | {cfg.resolution} | {cfg.ch} | {cfg.method} | {batch} '
                f'| {cfg.precision} | {compiled(cfg, args)} '
                f'| {"yes" if cfg.channels_last else "no"} | {self.img_s():.3g} '
                f'| {step_s * 1e3:.1f} | {self.flops / 1e9:.1f} | {tflops:.3g} | {mfu} '
                f'| {memory:.1f} | {self.warmup_s:.1f} | {duration(paper)} '
                f'| {duration(paper / args.devices)} |')

    def img_s(self):
        return self.cfg.disc_iters * self.cfg.batch_size / self.step_s


def compiled(cfg, args):
    return ('yes' + ('' if args.compile_mode == 'default' else f', {args.compile_mode}')
            if cfg.compile else 'no')


def oom_row(cfg):
    return (f'| {cfg.device} | {cfg.resolution} | {cfg.ch} | {cfg.method} | {cfg.batch_size} '
            f'| {cfg.precision} | {cfg.compile} | {cfg.channels_last} | out of memory |')


def time_loader(cfg, args, needed):
    """Images/s of the training data loader alone on --data, then a warning if it is too slow."""
    rt = s3gan.Runtime(cfg.device, cfg.precision)
    cfg = dataclasses.replace(cfg, data=args.data, num_workers=s3gan.loader_workers(cfg, rt.device))
    dataset = s3gan.make_dataset(cfg)
    cfg = s3gan.with_data_classes(cfg, dataset)
    view = s3gan.TrainView(dataset, dataset.labels)
    batches = s3gan.real_batches(view, cfg, rt, 0)
    next(batches)                  # the workers start and fill their queues
    t = time.perf_counter()
    for _ in range(args.loader_batches):
        x, _, _ = next(batches)
    synchronize(rt, dict(loss_g=x.sum()))
    img_s = args.loader_batches * cfg.batch_size / (time.perf_counter() - t)
    print(f'\ndata loader on {args.data} ({len(dataset)} images, {cfg.resolution}x'
          f'{cfg.resolution}, batch {cfg.batch_size}, {cfg.num_workers} workers, '
          f'{os.cpu_count()} CPU cores): {img_s:.0f} img/s')
    if needed and img_s < needed:
        print(f'WARNING: the data loader ({img_s:.0f} img/s) is slower than the fastest training '
              f'step measured above ({needed:.0f} img/s): decoding would limit training. Use '
              f'more cores (--num-workers), or store the images pre-resized.')
    return img_s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--resolution', type=int, default=128)
    p.add_argument('--ch', type=int, default=96, help='width unit of G and D')
    p.add_argument('--method', default='s3gan', choices=s3gan.METHODS)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--batch', default='8', help='batch per device, comma-separated: 256,512')
    p.add_argument('--precision', default='fp32', help='fp32, bf16 or both: fp32,bf16')
    p.add_argument('--compile', default='no', choices=('no', 'yes', 'both'),
                   help='torch.compile of G and D (Config.compile); both: eager then compiled')
    p.add_argument('--compile-mode', default='default',
                   choices=('default', 'reduce-overhead', 'max-autotune'),
                   help='torch.compile mode for the compiled rows (reduce-overhead: CUDA graphs)')
    p.add_argument('--channels-last', default='no', choices=('no', 'yes', 'both'),
                   help='channels_last memory format (Config.channels_last)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or xla')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first (compile, Adam)')
    p.add_argument('--steps', type=int, default=5, help='timed G steps')
    p.add_argument('--rounds', type=int, default=1,
                   help='time every configuration this many times, interleaved, keep the '
                        'fastest (for a machine shared with other work)')
    p.add_argument('--profile', action='store_true',
                   help='also print the operators that take the time in one step')
    p.add_argument('--devices', type=int, default=8, help='N for the N-device projection')
    p.add_argument('--peak-tflops', type=float, default=0.0,
                   help='the peak for MFU, instead of the table / the CPU matmul')
    p.add_argument('--data', default='', help='an image folder: also time the data loader alone')
    p.add_argument('--num-workers', type=int, default=-1,
                   help='loader processes for --data (-1: s3gan\'s default for the device)')
    p.add_argument('--loader-batches', type=int, default=20, help='batches timed with --data')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    s3gan.build_models = build_models_once   # s3gan.build_training calls it by name
    if args.compile_mode != 'default':       # s3gan.build_training calls Module.compile
        compile_ = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, **kw: compile_(self, mode=args.compile_mode, **kw)
    choice = dict(no=[False], yes=[True], both=[False, True])
    configs = [s3gan.Config(method=args.method, resolution=args.resolution, ch=args.ch,
                            num_classes=args.num_classes, batch_size=int(batch),
                            device=args.device, precision=precision, compile=compile_,
                            channels_last=channels_last, num_workers=args.num_workers)
               for batch in args.batch.split(',') for precision in args.precision.split(',')
               for compile_ in choice[args.compile] for channels_last in choice[args.channels_last]]
    print(HEADER.format(n=args.devices))
    print('|' + '---|' * HEADER.count(' | ') + '---|', flush=True)
    benches, fastest = [], 0.0
    for cfg in configs:
        try:
            bench = Bench(cfg, args)
            bench.time()
        except torch.cuda.OutOfMemoryError:
            print(oom_row(cfg), flush=True)
            bench = None
            torch.cuda.empty_cache()
        if bench and args.rounds == 1 and not args.profile:   # report now, free the memory
            print(bench.row(), flush=True)
            fastest = max(fastest, bench.img_s())
            bench = None
            torch._dynamo.reset()            # compiled graphs of this configuration
        elif bench:
            benches.append(bench)
    if args.profile:
        for bench in benches:
            print(f'\nprofile: {bench.row()}')
            bench.profile()
    for _ in range(args.rounds - 1):
        for bench in benches:
            bench.time()
    for bench in benches:
        print(bench.row(), flush=True)
        fastest = max(fastest, bench.img_s())
    if args.data:
        cfg = dataclasses.replace(configs[0], num_classes=0)
        time_loader(cfg, args, fastest)


if __name__ == '__main__':
    main()

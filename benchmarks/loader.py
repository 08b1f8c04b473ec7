"""The data loader's rate per core on ImageNet-like JPEGs, and the cores a GPU needs.

It writes --images JPEGs of 500x375 (ImageNet's most common size) at quality 90 into class
folders: smooth random colour fields at every scale plus pixel noise, ~100 KB each
(ImageNet's training JPEGs average ~110 KB). Then it times s3gan's real training input path,
s3gan.real_batches over s3gan.FolderDataset: decode (Pillow), TF's random square crop, the TF1
bilinear resize to --resolution, collation into batches. Rows:

- one process, one thread, no workers: img/s per core (the decode alone is timed too);
- --workers N: N DataLoader processes feeding this one, img/s and img/s per worker;
- --draft: the same with Pillow's JPEG draft mode, decoding at 1/2, 1/4 or 1/8 scale (libjpeg's
  DCT scaling) where TF's smallest crop still shrinks by that factor. Not what s3gan does: the
  reduced decode low-passes the image before TF1's resize, which does not antialias, so the
  pixels differ; the mean absolute difference in [0, 255] is printed (central crops, so both
  read the same region).

The last column divides --step-img-s (default 1,190: one H200, bf16, compiled, batch 256, the
README's throughput row) by the rate: the cores one GPU needs to be fed.

    python benchmarks/loader.py                         # 1 core; then --workers 1,4,8,15
"""

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import s3gan  # noqa: E402


def natural_image(rng, w=500, h=375, noise=20.0):
    """An (h, w) RGB image with detail at every scale: bicubic-upsampled colour noise at octaves
    2..512 pixels across, amplitude falling as size^-0.5, plus Gaussian pixel noise."""
    img = np.zeros((h, w, 3), np.float32)
    for k in range(1, 10):
        n = 2 ** k
        small = rng.normal(size=(max(2, h * n // w), n, 3)).astype(np.float32)
        img += np.stack([np.asarray(Image.fromarray(small[..., c], 'F').resize(
            (w, h), Image.BICUBIC)) for c in range(3)], -1) / n ** 0.5
    img = (img - img.min()) / (img.max() - img.min()) * 255 + rng.normal(0, noise, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_jpegs(root, n, classes=4, seed=0):
    """n JPEGs in `classes` folders under root (kept if there); returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    paths = [os.path.join(root, f'class{i % classes}', f'{i:05d}.jpg') for i in range(n)]
    for path in paths:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            natural_image(rng).save(path, quality=90)
    return np.mean([os.path.getsize(p) for p in paths]) / 1024


@contextlib.contextmanager
def jpeg_draft(resolution):
    """Image.open that asks for the largest DCT scaling leaving TF's smallest random square crop
    (side sqrt(0.5 w h)) at least `resolution` wide; restored on exit."""
    open_ = Image.open

    def open_drafted(path, *args, **kwargs):
        img = open_(path, *args, **kwargs)
        factor = math.sqrt(0.5 * img.width * img.height) / resolution   # Pillow floors to 2^k
        img.draft('RGB', (math.ceil(img.width / factor), math.ceil(img.height / factor)))
        return img

    Image.open = open_drafted
    try:
        yield
    finally:
        Image.open = open_


def loader_rate(root, resolution, batch, batches, workers):
    """img/s of s3gan.real_batches on root: `batches` batches after the first (workers start)."""
    cfg = s3gan.Config(data=root, resolution=resolution, batch_size=batch, num_workers=workers)
    dataset = s3gan.make_dataset(cfg)
    stream = s3gan.real_batches(s3gan.TrainView(dataset, dataset.labels), cfg,
                                s3gan.Runtime('cpu'), 0)
    next(stream)
    t = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch / (time.perf_counter() - t)


def decode_rate(root):
    """img/s of Image.open + convert('RGB') alone (what FolderDataset decodes), over root."""
    paths = s3gan.FolderDataset(root, 32, False, False).files
    t = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            img.convert('RGB')
    return len(paths) / (time.perf_counter() - t)


def draft_difference(root, resolution, n=64):
    """Mean |draft - exact| in [0, 255] over the central crops of the first n images."""
    exact = s3gan.FolderDataset(root, resolution, False, False)
    with jpeg_draft(resolution):
        drafted = [exact[i][0] for i in range(min(n, len(exact)))]
    return float(torch.stack([(d - exact[i][0]).abs() for i, d in enumerate(drafted)]).mean()
                 * 255)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dir', default='', help='where the JPEGs go (default: a temporary folder)')
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--resolution', type=int, default=128)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--batches', type=int, default=6, help='batches timed per row')
    p.add_argument('--workers', default='', help='also time with these DataLoader processes')
    p.add_argument('--draft', action='store_true', help='also time and compare Pillow draft')
    p.add_argument('--step-img-s', type=float, default=1190.0,
                   help='the training step\'s rate per GPU, for the cores-per-GPU column')
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        root = args.dir or stack.enter_context(tempfile.TemporaryDirectory())
        kb = write_jpegs(root, args.images)
        torch.set_num_threads(1)                            # one core, as a DataLoader worker
        print(f'{args.images} JPEGs of 500x375, quality 90, {kb:.0f} KB on average; '
              f'{args.resolution}x{args.resolution} batches of {args.batch}; '
              f'{os.cpu_count()} CPU cores here; decode alone: {decode_rate(root):.0f} img/s')
        print('| path | processes | img/s | img/s per process | cores per GPU at '
              f'{args.step_img_s:,.0f} img/s |\n|---|---|---|---|---|')

        def row(name, workers, draft=False):
            with jpeg_draft(args.resolution) if draft else contextlib.nullcontext():
                rate = loader_rate(root, args.resolution, args.batch, args.batches, workers)
            per = rate / max(1, workers)
            procs = f'{workers} worker{"s" * (workers > 1)}' if workers else '1 (in-process)'
            print(f'| {name} | {procs} '
                  f'| {rate:.0f} | {per:.0f} | {args.step_img_s / per:.1f} |', flush=True)

        row('exact (s3gan)', 0)
        if args.draft:
            row('Pillow draft', 0, draft=True)
        for workers in [int(w) for w in args.workers.split(',') if w]:
            row('exact (s3gan)', workers)
        if args.draft:
            print(f'draft vs exact, central crops resized to {args.resolution}: mean |difference| '
                  f'{draft_difference(root, args.resolution):.2f} in [0, 255]')


if __name__ == '__main__':
    main()

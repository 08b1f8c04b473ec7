"""FID and Inception Score with the numbers papers report, in one file (torch, numpy, scipy, PIL).

Papers compute FID (Heusel et al. 2017) with the TensorFlow Inception graph of 2015-12-05;
mseitzer/pytorch-fid ports its weights (`pt_inception-2015-12-05-6726825d.pth`) and patches
torchvision's Inception-v3 where the graph differs. This file writes that network out itself,
loads the same file strictly and preprocesses as pytorch-fid, so its numbers equal pytorch-fid's.
Scores from torchvision's ImageNet Inception, another resize, or fewer than 50k samples are not
comparable with papers. The chain: image -> RGB in [0, 1] -> bilinear resize to 299x299 without
antialiasing -> [-1, 1] -> pool3 (2048) -> mean, covariance (N-1) in float64 -> Fréchet distance
with scipy's sqrtm (tens of seconds at 2048x2048 on a few cores).

    python fid.py samples/ real/                    # image folders, searched recursively
    python fid.py samples.npz real_stats.npz --is   # .npz of uint8 images (x or arr_0, NHWC) or
                                                    # of statistics (mu, sigma); + IS of the first
    python fid.py --save-stats real/ real_stats.npz # pytorch-fid reads this file too
    python fid.py A B --weights pt_inception-2015-12-05-6726825d.pth   # offline; else downloaded
                                                    # once to torch's hub cache, hash checked
API (s3gan.py imports this module lazily):
    model = load_inception(weights=None, device='cpu')   # InceptionFID in eval mode
    features, logits = model(x)   # x (B, 3, H, W) uint8 or float in [0, 1] -> (B, 2048), (B, 1008)
    mu, sigma = compute_statistics(images, model)        # images: iterable of (B, 3, H, W)
    mu, sigma, logits = compute_statistics(images, model, return_logits=True)
    frechet_distance(mu1, sigma1, mu2, sigma2)           # -> float
    inception_score(logits, splits=10)                   # -> (mean, std)
    get_activations(images, model), feature_statistics(features), random_weights(seed)

Decisions where pytorch-fid is silent:
- Inception Score: softmax over all 1008 logits of the graph (1000 ImageNet classes and 8
  unused outputs, which get ~0 probability), taken as pool3 @ W without the bias, as the
  reference IS code (Salimans et al. 2016) reads them; torch-fidelity's `logits_unbiased` too.
- No TF32 on CUDA. torch allows it for cuDNN convolutions by default, so pytorch-fid on an
  Ampere+ GPU rounds conv inputs to 10 bits; fid.py keeps pytorch-fid's fp32 (CPU) numbers.
- A folder of images of different sizes works: such a batch is resized image by image first.
- Float images are used as given, while PNGs were quantized to 8 bits, which moves FID
  slightly: quantize G's samples the same way if the two must agree.
"""
import argparse
import contextlib
import functools
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from scipy.special import log_softmax

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
IMAGE_EXTENSIONS = {'.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp'}


class FIDError(Exception):
    """Bad input or missing weights: the CLI prints the message as one line, no traceback."""


# -- The FID Inception-v3 (module names are the state-dict keys of the weights file) --------------
class BasicConv2d(nn.Module):
    """Conv without bias -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place: same numbers, less traffic


def avg_pool_3x3(x):
    # FID patch: TF's average pooling leaves the zero padding out of the mean.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b..5d at 35x35: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 with strided convs and a max pool."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e at 17x17: 7x7 convs factored into 1x7 and 7x1."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b, 7c at 8x8: 3x3 convs split into parallel 1x3 and 3x1."""

    def __init__(self, c_in, max_pool):
        super().__init__()
        # FID patch: the graph's last block (Mixed_7c) max-pools its pool branch; Mixed_7b and
        # the paper average.
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


def resize_to_299(x):
    """(B, 3, H, W) uint8 or float in [0, 1] -> (B, 3, 299, 299) float32 in [0, 1]."""
    # uint8 as torchvision's ToTensor, which pytorch-fid uses; bf16 or fp16 samples to fp32.
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (299, 299):  # at 299 the bilinear resize is the identity, exactly
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False,
                          antialias=False)
    return x


class InceptionFID(nn.Module):
    """The FID Inception-v3: images -> (pool3 features (B, 2048), logits (B, 1008))."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 outputs, as the TF graph

    def forward(self, x):
        x = 2 * resize_to_299(x) - 1                                   # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                   # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                   # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                 # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                               # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                 # (B, 2048, 8, 8)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)                 # (B, 2048) pool3
        logits = F.linear(features, self.fc.weight)  # no bias: see the module docstring
        return features, logits


def random_weights(seed=0):
    """Random weights in the layout of the real file, for tests and timing. He-normal convs and
    non-trivial BatchNorm statistics keep activations O(1) through all 94 layers."""
    g = torch.Generator().manual_seed(seed)
    state = InceptionFID().state_dict()
    for name, t in state.items():
        if name.endswith('conv.weight'):
            t.normal_(0, (2 / t[0].numel()) ** 0.5, generator=g)
        elif name.endswith(('bn.weight', 'running_var')):
            t.uniform_(0.5, 1.5, generator=g)
        elif name.endswith(('bn.bias', 'running_mean')):
            t.normal_(0, 0.1, generator=g)
        elif name.startswith('fc.'):
            t.normal_(0, 2048 ** -0.5, generator=g)
    return state


def load_inception(weights=None, device='cpu'):
    """InceptionFID in eval mode; weights: None (download once to the hub cache), path or dict."""
    if weights is None:
        try:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location='cpu',
                                                       progress=True, check_hash=True)
        except Exception as e:  # offline, proxy, bad hash: all end the same way
            raise FIDError(f'could not download the FID Inception weights ({_one_line(e)}); '
                           f'fetch {FID_WEIGHTS_URL} elsewhere and pass --weights PATH') from None
    elif isinstance(weights, (str, os.PathLike)):
        try:
            state = torch.load(weights, map_location='cpu', weights_only=True)
        except Exception as e:  # missing, truncated, not a state dict
            raise FIDError(f'cannot read weights {weights}: {_one_line(e)}') from None
    else:
        state = weights
    model = InceptionFID()
    try:
        model.load_state_dict(state)  # strict: the keys and shapes of pytorch-fid's file
    except Exception as e:
        raise FIDError(f'not the FID Inception weights: {_one_line(e)}') from None
    model = model.eval().requires_grad_(False).to(device)
    if model.fc.weight.device.type == 'cpu':
        # oneDNN's NHWC kernels: 1.1-2x faster on CPU in our measurements (torch 2.13, 2.14),
        # features equal to fp32 rounding (~1e-6 relative). Unmeasured on CUDA: NCHW there.
        model = model.to(memory_format=torch.channels_last)
    return model


def _one_line(e):
    text = f'{type(e).__name__}: {" ".join(str(e).split())}'
    return text if len(text) <= 240 else text[:237] + '...'


# -- Features -> statistics -> Fréchet distance, Inception Score ----------------------------------
@contextlib.contextmanager
def _full_fp32():
    """Turn TF32 off for the block (it changes the numbers), then restore the caller's choice."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(cudnn, 'conv'):  # torch >= 2.9, where mixing the old and new flags raises
        flags, name, off = (cudnn.conv, matmul), 'fp32_precision', 'ieee'
    else:
        flags, name, off = (cudnn, matmul), 'allow_tf32', False
    saved = [getattr(f, name) for f in flags]
    for f in flags:
        setattr(f, name, off)
    try:
        yield
    finally:
        for f, value in zip(flags, saved):
            setattr(f, name, value)


@torch.no_grad()  # not inference_mode: under it, torch-xla fails on views of normal tensors
def get_activations(images, model, num_images=None, progress=False):
    """Pool3 features (N, 2048) and logits (N, 1008), float64 numpy, of all batches.

    images: iterable of (B, 3, H, W) tensors, uint8 or float in [0, 1], on any device.
    """
    device = next(model.parameters()).device
    features, logits, done = [], [], 0
    start = last = time.monotonic()
    # fp32 throughout: no TF32, and no autocast from a caller's training step.
    with _full_fp32(), torch.autocast(device.type, enabled=False):
        for x in images:
            if isinstance(x, str):  # a loader worker's error message (see _read_batch)
                raise FIDError(x)
            f, l = model(x.to(device, non_blocking=True))
            features.append(f)  # kept on the device: no host sync per batch
            logits.append(l)
            done += len(x)
            if progress and time.monotonic() - last > 1:
                last = time.monotonic()
                print(f'\r{done}/{num_images or "?"} images', end='', file=sys.stderr, flush=True)
    if last > start:  # progress was shown
        print(f'\r{done}/{num_images or "?"} images', file=sys.stderr)
    if not features:
        raise FIDError('no images')
    # joined on the CPU: on XLA a join on the device would compile a program per batch count
    return (torch.cat([f.cpu() for f in features]).double().numpy(),
            torch.cat([l.cpu() for l in logits]).double().numpy())


def feature_statistics(features):
    """(N, D) features -> mean (D,) and covariance (D, D) with N-1, in float64."""
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    if n < 2:
        raise FIDError(f'need at least 2 images for a covariance, got {n}')
    if n <= d:
        warnings.warn(f'{n} samples for {d} features: the covariance is singular and the FID '
                      'biased; papers use 50,000 samples')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def compute_statistics(images, model, return_logits=False, num_images=None, progress=False):
    """mu (2048,), sigma (2048, 2048) float64 of an iterable of image batches (+ logits)."""
    features, logits = get_activations(images, model, num_images, progress)
    mu, sigma = feature_statistics(features)
    return (mu, sigma, logits) if return_logits else (mu, sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), as pytorch-fid."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(float), np.atleast_2d(sigma2).astype(float)
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f'statistics of different dimensions: mean {mu1.shape}, covariance '
                       f'{sigma1.shape} vs mean {mu2.shape}, covariance {sigma2.shape}')
    with warnings.catch_warnings():  # scipy warns on a singular product; handled below
        warnings.simplefilter('ignore', linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f'singular product of covariances; adding {eps} to their diagonals')
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Rounding can leave a small imaginary part; a large one means broken statistics.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f'sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}')
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` parts -> (mean, std), as improved-gan."""
    logits = np.asarray(logits, dtype=np.float64)
    n = len(logits)
    if n < splits:
        raise FIDError(f'the Inception Score over {splits} splits needs at least {splits} images')
    log_p = log_softmax(logits, axis=1)  # (N, 1008); log-space keeps p log p finite at p = 0
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]  # the reference code's slicing
        log_py = np.log(np.exp(part).mean(axis=0))
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# -- Inputs: image folders and .npz files ---------------------------------------------------------
def _read_batch(files):
    """In a loader worker: image files -> one (B, 3, H, W) batch, or an error message (a
    worker's exception would reach the user wrapped in a traceback)."""
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                images.append(torch.from_numpy(np.array(im.convert('RGB'))).permute(2, 0, 1))
        except Exception as e:  # PIL raises several types for bad files
            return f'cannot read image {path}: {_one_line(e)}'
    if any(im.shape != images[0].shape for im in images):  # sizes differ: resize each first
        return torch.cat([resize_to_299(im[None]) for im in images])  # (B, 3, 299, 299) float
    return torch.stack(images)  # (B, 3, H, W) uint8, made float on the device


def _npz_batches(x, batch_size):
    """(N, H, W, 3) uint8 array -> (B, 3, H, W) uint8 tensors."""
    for i in range(0, len(x), batch_size):
        yield torch.from_numpy(x[i:i + batch_size]).permute(0, 3, 1, 2)


def load_input(path, get_model, args):
    """(mu, sigma, logits or None) of an image folder, an .npz of images, or an .npz of stats."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FIDError(f'no images ({" ".join(sorted(IMAGE_EXTENSIONS))}) in {path}')
        batches = torch.utils.data.DataLoader(  # the list of paths is the data set
            files, batch_size=args.batch_size, num_workers=args.num_workers,
            collate_fn=_read_batch, pin_memory=args.device.startswith('cuda'))
        n = len(files)
    elif path.suffix.lower() == '.npz':
        try:
            with np.load(path) as f:
                keys = f.files
                arrays = {k: f[k] for k in ('mu', 'sigma', 'x', 'arr_0') if k in keys}
        except Exception as e:
            raise FIDError(f'cannot read {path}: {_one_line(e)}') from None
        if 'mu' in arrays and 'sigma' in arrays:
            return arrays['mu'], arrays['sigma'], None
        x = arrays.get('x', arrays.get('arr_0'))
        if x is None:
            raise FIDError(f'{path} holds neither images (x or arr_0) nor statistics (mu and '
                           f'sigma), but: {", ".join(keys) or "nothing"}')
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise FIDError(f'{path}: expected uint8 images (N, H, W, 3), got {x.dtype} {x.shape}')
        batches, n = _npz_batches(x, args.batch_size), len(x)
    elif path.exists():
        raise FIDError(f'{path} is neither a folder of images nor an .npz file')
    else:
        raise FIDError(f'no such file or folder: {path}')
    return compute_statistics(batches, get_model(), return_logits=True, num_images=n,
                              progress=True)


# -- Command line ---------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(prog='fid.py', description=__doc__.split('\n\n')[0])
    p.add_argument('paths', nargs=2, metavar='PATH',
                   help='image folder, .npz of images (x or arr_0) or of statistics (mu, sigma)')
    p.add_argument('--save-stats', action='store_true', help='write stats of PATH 1 to PATH 2')
    p.add_argument('--is', dest='inception_score', action='store_true',
                   help='also print the Inception Score (10 splits) of the first PATH')
    p.add_argument('--weights', help='the weights file (default: download to the hub cache)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=50)
    p.add_argument('--num-workers', type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        p.error('--batch-size must be positive and --num-workers not negative')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f'--device {args.device}: CUDA is not available')
    # Loaded once, and only when an input holds images.
    get_model = functools.cache(lambda: load_inception(args.weights, args.device))
    with warnings.catch_warnings():
        # One line per warning, like the errors, instead of Python's file:line form.
        warnings.showwarning = lambda msg, *_, **__: print(f'fid.py: warning: {msg}',
                                                           file=sys.stderr)
        try:
            (a, b), is_ = args.paths, args.inception_score
            for path in [a] if args.save_stats else [a, b]:  # before minutes of work on a
                if not Path(path).exists():
                    raise FIDError(f'no such file or folder: {path}')
            mu1, sigma1, logits = load_input(a, get_model, args)
            if is_ and logits is None:
                raise FIDError(f'--is needs images, but {a} holds statistics')
            if is_:
                print('IS: {:.4f} ± {:.4f}'.format(*inception_score(logits)))
            if args.save_stats:
                try:
                    np.savez_compressed(b, mu=mu1, sigma=sigma1)  # the keys pytorch-fid reads
                except OSError as e:
                    raise FIDError(f'cannot write {b}: {_one_line(e)}') from None
                print(f'saved statistics of {len(mu1)} features to {b}')
            else:
                mu2, sigma2, _ = load_input(b, get_model, args)
                print(f'FID: {frechet_distance(mu1, sigma1, mu2, sigma2)}')
        except FIDError as e:
            print(f'fid.py: error: {e}', file=sys.stderr)
            return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""S3GAN: high-fidelity image generation with fewer labels, in one PyTorch file.

Lucic, Tschannen, Ritter, Zhai, Bachem, Gelly. "High-Fidelity Image Generation With Fewer
Labels", ICML 2019 (arXiv:1903.02271). Networks, losses and hyper-parameters follow the official
code, google/compare_gan (architectures/resnet_biggan.py, gans/s3gan.py), read line by line;
the label-inference stage, which that repository leaves out, follows the paper.

    python s3gan.py                                     # the demo: 32x32 shapes, ~9 min, CPU
    python s3gan.py train --data /imagenet/train --resolution 128 --method s3gan \
        --labeled-fraction 0.1 --precision bf16 --out runs/s3gan128           # one GPU
    torchrun --nproc_per_node=8 s3gan.py train ...      # many GPUs (--batch-size is global)
    PJRT_DEVICE=TPU python s3gan.py train --device xla ...   # every core of a TPU host (SPMD)
    python s3gan.py sample --out runs/s3gan128 --num 50000 --to samples.npz
    python fid.py samples.npz imagenet_val_stats.npz

Paper -> code:
    Sec. 3.1 label inference (S2GAN, CLUSTERING) infer_labels, kmeans, select_labeled
    Sec. 3.2 co-training (S2GAN-CO) ........ Discriminator.classifier, mix_labels, class_loss
    Sec. 3.3 self-supervision (S3GAN) ...... rotate_batch, Discriminator.rotation, rotation_loss
    Sec. 4 BigGAN backbone ................. Generator, GBlock, Discriminator, DBlock
    Sec. 4 training (2 D steps, EMA, Adam) . train_step, ema_update, train
    Sec. 4 evaluation (standing stats, FID)  standing_statistics, sample, fid.py

Deviations (each marked "NOTE (deviation)" where it happens): the G step feeds only fakes to D
(compare_gan also feeds reals and discards their logits: same math); below 128x128 the label
stage uses a small ResNet, not ResNet-50; the class loss averages over every process's labeled
images, not per core; D pools before the shortcut's 1x1 conv and inside conv2 (one stride-2
conv): the same maps. Parameter counts equal compare_gan's (128x128, ch 96, 1000 classes:
G 70,433,988, D 87,988,518 for S3GAN; the tests check them all).
"""

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

# --- Config: every hyper-parameter, the paper's defaults (ImageNet 128x128), their sources ------

METHODS = ('biggan', 'single-label', 'random-label', 'clustering', 'clustering-ss',
           's2gan', 's3gan', 's2gan-co', 's3gan-co')
# Per-resolution architecture (compare_gan architectures/resnet_biggan.py): G and D channel
# multipliers, the block after which self-attention sits (1-based, 0 = none) and z size.
ARCH = {
    # at 32 the class defaults hold: D's "B1" exists, G's "B4" does not (G has 3 blocks)
    32: dict(g_mult=(4, 4, 4, 4), d_mult=(2, 2, 2, 2), g_attn=0, d_attn=1, z_dim=128),
    64: dict(g_mult=(16, 16, 8, 4, 2), d_mult=(2, 4, 8, 16, 16), g_attn=4, d_attn=1, z_dim=120),
    128: dict(g_mult=(16, 16, 8, 4, 2, 1), d_mult=(1, 2, 4, 8, 16, 16), g_attn=4, d_attn=1,
              z_dim=120),
    256: dict(g_mult=(16, 16, 8, 8, 4, 2, 1), d_mult=(1, 2, 4, 8, 8, 16, 16), g_attn=5, d_attn=2,
              z_dim=140),
    512: dict(g_mult=(16, 16, 8, 8, 4, 2, 1, 1), d_mult=(1, 1, 2, 4, 8, 8, 16, 16), g_attn=4,
              d_attn=3, z_dim=160),
}


@dataclass
class Config:
    # what to train
    method: str = 's3gan'              # the variant: biggan, s3gan, s2gan-co, ... (METHODS)
    data: str = 'shapes'               # 'shapes' (embedded), a folder of class subfolders, an .npz
    num_images: int = 10000            # size of the embedded 'shapes' set (ours)
    labeled_fraction: float = 0.1      # fraction of labeled images; paper Sec. 4: 5, 10, 20%
    labels: str = ''                   # labels made elsewhere (.npz as labels.npz): no label stage
    out: str = 'runs/s3gan'            # run folder: config, labels, checkpoints, samples, log
    # architecture (compare_gan architectures/resnet_biggan.py)
    resolution: int = 128              # image side in pixels; biggan_imagenet128.gin: 128
    ch: int = 96                       # width unit of G and D (resnet_biggan ch=96)
    num_classes: int = 0               # classes; 0: from the data (ImageNet: 1000)
    z_dim: int = 0                     # size of z; 0: per resolution (120 at 128)
    g_mult: tuple = ()                 # G channel multipliers of ch; (): per resolution
    d_mult: tuple = ()                 # D channel multipliers of ch; (): per resolution
    g_attn: int = -1                   # G block followed by attention (0: none; -1: per res.)
    d_attn: int = -1                   # D block followed by attention (0: none; -1: per res.)
    embed_dim: int = 128               # size of G's shared class embedding (embed_y)
    bn_eps: float = 1e-5               # batch-norm epsilon (the gin file; arch_ops' default 1e-3)
    # losses and heads (compare_gan gans/s3gan.py)
    rotated_batch_fraction: int = 2    # f: bs/(4f) images rotated 3 ways (gin.REQUIRED; test: 2)
    weight_rotation_loss_d: float = 1.0  # weight of D's rotation loss on reals
    weight_rotation_loss_g: float = 0.2  # weight of G's rotation loss on fakes
    weight_class_loss: float = 1.0     # weight of D's classifier loss (co-training methods)
    # optimisation (compare_gan example_configs/biggan_imagenet128.gin)
    batch_size: int = 2048             # global images per D or G sub-step (options.batch_size)
    steps: int = 250000                # G steps to train (options.training_steps)
    disc_iters: int = 2                # D steps per G step, each on fresh data (options.disc_iters)
    lr_g: float = 1e-4                 # generator Adam learning rate
    lr_d: float = 5e-4                 # discriminator Adam learning rate
    beta1: float = 0.0                 # Adam beta1
    beta2: float = 0.999               # Adam beta2
    adam_eps: float = 1e-8             # Adam epsilon (TF default)
    ema_decay: float = 0.9999          # decay of G's weight average G_ema (ModularGAN.ema_decay)
    ema_start: int = 40000             # G step where averaging starts (ModularGAN.ema_start_step)
    # label inference (paper Sec. 3.1; ours: compare_gan only reads label files)
    pretrain_steps: int = 0            # label-stage SGD steps; 0: per resolution
    pretrain_batch_size: int = 0       # label-stage batch, rotated copies; 0: per resolution
    pretrain_lr: float = 0.0           # label-stage SGD learning rate; 0: per resolution
    clusters: int = 0                  # k-means K for the clustering methods; 0: num_classes
    encoder: str = ''                  # a bigbigan.py run whose E gives the features; '': rotation
    # run
    device: str = 'auto'               # auto|cpu|cuda|xla (auto: cuda, else a TPU, else cpu)
    precision: str = 'fp32'            # fp32|bf16 (bf16 autocast on CUDA and XLA)
    compile: bool = False              # torch.compile G's and D's forward: same math, GPU x2.3
    channels_last: bool = False        # G's and D's convolutions in NHWC memory layout
    seed: int = 0                      # seeds weights, data order, z, labeled subset
    num_workers: int = -1              # data-loader processes; -1: auto (loader_workers)
    log_every: int = 100               # G steps between log lines
    sample_every: int = 1000           # G steps between sample grids
    ckpt_every: int = 1000             # G steps between checkpoints (ckpt.pt, overwritten)
    snapshot_every: int = 10000        # G steps between kept G_ema + D weights (snapshots/)
    fid_stats: str = ''                # reference statistics (.npz) for FID during training
    fid_every: int = 10000             # G steps between FID evaluations
    fid_samples: int = 10000           # samples per FID evaluation (paper: 50k)
    standing_batches: int = 3200       # batches of 64, standing stats (eval_gan_lib: 204,800)
    grid_standing_batches: int = 100   # the same for the training-time grid (ours: fewer, cheap)
    skip_bad_images: bool = False      # skip unreadable images with a warning, not stop

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f'--method: unknown method {self.method!r}; choose from '
                             f'{", ".join(METHODS)}')
        if self.resolution not in ARCH:
            raise ValueError(f'--resolution: {self.resolution} is not supported; choose from '
                             f'{", ".join(map(str, ARCH))}')
        if not 0.0 < self.labeled_fraction <= 1.0:
            raise ValueError(f'--labeled-fraction must be in (0, 1], got {self.labeled_fraction}')
        arch = ARCH[self.resolution]
        self.z_dim = self.z_dim or arch['z_dim']
        self.g_mult = tuple(self.g_mult) or arch['g_mult']
        self.d_mult = tuple(self.d_mult) or arch['d_mult']
        self.g_attn = arch['g_attn'] if self.g_attn < 0 else self.g_attn
        self.d_attn = arch['d_attn'] if self.d_attn < 0 else self.d_attn
        if self.z_dim % len(self.g_mult):
            raise ValueError(f'--z-dim {self.z_dim} must split into {len(self.g_mult)} equal '
                             f'chunks (hierarchical z at resolution {self.resolution})')


# --- Layers: spectral norm, batch standardisation, conditional BN, attention ----------------------

def spectral_normalize(W: torch.Tensor, u: torch.Tensor, update: bool, eps: float = 1e-12,
                       sigma_out: Optional[torch.Tensor] = None):
    """W / sigma(W), sigma from one power iteration on the persistent u (arch_ops.spectral_norm).

    compare_gan reads the kernel as w (in*kh*kw, out) and, with the gin's singular_value="auto",
    keeps u on w's smaller side; M is w or w^T so that u lives on M's rows. sigma = u . (M v) as a
    sum of a product (torch.vdot has no XLA lowering); also copied into `sigma_out` for the log.
    """
    M = W.flatten(1)                                               # (out, in*kh*kw) = w^T
    if M.shape[1] <= M.shape[0]:
        M = M.t()                                                  # u on the input side
    with torch.autocast(W.device.type, enabled=False):             # sigma in float32 under bf16
        with torch.no_grad():
            v = F.normalize(M.t() @ u, dim=0, eps=eps)
            u_new = F.normalize(M @ v, dim=0, eps=eps)
            if update:
                u.copy_(u_new)
        sigma = (u_new * (M @ v)).sum()
    if sigma_out is not None:
        sigma_out.copy_(sigma.detach())
    return W / sigma


class SNConv2d(nn.Conv2d):
    """A 'same'-padded conv whose kernel is spectrally normalised on every forward pass."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, bias: bool = True):
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)
        self.register_buffer('u', torch.randn(min(out_ch, in_ch * kernel_size ** 2)))  # 'auto'
        self.register_buffer('sigma_w', torch.zeros(()), persistent=False)   # for the log

    def forward(self, x):
        W = spectral_normalize(self.weight, self.u, self.training, sigma_out=self.sigma_w)
        return self._conv_forward(x, W, self.bias)


class SNLinear(nn.Linear):
    """A linear map whose weight is spectrally normalised on every forward pass."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer('u', torch.randn(min(out_features, in_features)))  # 'auto'
        self.register_buffer('sigma_w', torch.zeros(()), persistent=False)

    def normalized_weight(self):
        return spectral_normalize(self.weight, self.u, self.training, sigma_out=self.sigma_w)

    def forward(self, x):
        return F.linear(x, self.normalized_weight(), self.bias)


def all_processes_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the processes of a torchrun job, differentiably (t itself in one process)."""
    from torch.distributed.nn.functional import all_reduce   # nn.SyncBatchNorm refuses CPU
    many = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return all_reduce(t) if many else t


class BatchStandardize(nn.Module):
    """(x - E[x]) / sqrt(Var[x] + eps) over (N, H, W) of the *global* batch, biased moments in
    float32 as compare_gan's arch_ops.standardize_batch (in bf16, E[x^2] - E[x]^2 cancels where
    |mean| >> std). Under torchrun the moments are all-reduced (all_processes_sum); under XLA
    SPMD the program sees the global batch. No running averages:
    eval mode uses the standing statistics (arch_ops._accumulated_moments_for_inference)."""

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.accumulate = False   # set by standing_statistics()
        self.register_buffer('accu_mean', torch.zeros(num_features))   # sums of batch moments
        self.register_buffer('accu_var', torch.ones(num_features))
        self.register_buffer('accu_count', torch.ones(()))

    def forward(self, x):                                          # (B, C, H, W)
        x32 = x.float()
        train = self.training and not self.accumulate
        if train and not (torch.distributed.is_initialized()
                          and torch.distributed.get_world_size() > 1):
            # one process: the same moments from one fused kernel (and backward): 3x faster
            return F.batch_norm(x32, None, None, training=True, eps=self.eps).to(x.dtype)
        if self.training or self.accumulate:
            moments = torch.stack([x32.mean((0, 2, 3)), x32.square().mean((0, 2, 3))])  # (2, C)
            if train:   # many processes: moments of the global batch
                moments = all_processes_sum(moments) / torch.distributed.get_world_size()
            mean, var = moments[0], moments[1] - moments[0].square()
        if self.accumulate:   # add this batch, then normalise with the averages so far
            self.accu_mean += mean
            self.accu_var += var
            self.accu_count += 1
        if self.accumulate or not self.training:
            mean, var = self.accu_mean / self.accu_count, self.accu_var / self.accu_count
        return ((x32 - mean[:, None, None]) * (var[:, None, None] + self.eps).rsqrt()).to(x.dtype)


class ConditionalBatchNorm(nn.Module):
    """x_hat * gamma(c) + beta(c), gamma and beta bias-free SN linear maps of c (compare_gan
    arch_ops.conditional_batch_norm: no "+1" on the gain, unlike BigGAN-PyTorch's 1 + gamma(c);
    the gains start small and random)."""

    def __init__(self, num_features: int, cond_dim: int, eps: float):
        super().__init__()
        self.standardize = BatchStandardize(num_features, eps)
        self.gamma = SNLinear(cond_dim, num_features, bias=False)
        self.beta = SNLinear(cond_dim, num_features, bias=False)

    def forward(self, x, c):                                       # x (B, C, H, W), c (B, d)
        return (self.standardize(x) * self.gamma(c)[:, :, None, None]
                + self.beta(c)[:, :, None, None])


class BatchNorm(nn.Module):
    """Unconditional batch norm with learned gamma (init 1) and beta (init 0): G's last BN."""

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.standardize = BatchStandardize(num_features, eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        return self.standardize(x) * self.weight[:, None, None] + self.bias[:, None, None]


class SelfAttention(nn.Module):
    """SAGAN non-local block (compare_gan non_local_block): x + sigma * o(softmax(th phi^T) g)."""

    def __init__(self, ch: int):
        super().__init__()
        self.theta = SNConv2d(ch, ch // 8, 1, bias=False)
        self.phi = SNConv2d(ch, ch // 8, 1, bias=False)
        self.g = SNConv2d(ch, ch // 2, 1, bias=False)
        self.o = SNConv2d(ch // 2, ch, 1, bias=False)
        self.sigma = nn.Parameter(torch.zeros(()))                # the gain starts at 0

    def forward(self, x):                                          # (B, C, H, W)
        B, C, H, W = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)               # (B, HW, C/8)
        k = F.max_pool2d(self.phi(x), 2).flatten(2).transpose(1, 2)  # (B, HW/4, C/8)
        v = F.max_pool2d(self.g(x), 2).flatten(2).transpose(1, 2)    # (B, HW/4, C/2)
        # softmax(q k^T) v, unscaled as in SAGAN (hence scale=1)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0)
        o = o[:, 0].transpose(1, 2).reshape(B, C // 2, H, W)
        return x + self.sigma * self.o(o)


# --- Generator (compare_gan architectures/resnet_biggan.py, Generator) ----------------------------

def conv_unpooled(conv: SNConv2d, x):
    """conv(unpool(x)): compare_gan's upsampling, resnet_ops.unpool (zero insertion: out[2i, 2j]
    = x[i, j], the other 3 pixels 0) then a 'same' conv, is exactly a stride-2 transposed conv
    with the flipped kernel: the same function without the 3/4 of multiplications that are by
    zero (4x fewer FLOPs; test_conv_unpooled_equals_unpool_then_conv checks it)."""
    W = spectral_normalize(conv.weight, conv.u, conv.training, sigma_out=conv.sigma_w)
    return F.conv_transpose2d(x, W.flip(2, 3).transpose(0, 1), conv.bias, stride=2,
                              padding=W.shape[-1] // 2, output_padding=1)


class GBlock(nn.Module):
    """CBN -> ReLU -> unpool -> conv3x3 -> CBN -> ReLU -> conv3x3, plus unpool -> conv1x1."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, eps: float):
        super().__init__()
        self.bn1 = ConditionalBatchNorm(in_ch, cond_dim, eps)
        self.conv1 = SNConv2d(in_ch, out_ch, 3)
        self.bn2 = ConditionalBatchNorm(out_ch, cond_dim, eps)
        self.conv2 = SNConv2d(out_ch, out_ch, 3)
        self.shortcut = SNConv2d(in_ch, out_ch, 1)

    def forward(self, x, c):                                       # (B, a, H, W) -> (B, b, 2H, 2W)
        h = conv_unpooled(self.conv1, F.relu(self.bn1(x, c)))     # = conv1(unpool(relu(bn1)))
        h = self.conv2(F.relu(self.bn2(h, c)))
        return h + conv_unpooled(self.shortcut, x)                 # = shortcut(unpool(x))


class Generator(nn.Module):
    """G(z, y) in [0, 1]: hierarchical z, shared class embedding, BigGAN blocks from 4x4."""

    def __init__(self, z_dim: int, num_classes: int, ch: int, mult: tuple, attn_block: int,
                 embed_dim: int = 128, eps: float = 1e-5):
        super().__init__()
        self.num_chunks = len(mult)                                # 1 for the seed + 1 per block
        self.chunk = z_dim // self.num_chunks                      # 20 at 128x128
        self.seed_ch = mult[0] * ch
        cond_dim = self.chunk + embed_dim                          # 148 at 128x128
        self.embed_y = nn.Embedding(num_classes, embed_dim)       # shared, no SN, no bias
        self.fc_noise = SNLinear(self.chunk, 4 * 4 * self.seed_ch)
        self.blocks = nn.ModuleList(GBlock(mult[i] * ch, mult[i + 1] * ch, cond_dim, eps)
                                    for i in range(len(mult) - 1))
        self.attn_block = attn_block
        self.attn = SelfAttention(mult[attn_block] * ch) if attn_block else None
        self.bn_out = BatchNorm(mult[-1] * ch, eps)
        self.conv_out = SNConv2d(mult[-1] * ch, 3, 3)

    def forward(self, z, y):                                       # z (B, z_dim), y (B,) int
        zs = z.split(self.chunk, dim=1)
        e = self.embed_y(y)                                        # (B, embed_dim)
        h = self.fc_noise(zs[0]).view(-1, self.seed_ch, 4, 4)      # (B, 16ch, 4, 4)
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, torch.cat([zs[i], e], dim=1))
            if i == self.attn_block:
                h = self.attn(h)
        h = self.conv_out(F.relu(self.bn_out(h)))                  # (B, 3, R, R)
        return (torch.tanh(h) + 1) / 2                             # in [0, 1]


# --- Discriminator with projection, rotation and classifier heads (resnet_biggan.py, s3gan.py) ----

def conv_pooled(conv: SNConv2d, x):
    """avgpool2x2(conv3x3(x)), D's downsampling (resnet_ops: conv, then avg_pool), as one stride-2
    conv whose 4x4 kernel is the 2x2 average of the zero-padded 3x3 one: the same linear map with
    16/36 of the multiplications, no pooling pass (test_conv_pooled_equals_conv_then_avg_pool)."""
    W = spectral_normalize(conv.weight, conv.u, conv.training, sigma_out=conv.sigma_w)
    W = F.avg_pool2d(F.pad(W, (1, 1, 1, 1)), 2, stride=1)         # (b, a, 4, 4)
    return F.conv2d(x, W, conv.bias, stride=2, padding=1)


class DBlock(nn.Module):
    """ReLU -> conv3x3 -> ReLU -> conv3x3 -> avgpool; a 1x1 shortcut only if the width changes:
    with equal widths no skip connection at all (resnet_biggan.BigGanResNetBlock: add_shortcut =
    in_channels != out_channels). The shortcut pools before its 1x1 conv; conv2 via conv_pooled."""

    def __init__(self, in_ch: int, out_ch: int, down: bool):
        super().__init__()
        self.conv1 = SNConv2d(in_ch, out_ch, 3)
        self.conv2 = SNConv2d(out_ch, out_ch, 3)
        self.shortcut = SNConv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.down = down

    def forward(self, x):                                 # (B, a, H, W) -> (B, b, H/2, W/2)
        h = F.relu(self.conv1(F.relu(x)))
        h = conv_pooled(self.conv2, h) if self.down else self.conv2(h)
        if self.shortcut is None:
            return h
        return h + self.shortcut(F.avg_pool2d(x, 2) if self.down else x)


class DOutput(NamedTuple):
    logits: torch.Tensor                 # (B,) D(x, y) = w.h + b + <E y, h>
    rot_logits: Optional[torch.Tensor]   # (B, 4) rotation head, or None
    cls_logits: Optional[torch.Tensor]   # (B, K) classifier head, or None
    y_used: torch.Tensor                 # (B,) the labels the projection saw


class Discriminator(nn.Module):
    """D(x, y): ResNet trunk, sum-pooled features h, one projection, optional heads."""

    def __init__(self, num_classes: int, ch: int, mult: tuple, attn_block: int,
                 rotation_head: bool, classifier_head: bool):
        super().__init__()
        widths = [3] + [m * ch for m in mult]
        self.blocks = nn.ModuleList(DBlock(widths[i], widths[i + 1], down=i < len(mult) - 1)
                                    for i in range(len(mult)))
        self.attn_block = attn_block
        self.attn = SelfAttention(widths[attn_block]) if attn_block else None
        self.final_fc = SNLinear(widths[-1], 1)
        self.embed_y = SNLinear(num_classes, widths[-1], bias=False)   # E, the projection
        self.rotation = SNLinear(widths[-1], 4) if rotation_head else None
        self.classifier = SNLinear(widths[-1], num_classes) if classifier_head else None

    def features(self, x):                               # (B, 3, R, R) -> h (B, C), sum-pooled
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i == self.attn_block:
                x = self.attn(x)
        return F.relu(x).sum((2, 3))

    def forward(self, x, y):                                       # x (B, 3, R, R), y (B,) int
        h = self.features(x)                                       # (B, C)
        rot_logits = self.rotation(h) if self.rotation is not None else None
        cls_logits = self.classifier(h) if self.classifier is not None else None
        y_used = mix_labels(y, cls_logits) if cls_logits is not None else y
        E_y = F.embedding(y_used, self.embed_y.normalized_weight().t())   # (B, C)
        logits = self.final_fc(h).squeeze(1) + (E_y * h).sum(1)
        return DOutput(logits, rot_logits, cls_logits, y_used)


def init_weights(module: nn.Module):
    """Orthogonal kernels, zero biases, glorot-normal projection (compare_gan
    weights.initializer='orthogonal'; S3GAN's projection uses glorot_normal)."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            nn.init.orthogonal_(m.weight)
            if getattr(m, 'bias', None) is not None:
                nn.init.zeros_(m.bias)
    if isinstance(module, Discriminator):
        # glorot_normal in TF1 is a normal truncated at 2 std, rescaled to keep the variance
        fan_out, fan_in = module.embed_y.weight.shape
        std = math.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978
        nn.init.trunc_normal_(module.embed_y.weight, std=std, a=-2 * std, b=2 * std)


def label_classes(cfg: Config) -> int:
    """How many classes G and D are built for: one for single-label, K clusters for clustering."""
    if cfg.method.startswith('clustering'):
        return cfg.clusters or cfg.num_classes
    return 1 if cfg.method == 'single-label' else cfg.num_classes


def uses_rotation(method: str) -> bool:
    return method in ('clustering-ss', 's3gan', 's3gan-co')


def uses_classifier(method: str) -> bool:
    return method.endswith('-co')


def build_models(cfg: Config):
    """The one public way to get (G, D) for a Config, initialised as the paper's code does."""
    K = label_classes(cfg)
    G = Generator(cfg.z_dim, K, cfg.ch, cfg.g_mult, cfg.g_attn, cfg.embed_dim, cfg.bn_eps)
    D = Discriminator(K, cfg.ch, cfg.d_mult, cfg.d_attn, rotation_head=uses_rotation(cfg.method),
                      classifier_head=uses_classifier(cfg.method))
    init_weights(G)
    init_weights(D)
    return G, D


# --- Losses and the S3GAN batch layout (compare_gan gans/s3gan.py, gans/loss_lib.py hinge) --------

NUM_ROTATIONS = 4


def hinge_loss_d(d_real, d_fake):
    """L_D^GAN = E[relu(1 - D(x, y))] + E[relu(1 + D(G(z, y_hat), y_hat))]."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def hinge_loss_g(d_fake):
    """L_G^GAN = -E[D(G(z, y_hat), y_hat)]."""
    return -d_fake.mean()


def rotation_loss(rot_logits, rot_labels):
    """CE_rot = -E[log(softmax(r(x))_k + 1e-10)], the 1e-10 inside the log as in compare_gan."""
    log_p = torch.log(F.softmax(rot_logits.float(), dim=1) + 1e-10)
    return -log_p.gather(1, rot_labels[:, None]).mean()


def class_loss(cls_logits, y):
    """CE_cls over the labeled rows only (y >= 0), averaged over them; 0 when none is labeled:
    sum(w_i CE_i) / #(w_i != 0), w_i = has_label, both sums over every process (all-reduced).
    NOTE (deviation): compare_gan's tf.losses.softmax_cross_entropy(weights=is_label_available)
    takes that mean per TPU core (its 16 images), CrossShardOptimizer the mean over the cores: a
    core without a labeled image adds 0, so at 10% labels its loss weighs 1 - 0.9^16 = 0.81 of
    ours, and depends on the number of cores; ours not on the number of processes."""
    has_label = (y >= 0).float()
    ce = F.cross_entropy(cls_logits.float(), y.clamp(min=0), reduction='none')
    total = all_processes_sum(torch.stack([(ce * has_label).sum(), has_label.sum()]))
    return total[0] / total[1].clamp(min=1)


def mix_labels(y, cls_logits):
    """y_used = y where the label is known, else argmax of the classifier head
    (paper Sec. 3.2; compare_gan S3GAN.discriminator_with_additonal_heads, use_predictor).

    Example: y = [3, -1, 0, -1], argmax cls_logits = [1, 2, 2, 5] -> y_used = [3, 2, 0, 5].
    The argmax is an integer, so no gradient flows from the projection into the classifier
    (compare_gan's stop_gradient on the one-hot prediction).
    """
    return torch.where(y >= 0, y, cls_logits.argmax(dim=1))


def rotate_batch(x, y, n: int):
    """Append the last n images rotated by 90, 180 and 270 degrees
    (compare_gan S3GAN.create_loss, rotated_batch_fraction).

    Returns x_all (B + 3n, ...), y_all (labels tiled from the sources) and rot_labels (4n,),
    the targets for the last 4n rows of x_all: the n unrotated sources then the three copies.
    Worked example, B = 4, n = 1, images [a, b, c, d]:
        x_all      = [a, b, c, d, rot90(d), rot180(d), rot270(d)]
        rot_labels =          [0,        1,         2,          3]   (rows 3..6)
    With n = 2: rot_labels = [0, 0, 1, 1, 2, 2, 3, 3]. Rotation k is np.rot90(x, k) over
    (H, W), counter-clockwise, which is torch.rot90(x, k, (2, 3)) in NCHW.
    """
    if n == 0:
        return x, y, None
    src = x[-n:]
    x_all = torch.cat([x] + [torch.rot90(src, k, (2, 3)) for k in range(1, NUM_ROTATIONS)])
    y_all = torch.cat([y] + [y[-n:]] * (NUM_ROTATIONS - 1))
    rot_labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(n)
    return x_all, y_all, rot_labels


# --- Data: item i = (image (3, R, R) float32 in [0, 1], label or -1) ------------------------------

def _arc(cx, cy, r, a0, a1, n=12, ry=None):   # points of an arc, angles in degrees
    t = np.radians(np.linspace(a0, a1, n))
    return list(zip(cx + r * np.cos(t), cy + (ry or r) * np.sin(t)))


def _box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# The 10 classes of the embedded set, as polygons in [-1, 1]^2 with y pointing up. Each has a
# canonical "up" and none is a 90/180/270 degree rotation of another, so predicting the rotation
# of an image requires recognising its shape: that is what makes the rotation features useful.
SHAPES = {
    'triangle': [[(-1, -.9), (1, -.9), (0, .9)]],
    'house': [_box(-.7, -1, .7, .1), [(-1, .1), (1, .1), (0, 1)]],
    'T': [_box(-1, .55, 1, 1), _box(-.22, -1, .22, .55)],
    'arrow': [[(-.9, .1), (.9, .1), (0, 1)], _box(-.3, -1, .3, .1)],
    'mushroom': [_arc(0, -.1, 1, 0, 180), _box(-.25, -1, .25, -.1)],
    'boat': [[(-1, -.35), (1, -.35), (.6, -1), (-.6, -1)], [(-.25, -.2), (-.25, 1), (.9, -.2)]],
    'fish': [_arc(.2, 0, .8, 0, 360, 20, ry=.55), [(-1, -.55), (-1, .55), (-.4, 0)]],
    'stairs': [[(-1, -1), (1, -1), (1, 1), (.33, 1), (.33, .33), (-.33, .33), (-.33, -.33),
                (-1, -.33)]],
    'table': [_box(-1, .6, 1, 1), _box(-.85, -1, -.5, .6), _box(.5, -1, .85, .6)],
    'crescent': [_arc(0, 0, 1, 58, 302, 20) + _arc(.45, 0, .85, 276, 84, 16)],  # opens right
}
SHAPE_POLYGONS = [[np.array(p, np.float32) for p in polys] for polys in SHAPES.values()]


def draw_shape(seed: int, index: int, resolution: int) -> np.ndarray:
    """Image `index` of the embedded set, uint8 (R, R, 3): a pure function of (seed, index).

    The class is index % 10. Colour, size, aspect, position and a small tilt (+-12 degrees, so
    "up" stays clear) are random; the colours are drawn independently of the class, so colour
    statistics say little about it (a test checks this)."""
    rng = np.random.default_rng((seed, index))
    u = rng.random(10)
    fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if abs(fg @ (.3, .59, .11) - bg @ (.3, .59, .11)) < 60:         # keep the shape visible
        fg = 255 - bg
    size = resolution * (.26 + .16 * u[0])                          # half-width in pixels
    sx, sy = size * (.85 + .3 * u[1]), size * (.85 + .3 * u[2])
    cx, cy = size + (resolution - 2 * size) * u[3], size + (resolution - 2 * size) * u[4]
    a = math.radians(24 * u[5] - 12)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]], np.float32)
    img = Image.new('RGB', (2 * resolution,) * 2, tuple(bg.tolist()))   # 2x, then shrink:
    draw = ImageDraw.Draw(img)                                          # cheap anti-aliasing
    for poly in SHAPE_POLYGONS[index % len(SHAPE_POLYGONS)]:
        xy = (poly * (sx, -sy)) @ rot + (cx, cy)                    # image rows grow downwards
        draw.polygon([tuple(p) for p in (xy * 2).tolist()], fill=tuple(fg.tolist()))
    x = np.asarray(img.reduce(2), dtype=np.int16) + rng.integers(-12, 13, (resolution,) * 2 + (3,))
    return np.clip(x, 0, 255).astype(np.uint8)                      # with mild sensor noise


def _to_tensor(x: np.ndarray) -> torch.Tensor:                      # (H, W, 3) uint8 -> (3, H, W)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float() / 255


class ShapesDataset(Dataset):
    """The embedded procedural set: 10 balanced classes drawn with PIL on demand."""

    def __init__(self, num_images: int, resolution: int, seed: int):
        self.resolution, self.seed, self.num_classes = resolution, seed, len(SHAPES)
        self.labels = np.arange(num_images, dtype=np.int64) % self.num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return _to_tensor(draw_shape(self.seed, i, self.resolution)), int(self.labels[i])


class BadImageError(ValueError):
    """An image file PIL cannot decode. A DataLoader worker re-raises it with the whole
    worker traceback as its message: keep our own last line, which names the file."""

    def __init__(self, message: str):
        super().__init__(message.strip().splitlines()[-1].partition('BadImageError: ')[2]
                         or message)


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


def random_square_crop(w: int, h: int, augment: bool, gen: Optional[torch.Generator] = None):
    """(left, top, right, bottom): a random square of 50-100% of the area, drawn as compare_gan's
    tf.image.sample_distorted_bounding_box(aspect_ratio_range=[1, 1], area_range=[0.5, 1]) does
    (TF's GenerateRandomCrop), or the middle square without `augment` (the eval transform).

    TF draws the integer side s uniformly in [round(sqrt(0.5 w h)), min(round(sqrt(w h)), w, h)]
    (the maximum clamped, not redrawn), nudges s by one where s^2 leaves the area range, and the
    corner uniformly in [0, w - s) x [0, h - s) (the last offset never drawn, as in TF). Where no
    square fits (aspect beyond 2:1) TF takes the whole image, which the resize squashes; so do we.
    """
    if not augment:
        s = min(w, h)
        return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s
    lo, hi = round(math.sqrt(0.5 * w * h)), min(round(math.sqrt(w * h)), w, h)
    s = min(lo, hi)
    s += int(torch.randint(hi - s + 1, (), generator=gen))
    if s * s < 0.5 * w * h:
        s += 1
    if s * s > w * h:
        s -= 1
    if not 0 < s <= min(w, h) or s * s < 0.5 * w * h:
        return 0, 0, w, h
    left, top = (int(torch.randint(max(1, n - s), (), generator=gen)) for n in (w, h))
    return left, top, left + s, top + s


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size) as TF1's tf.image.resize_images (bilinear, align_corners=False,
    no half-pixel centres, no antialiasing), which compare_gan applies to the float crop: output
    pixel i reads the input at i * in/out, between floor and floor + 1 (clamped to the edge).
    Channels last while it runs: x is a view of an (H, W, C) image here, read in its own order."""
    x = x.permute(1, 2, 0)                                          # (H, W, C)
    for dim in (0, 1):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float32) * (n / size)
        i0 = src.floor().long()
        frac = (src - i0).view([size if d == dim else 1 for d in range(3)])
        a, b = x.index_select(dim, i0), x.index_select(dim, (i0 + 1).clamp(max=n - 1))
        x = a + (b - a) * frac
    return x.permute(2, 0, 1)


def crop_and_resize(x: np.ndarray, resolution: int, augment: bool, seed: int, pos=None):
    """(H, W, 3) uint8 -> (3, R, R) in [0, 1]: random_square_crop (given a position in the stream
    of samples, drawn from (seed, position), not from worker state), then resize_tf1_bilinear of
    the float crop (cropped before the conversion to float: fewer pixels to convert)."""
    gen = None if pos is None else torch.Generator().manual_seed(
        int(np.random.SeedSequence((seed, pos)).generate_state(1, np.uint64)[0]))
    left, top, right, bottom = random_square_crop(x.shape[1], x.shape[0], augment, gen)
    return resize_tf1_bilinear(_to_tensor(x[top:bottom, left:right]), resolution)


class FolderDataset(Dataset):
    """One subfolder per class (ImageNet's layout); any size or mode; no flip (datasets.py)."""

    def __init__(self, root: str, resolution: int, augment: bool, skip_bad: bool, seed: int = 0):
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files, labels = [], []
        for y, c in enumerate(classes):
            for name in sorted(os.listdir(os.path.join(root, c))):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    self.files.append(os.path.join(root, c, name))
                    labels.append(y)
        if not self.files:
            raise ValueError(f'--data {root}: no images found in class subfolders')
        self.labels, self.num_classes = np.array(labels, np.int64), len(classes)
        self.resolution, self.augment, self.skip_bad = resolution, augment, skip_bad
        self.seed = seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):   # i, or (i, position in the stream: crop_and_resize)
        i, pos = i if isinstance(i, tuple) else (i, None)
        for j in range(i, i + len(self.files)):    # with skip_bad: the next readable file
            path = self.files[j % len(self.files)]
            try:
                with Image.open(path) as img:
                    img = img.convert('RGB')           # decodes fully: truncated files fail here
            except (OSError, SyntaxError, ValueError) as e:
                if not self.skip_bad:
                    raise BadImageError(f'cannot read image {path}: {e}') from None
                warnings.warn(f'skipping unreadable image {path}: {e}')
                continue
            x = crop_and_resize(np.array(img), self.resolution, self.augment, self.seed, pos)
            return x, int(self.labels[j % len(self.files)])
        raise BadImageError(f'--data: no readable image in {len(self.files)} files')


class NpzDataset(Dataset):
    """`x` uint8 (N, H, W, 3), optional `y` int (N,); other sizes are cropped as folder images."""

    def __init__(self, path: str, resolution: int, augment: bool, seed: int = 0):
        with np.load(path) as f:
            x, y = f['x'] if 'x' in f else None, f['y'].astype(np.int64) if 'y' in f else None
        if x is None or x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
            raise ValueError(f'--data {path}: expected an array x, uint8 (N, H, W, 3)')
        if y is not None and y.shape != (len(x),):
            raise ValueError(f'--data {path}: y has shape {y.shape}, expected ({len(x)},)')
        self.x = x                                                      # (N, H, W, 3) uint8
        self.labels = y if y is not None else np.full(len(x), -1, np.int64)
        self.num_classes = int(self.labels.max()) + 1 if y is not None else 0
        self.resolution, self.augment, self.seed = resolution, augment, seed

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):   # i, or (i, position) as FolderDataset
        i, pos = i if isinstance(i, tuple) else (i, None)
        x = self.x[i]
        if x.shape[:2] == (self.resolution, self.resolution):
            return _to_tensor(x), int(self.labels[i])
        x = crop_and_resize(x, self.resolution, self.augment, self.seed, pos)
        return x, int(self.labels[i])


def make_dataset(cfg: Config, augment: bool = True) -> Dataset:
    """The data set named by cfg.data; `augment=False`: central crops, not random ones."""
    if cfg.data == 'shapes':
        return ShapesDataset(cfg.num_images, cfg.resolution, cfg.seed)
    if os.path.isdir(cfg.data):
        return FolderDataset(cfg.data, cfg.resolution, augment, cfg.skip_bad_images, cfg.seed)
    if cfg.data.endswith('.npz') and os.path.isfile(cfg.data):
        return NpzDataset(cfg.data, cfg.resolution, augment, cfg.seed)
    raise ValueError(f'--data {cfg.data}: not "shapes", an image folder or an existing .npz file')


def select_labeled(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The labeled k%: round(fraction * n_c) images drawn at random within each class c (at least
    one), from the seed; label -1 is never drawn. Returns a bool mask.

    Example: labels [0]*10 + [1]*3, fraction 0.2 -> two of the ten 0s and one of the three 1s
    (0.6 rounds to 1) are True; the same seed always picks the same ones."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'--labeled-fraction must be in (0, 1], got {fraction}')
    rng, labeled = np.random.default_rng(seed), np.zeros(len(labels), bool)
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        n = max(1, math.floor(fraction * len(idx) + 0.5))              # round half up
        labeled[rng.choice(idx, n, replace=False)] = True
    return labeled


def save_labels(path: str, labels, labeled, accuracy: Optional[float], provenance: dict):
    """labels.npz: `labels` int64 and `labeled` bool in dataset order, `accuracy` on the
    unlabeled images (NaN if unknown), what made them (JSON); written then renamed (atomic)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path + '.tmp.npz', labels=labels.astype(np.int64), labeled=labeled.astype(bool),
             accuracy=np.float64('nan' if accuracy is None else accuracy),
             provenance=json.dumps(provenance))
    os.replace(path + '.tmp.npz', path)


def load_labels(path: str, provenance: Optional[dict] = None) -> tuple:
    """-> (labels int64 (N,), labeled bool (N,), accuracy or None, provenance dict); refused
    when the file was made with other settings than `provenance` (label_provenance)."""
    with np.load(path) as f:
        if 'labeled' not in f or f.get('labels', np.zeros(0, bool)).dtype.kind not in 'iu':
            raise ValueError(f'{path}: expected integer labels and bool labeled, one per image')
        acc, made = float(f.get('accuracy', np.nan)), json.loads(str(f.get('provenance', '{}')))
        refuse_changes(path, made, provenance or {}, 'remove it (the labels are made again) or '
                       'pick another --out')
        return (f['labels'].astype(np.int64), f['labeled'].astype(bool),
                None if math.isnan(acc) else acc, made)


def label_provenance(cfg: Config, ds) -> dict:
    """What labels.npz depends on: reusing it with any of these changed is refused. The methods
    of a pair (s2gan and s3gan, ...) make the same labels."""
    kind = {'s3gan': 's2gan', 'clustering-ss': 'clustering', 's3gan-co': 's2gan-co'}.get(
        cfg.method, cfg.method)
    stage = dict(zip(('pretrain_steps', 'pretrain_batch_size', 'pretrain_lr'), label_stage(cfg)),
                 resolution=cfg.resolution, clusters=cfg.clusters)   # their values in effect
    given = {k: getattr(cfg, k) for k in ('labels', 'encoder') if getattr(cfg, k)}
    return dict(method=kind, data=cfg.data, images=len(ds), classes=ds.num_classes,
                seed=cfg.seed, labeled_fraction=cfg.labeled_fraction,
                **(stage if kind in ('s2gan', 'clustering') and not given else {}), **given)


def refuse_changes(path: str, old: dict, new: dict, what_to_do: str):
    """A one-line ValueError naming the first field of `new` whose value `old` does not have."""
    for k in (k for k in new if old.get(k, 'unrecorded') != new[k]):
        raise ValueError(f'{path} was made with {k} {old.get(k, "unrecorded")!r}, not '
                         f'{new[k]!r}: {what_to_do}')


# --- Rotation pretraining and label inference (paper Sec. 3.1; not in the official code) ----------

def label_stage(cfg: Config) -> tuple:
    """(steps, batch, lr) of the label stage: cfg's, or where 0 by resolution. At 128 and up S4L's
    (google-research/s4l config/s4l_rotation.sh): 256 labeled and 256 other images a step, each
    in 4 rotations (batch 1,024 a stream), lr 0.03, 200 epochs of ImageNet's 10% (128,000 / 256
    = 500 steps). Below, ours for the small net: 800 steps at 32, 4,000 at 64, batch 128, lr 0.1."""
    small = cfg.resolution < 128
    return (cfg.pretrain_steps or ({32: 800, 64: 4000}[cfg.resolution] if small else 100000),
            cfg.pretrain_batch_size or (128 if small else 1024),
            cfg.pretrain_lr or (0.1 if small else 0.03))


class ResBlock(nn.Module):
    """Pre-activation ResNet block (He et al. 2016) that halves the resolution."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(in_ch), nn.BatchNorm2d(out_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False)

    def forward(self, x):
        h = F.relu(self.bn1(x))
        return self.skip(h) + self.conv2(F.relu(self.bn2(self.conv1(h))))


class FeatureNet(nn.Module):
    """The label stage's feature extractor: a ResNet with BatchNorm, no spectral norm,
    a rotation head (4 logits) and, for S4L, a linear class head."""

    def __init__(self, widths: tuple, num_classes: int):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.blocks = nn.Sequential(*[ResBlock(a, b) for a, b in zip(widths, widths[1:])])
        self.bn = nn.BatchNorm2d(widths[-1])
        self.rot_head = nn.Linear(widths[-1], NUM_ROTATIONS)
        self.cls_head = nn.Linear(widths[-1], num_classes) if num_classes else None

    def forward(self, x):                        # (B, 3, R, R) in [0, 1] -> h (B, C), pooled
        h = self.blocks(self.stem(x * 2 - 1))    # (B, C, 4, 4)
        return F.relu(self.bn(h)).mean((2, 3))


class Bottleneck(nn.Module):
    """Pre-activation bottleneck block (He et al. 2016, "Identity Mappings", ResNet v2):
    1x1 conv to `width`, 3x3 conv with the stride, 1x1 conv to 4 x width."""

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(c) for c in (in_ch, width, width))
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.skip = (nn.Conv2d(in_ch, 4 * width, 1, stride=stride, bias=False)
                     if stride > 1 or in_ch != 4 * width else None)

    def forward(self, x):
        h = F.relu(self.bn1(x))
        skip = x if self.skip is None else self.skip(h)
        h = F.relu(self.bn3(self.conv2(F.relu(self.bn2(self.conv1(h))))))
        return skip + self.conv3(h)


class ResNet50(FeatureNet):
    """The paper's label-stage network at 128x128 and up (Sec. 3.1: a ResNet-50, as in
    Kolesnikov et al. 2019 and S4L, Zhai et al. 2019, who use its v2 form): a 7x7 stride-2 stem
    and 3x3 max pool, then 3, 4, 6, 3 bottlenecks of widths 64, 128, 256, 512 (the first of each
    stage after the first with stride 2), a final BN + ReLU, the mean over H, W: h of 2,048."""

    def __init__(self, num_classes: int):
        nn.Module.__init__(self)
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        blocks, in_ch = [], 64
        for i, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            for j in range(n):
                blocks.append(Bottleneck(in_ch, width, 2 if i > 0 and j == 0 else 1))
                in_ch = 4 * width
        self.blocks, self.bn = nn.Sequential(*blocks), nn.BatchNorm2d(in_ch)
        self.rot_head = nn.Linear(in_ch, NUM_ROTATIONS)
        self.cls_head = nn.Linear(in_ch, num_classes) if num_classes else None


def feature_net(resolution: int, num_classes: int) -> FeatureNet:
    """The label stage's network for a resolution: the paper's ResNet-50 at 128x128 and up.
    NOTE (deviation): below, a small ResNet (a stride-2 stem, then a stride-2 block per halving
    down to 4x4), so that the 32x32 demo's label stage takes a minute on a CPU."""
    if resolution >= 128:
        return ResNet50(num_classes)
    return FeatureNet(tuple(min(32 * 2 ** i, 512) for i in range(int(math.log2(resolution)) - 2)),
                      num_classes)


def _endless(ds: Dataset, batch_size: int, cfg: Config):
    """Shuffled batches forever (a new order each pass), seeded from cfg.seed."""
    loader = DataLoader(ds, min(batch_size, len(ds)), shuffle=True, drop_last=True,
                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        worker_init_fn=ignore_stop_signals)
    while True:
        yield from loader


def pretrain(cfg: Config, ds: Dataset, labeled: np.ndarray, num_classes: int, steps: int,
             device) -> FeatureNet:
    """Rotation self-supervision on all images (Gidaris et al. 2018), plus with num_classes > 0
    a linear classifier on the labeled ones: S4L-Rotation (Zhai et al. 2019),
    L = L_rot(all images, 4 rotations each) + L_CE(labeled images, upright). NOTE (deviation):
    S4L's class loss also sees the rotated copies; the GAN's images are upright."""
    net, (_, batch, lr), paper = feature_net(cfg.resolution, num_classes).to(device), \
        label_stage(cfg), cfg.resolution >= 128
    # At 128 and up S4L's SGD: momentum 0.9, weight decay 1e-3 (NOTE (deviation): S4L's is on the
    # kernels only), a linear warm-up over 5 of 200 epochs, x0.1 at 140, 160, 180. Below, ours.
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=not paper,
                          weight_decay=1e-3 if paper else 5e-4)
    warmup = max(1, steps // (40 if paper else 20))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * (
        0.1 ** sum(s >= steps * e // 200 for e in (140, 160, 180)) if paper
        else 0.5 * (1 + math.cos(math.pi * s / steps))))
    # batch counts rotated images: B/4 images in 4 rotations (for S4L as many labeled ones, whose
    # upright copies get the class loss; every image labeled: that stream alone, not twice)
    n, every = max(1, batch // NUM_ROTATIONS), num_classes and labeled.all()
    images = None if every else _endless(ds, n, cfg)
    labeled_images = _endless(torch.utils.data.Subset(ds, np.flatnonzero(labeled)), n, cfg)
    t0, log_every = time.time(), max(1, steps // 10)
    for step in range(1, steps + 1):
        x = None if every else next(images)[0].to(device)              # (n, 3, R, R)
        if num_classes:
            x_lab, y_lab = (t.to(device) for t in next(labeled_images))
            x = x_lab if every else torch.cat([x_lab, x])               # labeled images first
        x_rot, _, rot_labels = rotate_batch(x, torch.zeros(len(x)), len(x))   # all 4 rotations
        h = net(x_rot)
        rot_logits = net.rot_head(h)
        loss = loss_rot = F.cross_entropy(rot_logits, rot_labels)
        if num_classes:
            cls_logits = net.cls_head(h[:len(y_lab)])                   # labeled, upright
            loss = loss + F.cross_entropy(cls_logits, y_lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        device_sync(device)                     # on XLA: one compiled step, run once per step
        if step % log_every == 0 or step == steps:                      # the only host syncs
            line = (f'pretrain {step:>6}/{steps}  loss_rot {loss_rot.item():.3f}  rot_acc '
                    f'{(rot_logits.argmax(1) == rot_labels).float().mean().item():.3f}')
            if num_classes:
                line += f'  cls_acc {(cls_logits.argmax(1) == y_lab).float().mean().item():.3f}'
            print(f'{line}  {time.time() - t0:.0f}s', flush=True)
    return net


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple:
    """Lloyd's k-means with greedy k-means++ seeding (Arthur & Vassilvitskii 2007; as scikit-learn:
    of 2 + log k candidates drawn ~ d2, the one that lowers sum(d2) most), on x's device.

    x (N, D) -> assignments (N,) int64 in [0, k), centroids (k, D). No host syncs, random numbers
    from the CPU (the same on every device), and loop iterations that keep their shapes: on XLA
    each loop compiles one iteration once (synced per iteration)."""
    u = torch.rand(k, 2 + int(math.log(k)), generator=torch.Generator().manual_seed(seed))
    centroids = [x[(u[0, :1] * len(x)).long().to(x.device)]]         # the first: uniform
    d2 = torch.cdist(x, centroids[0]).squeeze(1) ** 2  # squared distance to the nearest centroid
    for u_i in synced(u[1:], x.device):
        cdf = d2.cumsum(0)                                   # inverse-CDF draws of candidates
        cand = x[(cdf < u_i.to(x.device)[:, None] * cdf[-1]).sum(1)]    # (trials, D)
        new_d2 = torch.minimum(d2, torch.cdist(cand, x) ** 2)           # (trials, N)
        best = new_d2.sum(1).argmin(0, keepdim=True)                    # (1,): no host sync
        centroids.append(cand[best])
        d2 = new_d2[best].squeeze(0)
    centroids = torch.cat(centroids)
    for _ in synced(range(iters), x.device):
        assign = torch.cdist(x, centroids).argmin(1)                    # (N,)
        sums = torch.zeros(k, x.shape[1] + 1, device=x.device).index_add_(   # last column:
            0, assign, F.pad(x, (0, 1), value=1.0))                     # the cluster sizes
        counts = sums[:, -1:]
        centroids = torch.where(counts > 0, sums[:, :-1] / counts.clamp(min=1), centroids)
    return torch.cdist(x, centroids).argmin(1), centroids


def cluster_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Accuracy after the best one-to-one matching of clusters to classes (Hungarian).
    Example: pred [1,1,0,0,2], true [0,0,1,1,1] -> 1<->0, 0<->1, 2 unmatched: 0.8."""
    from scipy.optimize import linear_sum_assignment   # lazily: only the label stage needs it
    pred, true = np.asarray(pred, np.int64), np.asarray(true, np.int64)
    counts = np.zeros((pred.max() + 1, true.max() + 1), np.int64)
    np.add.at(counts, (pred, true), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(pred))


class InferredLabels(NamedTuple):
    labels: np.ndarray          # (N,) int64: the true label if labeled, else inferred (cluster)
    labeled: np.ndarray         # (N,) bool: which labels are ground truth
    accuracy: Optional[float]   # on the unlabeled images with a known label; None if unknown


def infer_labels(cfg: Config) -> InferredLabels:
    """The label stage (paper Sec. 3.1): writes cfg.out/labels.npz and pretrain.pt, or reuses them.

    s2gan/s3gan: the S4L classifier's hard argmax labels for the unlabeled images, the true
    labels for the labeled k%. clustering(-ss): k-means on the rotation features, no labels used
    (labeled all False); accuracy after matching clusters to classes. cfg.encoder: the features
    of a BigBiGAN run's E instead, a linear classifier on the labeled k% for s2gan/s3gan."""
    s4l = cfg.method in ('s2gan', 's3gan')
    if not s4l and cfg.method not in ('clustering', 'clustering-ss'):
        raise ValueError(f'--method {cfg.method}: label inference is not needed for this '
                         f'method (only for s2gan, s3gan, clustering, clustering-ss)')
    path, ds = os.path.join(cfg.out, 'labels.npz'), make_dataset(cfg)
    provenance = label_provenance(cfg, ds)
    if os.path.exists(path):
        reused = InferredLabels(*load_labels(path, provenance)[:3])
        print(f'reusing {path} ({cfg.method}, accuracy {reused.accuracy})')
        return reused
    true = ds.labels
    if s4l and ds.num_classes == 0:
        raise ValueError(f'--method {cfg.method} needs some true labels; --data {cfg.data} has '
                         f'none (use clustering)')
    labeled = (select_labeled(true, cfg.labeled_fraction, cfg.seed) if s4l
               else np.zeros(len(ds), bool))
    device = pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, num_workers=loader_workers(cfg, device))
    torch.manual_seed(cfg.seed)
    steps, num_classes = label_stage(cfg)[0], ds.num_classes if s4l else 0
    print(f'label stage: {cfg.method} on {len(ds)} images ({labeled.sum()} labeled), '
          f'{f"the E of {cfg.encoder}" if cfg.encoder else f"{steps} steps"} on {device}',
          flush=True)
    if cfg.encoder:   # BigBiGAN's encoder (Donahue & Simonyan 2019): no rotation pretraining
        import bigbigan
        h = bigbigan.encoder_features(cfg.encoder, cfg, device)
        head = bigbigan.linear_probe(h[labeled], true[labeled], cfg.seed) if s4l else None
    else:
        net = pretrain(cfg, ds, labeled, num_classes, steps, device).eval()
        loader = DataLoader(make_dataset(cfg, augment=False), 256, num_workers=cfg.num_workers,
                            worker_init_fn=ignore_stop_signals)
        with torch.no_grad():        # features in eval mode: independent of the batch
            h = torch.cat([net(x.to(device)) for x, _ in synced(loader, device)])   # (N, C)
        head = net.cls_head
        save_checkpoint(os.path.join(cfg.out, 'pretrain.pt'), dict(   # what feature_net rebuilds
            resolution=cfg.resolution, num_classes=num_classes, net=net.state_dict()))
    if s4l:
        labels = np.where(labeled, true, head(h).argmax(1).cpu().numpy())
    else:   # unit-length features: clusters by direction, as usual for self-supervised features
        k = cfg.clusters or ds.num_classes or cfg.num_classes
        labels = kmeans(F.normalize(h, dim=1), k, seed=cfg.seed)[0].cpu().numpy()
    known, accuracy = ~labeled & (true >= 0), None
    if known.any():
        accuracy = (float((labels[known] == true[known]).mean()) if s4l
                    else cluster_accuracy(labels[known], true[known]))
        print(f'label accuracy on {known.sum()} unlabeled images: {accuracy:.4f}')
    save_labels(path, labels, labeled, accuracy, provenance)
    return InferredLabels(labels.astype(np.int64), labeled, accuracy)


# --- Devices: every difference between CPU, CUDA, XLA and many processes lives here ---------------

def pick_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else xla if a TPU is attached, else cpu."""
    if name == 'auto':
        tpu = os.environ.get('PJRT_DEVICE') == 'TPU' or os.path.exists('/dev/accel0')
        name = 'cuda' if torch.cuda.is_available() else 'xla' if tpu else 'cpu'
    if name == 'xla':
        import torch_xla  # imported only when asked for
        import torch_xla.runtime as xr
        if xr.global_runtime_device_count() > 1 and not xr.is_spmd():
            xr.use_spmd()   # every local core as one SPMD device; before any tensor touches it
        return torch_xla.device()
    if name not in ('cpu', 'cuda'):
        raise ValueError(f'--device: unknown device {name!r}; choose auto, cpu, cuda or xla')
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is available')
    return torch.device(name)


def device_sync(device: torch.device):
    """Cut the lazy XLA graph here and run it: a loop synced per iteration compiles one iteration
    once, not the whole loop as one program (no-op elsewhere: CPU is eager, CUDA asynchronous)."""
    if device.type == 'xla':
        import torch_xla
        torch_xla.sync()


def synced(items, device: torch.device):
    """Each of `items`, with a device_sync once the loop body is done with it."""
    for item in items:
        yield item
        device_sync(device)


class Runtime:
    """The device, the precision and the processes of a run. CPU or one GPU: one process. Many
    GPUs (or CPU processes): `torchrun --nproc_per_node=N`, batch/N images each, DDP averages the
    gradients and BatchStandardize all-reduces the moments: the math of one process with the
    global batch. TPU: one process drives every local core with SPMD (torch-xla's recommended
    path), the batch sharded over the cores, every reduction global."""

    def __init__(self, device: str = 'auto', precision: str = 'fp32'):
        if precision not in ('fp32', 'bf16'):
            raise ValueError(f'--precision: unknown precision {precision!r}; choose fp32 or bf16')
        self.world = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        self.is_main = self.rank == 0                 # the process that writes files
        if self.world > 1 and not torch.distributed.is_initialized():
            use_cuda = device in ('auto', 'cuda') and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
            torch.distributed.init_process_group('nccl' if use_cuda else 'gloo')
        # host-side flags (a stop signal) go through gloo on the CPU: no device sync
        self.cpu_group = torch.distributed.new_group(backend='gloo') if self.world > 1 else None
        self.device = pick_device(device)
        if self.device.type == 'cuda':
            self.device = torch.device('cuda', torch.cuda.current_device())
            torch.backends.cuda.matmul.allow_tf32 = True   # speed; bf16 is the bigger lever
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True          # static shapes: pick kernels once
        self.type = self.device.type
        self.bf16 = precision == 'bf16'
        self.mesh = None
        if self.type == 'xla':
            import torch_xla.runtime as xr
            if xr.is_spmd():
                import torch_xla.distributed.spmd as xs
                n = xr.global_runtime_device_count()
                self.mesh = xs.Mesh(np.arange(n), (n,), ('data',))

    def autocast(self):
        return torch.autocast(self.type, dtype=torch.bfloat16, enabled=self.bf16)

    def sync(self):
        """End of a training step: cut and run the XLA graph (no-op elsewhere; CUDA is
        asynchronous). One method, not device_sync, so that the XLA tests can count steps."""
        device_sync(self.device)

    def shard(self, x):
        """Under SPMD, split the batch dimension over the TPU cores."""
        if self.mesh is not None:
            import torch_xla.distributed.spmd as xs
            xs.mark_sharding(x, self.mesh, ('data',) + (None,) * (x.dim() - 1))
        return x

    def wrap(self, model):
        """DistributedDataParallel under torchrun; the model itself otherwise."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.type == 'cuda' else None
        # Buffers (the vectors u) follow from the weights: synced once at the start, not per step
        DDP = nn.parallel.DistributedDataParallel
        sync = 'forward_sync_buffers'
        if sync not in inspect.signature(DDP).parameters:
            sync = 'broadcast_buffers'             # its name before torch 2.13
        return DDP(model, device_ids=ids, **{sync: False})

    def adam(self, params, lr, cfg):
        # fused on CUDA, foreach elsewhere: a few kernels per step, not one per tensor. XLA
        # compiles the step twice: in step 1 Adam creates its state and G's and D's bias
        # corrections are equal scalars (merged); from step 2 on the graph stays (test_xla_*).
        kind = dict(fused=True) if self.type == 'cuda' else dict(foreach=True)
        return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                **kind)

    def manual_seed(self, seed: int):
        torch.manual_seed(seed + self.rank)   # each process draws its own z and fake labels
        if self.type == 'xla':
            import torch_xla
            torch_xla.manual_seed(seed + self.rank)

    def rng_state(self):
        state = {'cpu': torch.get_rng_state()}
        if self.type == 'cuda':
            state['cuda'] = torch.cuda.get_rng_state(self.device)
        if self.type == 'xla':
            import torch_xla.core.xla_model as xm
            seed = xm.get_rng_state()   # a uint64: stored as the int64 with the same bits
            state['xla'] = torch.tensor(seed - (1 << 64) if seed >= 1 << 63 else seed)
        return state

    def set_rng_state(self, state):
        torch.set_rng_state(state['cpu'])
        if 'cuda' in state and self.type == 'cuda':
            torch.cuda.set_rng_state(state['cuda'], self.device)
        if 'xla' in state and self.type == 'xla':
            import torch_xla.core.xla_model as xm
            xm.set_rng_state(int(state['xla']) % (1 << 64))

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def loader_workers(cfg: Config, device: torch.device) -> int:
    """cfg.num_workers; auto (-1): 2 on a CPU (its cores train), else this process's core share."""
    if cfg.num_workers >= 0 or device.type == 'cpu':
        return 2 if cfg.num_workers < 0 else cfg.num_workers
    return max(2, os.cpu_count() // int(os.environ.get('LOCAL_WORLD_SIZE', '1')) - 1)


def to_cpu(obj):
    """A copy of a nest of dicts/lists/tuples with every tensor on the CPU (for torch.save).
    One sync per device first materialises all pending XLA tensors together, so that each copy
    is a transfer, not a graph of its own."""
    from torch.utils._pytree import tree_leaves, tree_map
    for device in {t.device for t in tree_leaves(obj) if isinstance(t, torch.Tensor)}:
        device_sync(device)
    return tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, obj)


# --- Training step (paper Sec. 4; compare_gan modular_gan.py, s3gan.py): 2 D, 1 G step, EMA -----

@torch.no_grad()
def ema_update(G_ema, G, decay: float):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, on G's trainable weights
    (compare_gan ModularGAN.g_use_ema); the vectors u are copied (its EMA G reads G's own u)."""
    ema, weight = list(G_ema.parameters()), 1.0 - decay
    if ema[0].device.type == 'xla':   # XLA bakes the scalar 1.0 (decay 0) into the graph and
        # merges equal scalars: the switch at ema_start would recompile. A tensor sent as one
        # element stays its own input; a list, as one 0-dim tensor would call .item().
        weight = [torch.tensor([weight]).to(ema[0].device)[0]] * len(ema)
    torch._foreach_lerp_(ema, list(G.parameters()), weight)
    u_ema = [b for name, b in G_ema.named_buffers() if name.endswith('.u')]
    u = [b for name, b in G.named_buffers() if name.endswith('.u')]
    torch._foreach_copy_(u_ema, u)


def sample_fake_inputs(batch: int, z_dim: int, num_classes: int, device):
    """z ~ N(0, I) (the gin's z.distribution_fn, not the code's uniform), y_hat ~ U{0..K-1}."""
    z = torch.randn(batch, z_dim, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    return z, y


def train_step(models, opts, batches, cfg: Config, rt: Runtime, ema_decay: float):
    """One global step in the paper's order; returns a dict of scalar tensors (no host sync).

    models = (G, D, G_ema, G_train, D_train): the modules and their DDP wrappers (the same
    modules on one process). batches: cfg.disc_iters (x_real, y_real, y_true) tuples, each a
    fresh real batch; y_real is what the projection sees (-1: unlabeled, co-training methods).
    """
    G, D, G_ema, G_train, D_train = models
    opt_G, opt_D = opts
    K = G.embed_y.num_embeddings
    n_rot = (batches[0][0].shape[0] // (NUM_ROTATIONS * cfg.rotated_batch_fraction)
             if uses_rotation(cfg.method) else 0)             # each half: bs / (4 f) rotated 3 ways
    stats = {}
    for x_real, y_real, y_true in batches:                         # x_real (B, 3, R, R) in [0, 1]
        B = x_real.shape[0]
        if cfg.method == 'random-label':                           # a fresh label at each read
            y_real = torch.randint(0, K, (B,), device=x_real.device)
        z, y_fake = sample_fake_inputs(B, cfg.z_dim, K, x_real.device)
        with torch.no_grad(), rt.autocast():
            x_fake = G(z, y_fake)
        xr, yr, rot_labels = rotate_batch(x_real, y_real, n_rot)
        xf, yf, _ = rotate_batch(x_fake.to(x_real.dtype), y_fake, n_rot)
        with rt.autocast():
            out = D_train(torch.cat([xr, xf]), torch.cat([yr, yf]))   # one D call, as compare_gan
        m = B + 3 * n_rot                                          # rows of the real half
        logits = out.logits.float()
        loss_d = hinge_loss_d(logits[:B], logits[m:m + B])
        stats['d_real'], stats['d_fake'] = logits[:B].mean(), logits[m:m + B].mean()
        if n_rot:   # D learns rotations of real images only (weight 1.0)
            rot_logits = out.rot_logits[m - 4 * n_rot:m]
            stats['loss_rot_d'] = rotation_loss(rot_logits, rot_labels)
            stats['rot_acc'] = (rot_logits.argmax(1) == rot_labels).float().mean()
            loss_d = loss_d + cfg.weight_rotation_loss_d * stats['loss_rot_d']
        if out.cls_logits is not None:   # CE on labeled reals; unlabeled ones get argmax labels
            stats['loss_cls'] = class_loss(out.cls_logits[:B], y_real)
            loss_d = loss_d + cfg.weight_class_loss * stats['loss_cls']
            unlabeled = ((y_real < 0) & (y_true >= 0)).float()      # truth known, label hidden
            right = (out.y_used[:B] == y_true).float()
            stats['cls_acc'] = (right * unlabeled).sum() / unlabeled.sum().clamp(min=1)
        opt_D.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_D.step()
    stats['loss_d'] = loss_d.detach()

    z, y_fake = sample_fake_inputs(B, cfg.z_dim, K, x_real.device)
    D.requires_grad_(False)                          # no D gradients (nor DDP hooks) in G's step
    with rt.autocast():
        x_fake = G_train(z, y_fake)
        # NOTE (deviation): compare_gan also feeds the reals through D here and discards them;
        # D has no batch norm, so leaving them out changes nothing but the cost.
        xf, yf, rot_labels = rotate_batch(x_fake, y_fake, n_rot)
        out = D(xf, yf)
    loss_g = hinge_loss_g(out.logits[:B].float())
    if n_rot:   # G is rewarded for fakes whose rotation D can tell (weight 0.2)
        stats['loss_rot_g'] = rotation_loss(out.rot_logits[-4 * n_rot:], rot_labels)
        loss_g = loss_g + cfg.weight_rotation_loss_g * stats['loss_rot_g']
    opt_G.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_G.step()
    D.requires_grad_(True)
    ema_update(G_ema, G, ema_decay)
    stats['loss_g'] = loss_g.detach()
    return {k: v.detach().float() for k, v in stats.items()}


# --- Training loop: flat; it only checks intervals ------------------------------------------------

class TrainView(torch.utils.data.Dataset):
    """Item (i, position): (image i, label fed to D's projection, true label or -1); data sets
    with random crops also get the position (FolderDataset)."""

    def __init__(self, dataset, y_real: np.ndarray):
        self.dataset, self.y_real = dataset, torch.as_tensor(y_real, dtype=torch.int64)
        self.y_true = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i = item[0]
        return (self.dataset[item if getattr(self.dataset, 'augment', False) else i][0],
                self.y_real[i], self.y_true[i])


class EndlessSampler(torch.utils.data.Sampler):
    """(index, position) pairs: indices from one seeded random permutation per epoch, positions
    in the global stream of samples from `start`. Process r of w takes positions r, r + w, ...,
    so the w local batches together are the global batch. Resuming at a position replays and
    skips nothing: a resumed run equals an unbroken one."""

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world

    def __iter__(self):
        pos, perm, epoch = self.start + self.rank, None, -1
        while True:
            if pos // self.n != epoch:
                epoch = pos // self.n
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed * 100003 + epoch))
            yield int(perm[pos % self.n]), pos
            pos += self.world


def real_batches(data: TrainView, cfg: Config, rt: Runtime, start_batch: int):
    """Endless (x_real, y_real, y_true) batches on the device, from global batch `start_batch`."""
    local = cfg.batch_size // rt.world
    sampler = EndlessSampler(len(data), cfg.seed, start_batch * cfg.batch_size, rt.rank, rt.world)
    loader = torch.utils.data.DataLoader(
        data, batch_size=local, sampler=sampler, drop_last=True, num_workers=cfg.num_workers,
        pin_memory=rt.type == 'cuda', generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=cfg.num_workers > 0, worker_init_fn=ignore_stop_signals)
    for x, y_real, y_true in loader:   # workers decode the next batches while the device works
        x, y_real, y_true = (t.to(rt.device, non_blocking=True) for t in (x, y_real, y_true))
        yield rt.shard(x), rt.shard(y_real), rt.shard(y_true)


def method_labels(cfg: Config, dataset, rt: Runtime) -> InferredLabels:
    """The label each real image carries into D's projection under cfg.method (paper Sec. 3),
    which of them are ground truth, and the accuracy of the inferred ones."""
    y = np.asarray(dataset.labels, dtype=np.int64)
    if cfg.method in ('single-label', 'random-label'):   # random: redrawn in every step
        return InferredLabels(np.zeros_like(y), np.zeros(len(y), bool), None)
    if (y < 0).any() and cfg.method in ('biggan', 's2gan-co', 's3gan-co'):
        raise ValueError(f'--method {cfg.method} needs a true label for every image; {cfg.data} '
                         f'has {int((y < 0).sum())} unlabeled (try a clustering method)')
    if cfg.method == 'biggan':
        return InferredLabels(y, np.ones(len(y), bool), None)
    path, provenance = os.path.join(cfg.out, 'labels.npz'), label_provenance(cfg, dataset)
    co = uses_classifier(cfg.method)                 # s2gan-co, s3gan-co: -1 where not labeled
    if rt.is_main and (cfg.labels or co) and not os.path.exists(path):   # labels made elsewhere
        labels, labeled = (load_labels(cfg.labels)[:2] if cfg.labels else   # (checked) or the
                           (y, select_labeled(y, cfg.labeled_fraction, cfg.seed)))   # true k%
        if len(labels) != len(y):
            raise ValueError(f'--labels {cfg.labels}: {len(labels)} labels for {len(y)} images')
        save_labels(path, np.where(labeled | (not co), labels, -1), labeled, None, provenance)
    elif rt.is_main and not (cfg.labels or co):      # s2gan, s3gan, clustering(-ss)
        infer_labels(cfg)
    rt.barrier()
    return InferredLabels(*load_labels(path, provenance)[:3])


def data_report(cfg: Config, dataset, labels: InferredLabels, show: bool) -> str:
    """The start-up report (printed if `show`): images, and labels the method feeds to D, per
    class. A ValueError when they are clearly wrong for the method."""
    K, y, true = label_classes(cfg), labels.labels, np.asarray(dataset.labels)

    def per_class(v, n=cfg.num_classes):              # min / median / max over n classes
        c = np.bincount(v[(v >= 0) & (v < n)], minlength=n)
        return f'min {c.min()} / median {np.median(c):g} / max {c.max()}' if len(v) else 'none'
    report = '\n'.join([
        f'{cfg.data}: {len(y)} images, {cfg.num_classes} classes, --method {cfg.method}',
        f'images per class: {per_class(true[true >= 0])}',
        f'labeled images per class: {per_class(true[labels.labeled])}',
        f'labels fed to D per class (of {K}): {per_class(y, K)}'])
    seen = y[y >= 0] if uses_classifier(cfg.method) else y            # -1: unlabeled
    bad, empty = seen[(seen < 0) | (seen >= K)], np.setdiff1d(range(K), true[labels.labeled])
    if show:
        print(report, flush=True)
    if cfg.method in ('single-label', 'random-label'):                 # one label: by design
        return report
    if len(bad):
        raise ValueError(f'{len(bad)} images have labels outside [0, {K}), e.g. {bad[0]}: set '
                         f'--num-classes (clustering: --clusters) to cover them')
    if len(np.unique(seen)) < 2:
        raise ValueError(f'every image fed to D has label {seen[0] if len(seen) else None}, but '
                         f'--method {cfg.method} is conditional: one subfolder per class?')
    if len(empty) and not cfg.method.startswith('clustering'):
        raise ValueError(f'class {empty[0]} has no labeled image ({len(empty)} classes have none)')
    return report


def save_checkpoint(path: str, state: dict):
    """torch.save to a temporary file, then an atomic rename: a kill never leaves half a file;
    a failed write (a full disk) leaves the old file, no temporary one, and a one-line OSError."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path + '.tmp', 'wb') as fh:   # a Python file: a failed write raises an OSError
            torch.save(to_cpu(state), fh)       # (or torch's RuntimeError with it as its context)
        os.replace(path + '.tmp', path)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise OSError(f'cannot write {path}: {cause}') from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + '.tmp')


class TrainingDiverged(RuntimeError):
    pass


def build_training(cfg: Config, rt: Runtime):
    """(G, D, G_ema, opt_G, opt_D) on the device, the same initial weights in every process.
    cfg.compile: G's and D's forward in place (state-dict keys kept); XLA compiles anyway."""
    torch.manual_seed(cfg.seed)
    G, D = build_models(cfg)
    G_ema = copy.deepcopy(G).eval()   # copied on the CPU: on XLA, copies of device tensors alias
    G, D, G_ema = G.to(rt.device), D.to(rt.device), G_ema.to(rt.device)
    G, D = [m.to(memory_format=torch.channels_last) if cfg.channels_last else m for m in (G, D)]
    if cfg.compile and rt.type != 'xla':
        G.compile(dynamic=False), D.compile(dynamic=False)
    rt.manual_seed(cfg.seed)                    # then each its own z and fake labels
    return G, D, G_ema, rt.adam(G.parameters(), cfg.lr_g, cfg), rt.adam(D.parameters(),
                                                                        cfg.lr_d, cfg)


class TrainingInterrupted(KeyboardInterrupt):
    """args (message, signal): SIGTERM or SIGINT came (in training: the step was finished and
    ckpt.pt written). A KeyboardInterrupt, as Ctrl-C's: no `except Exception` swallows it."""


@contextlib.contextmanager
def stop_signals():
    """Within: SIGTERM and SIGINT are appended to the yielded list (the run stops at the end of
    the step) instead of ending the process; a second signal acts as before."""
    received, signals = [], (signal.SIGTERM, signal.SIGINT)   # only the main thread may catch
    signals = signals if threading.current_thread() is threading.main_thread() else ()
    before = {s: signal.signal(s, lambda n, _: received.append(n) or restore()) for s in signals}
    restore = lambda: [signal.signal(s, h) for s, h in before.items()]  # noqa: E731
    try:
        yield received
    finally:
        restore()


def ignore_stop_signals(worker_id: int):
    """DataLoader workers leave SIGINT and SIGTERM sent to the process group (Ctrl-C, a batch
    scheduler) to the main process, which finishes its step; the parent's own SIGTERM (its exit:
    terminate()) or its death ends a worker at once (deaf to both, they held the exit forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, 'sigtimedwait'):                        # not on macOS: SIGTERM ends it
        parent = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})   # taken by the thread below

        def obey_parent():   # and once a second: is the parent alive?
            while getattr(signal.sigtimedwait({signal.SIGTERM}, 1), 'si_pid', 0) != parent \
                    and os.getppid() == parent:
                pass
            os._exit(0)
        threading.Thread(target=obey_parent, daemon=True).start()


# config.json fields a resume may change: not in the step's math (device and precision change
# only the rounding). Changing any other field is refused on resume.
RESUMABLE = {'out', 'steps', 'device', 'precision', 'compile', 'channels_last', 'num_workers',
             'log_every', 'sample_every', 'ckpt_every', 'snapshot_every', 'fid_stats', 'fid_every',
             'fid_samples', 'standing_batches', 'grid_standing_batches', 'skip_bad_images'}


def train(cfg: Config, data=make_dataset, build=build_training, step_fn=train_step):
    """Train cfg.method for cfg.steps G steps in cfg.out, resuming from cfg.out/ckpt.pt.
    SIGTERM or SIGINT: the step is finished, ckpt.pt written, TrainingInterrupted raised.
    Hooks (bigbigan.py): data(cfg) gives the data set; build(cfg, rt) the five of build_training
    and more (name, module) pairs, checkpointed by name and appended to step_fn's models with
    their DDP wrappers; step_fn has train_step's signature."""
    rt = Runtime(cfg.device, cfg.precision)
    dataset = data(cfg)
    cfg = dataclasses.replace(with_data_classes(cfg, dataset),
                              num_workers=loader_workers(cfg, rt.device))
    local = cfg.batch_size // rt.world
    f4 = NUM_ROTATIONS * cfg.rotated_batch_fraction
    if cfg.batch_size % rt.world or (uses_rotation(cfg.method) and local % f4):
        raise ValueError(f'--batch-size {cfg.batch_size}: each of {rt.world} process(es) needs '
                         f'an equal batch' + (f' divisible by 4 x --rotated-batch-fraction = {f4}'
                                              if uses_rotation(cfg.method) else ''))
    ckpt_path, config = os.path.join(cfg.out, 'ckpt.pt'), json.loads(json.dumps(vars(cfg)))
    if os.path.exists(ckpt_path) and os.path.exists(os.path.join(cfg.out, 'config.json')):
        with open(os.path.join(cfg.out, 'config.json')) as fh:
            old = json.load(fh)
        refuse_changes(ckpt_path, old, {k: v for k, v in config.items() if k in old and k not in
                                        RESUMABLE}, 'keep it to resume, or pick another --out')
    os.makedirs(os.path.join(cfg.out, 'samples'), exist_ok=True)
    labels = method_labels(cfg, dataset, rt)
    report = data_report(cfg, dataset, labels, rt.is_main)   # stops the run if they are wrong
    if rt.is_main:                                   # the run is accepted: record it
        for name, text in (('config.json', json.dumps(config, indent=1)), ('report.txt', report)):
            with open(os.path.join(cfg.out, name), 'w') as fh:
                fh.write(text + '\n')

    G, D, G_ema, opt_G, opt_D, *more = build(cfg, rt)
    step, best_fid = 0, math.inf
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        nets = dict(G=G, G_ema=G_ema, D=D, opt_G=opt_G, opt_D=opt_D, **dict(more))
        for key, obj in nets.items():
            obj.load_state_dict(ckpt[key])
        step, best_fid = ckpt['step'], ckpt.get('best_fid', math.inf)
        rt.set_rng_state(ckpt['rng'][min(rt.rank, len(ckpt['rng']) - 1)])
        if rt.is_main:
            print(f'resuming from {ckpt_path} at step {step}')
    models = (G, D, G_ema, rt.wrap(G), rt.wrap(D)) + sum(((m, rt.wrap(m)) for _, m in more), ())
    batches = real_batches(TrainView(dataset, labels.labels), cfg, rt, step * cfg.disc_iters)
    K = G.embed_y.num_embeddings
    rows = torch.linspace(0, K - 1, min(K, 10)).long()             # sample grid: one row a class
    gen = torch.Generator().manual_seed(cfg.seed)
    grid_z, grid_y = torch.randn(len(rows) * 8, cfg.z_dim, generator=gen), rows.repeat_interleave(8)
    weights = lambda **kw: dict(G_ema=G_ema.state_dict(), D=D.state_dict(), step=step, **kw,  # noqa
                                **{k: m.state_dict() for k, m in more})   # and bigbigan.py's E
    due = lambda every: step % every == 0 or step == cfg.steps    # noqa: E731 (an interval is due)

    # on the device, so that the step's graph is the same every step (no recompiles on XLA)
    step_t, first_bad = torch.full((), step, device=rt.device), torch.full((), -1, device=rt.device)
    sums, count = {}, 0
    t_start, t_log, good_step = time.time(), time.time(), step
    with stop_signals() as received:
        while step < cfg.steps:
            decay = 0.0 if step < cfg.ema_start else cfg.ema_decay    # EMA = copy before ema_start
            stats = step_fn(models, (opt_G, opt_D),
                            [next(batches) for _ in range(cfg.disc_iters)], cfg, rt, decay)
            step += 1
            step_t += 1
            ok = torch.isfinite(stats['loss_d']) & torch.isfinite(stats['loss_g'])
            first_bad = torch.where(~ok & (first_bad < 0), step_t, first_bad)
            sums = {k: sums.get(k, 0) + v for k, v in stats.items()}
            count += 1
            rt.sync()                # end of a step: on XLA, one compiled step run per step
            stop = torch.tensor(received[0] if received else 0)   # every process stops at the
            if rt.world > 1:   # same step: one tiny all-reduce each step, on the host (no sync)
                torch.distributed.all_reduce(stop, torch.distributed.ReduceOp.MAX, rt.cpu_group)
            stop = int(stop)
            if not (stop or any(due(n) for n in (cfg.log_every, cfg.sample_every, cfg.ckpt_every,
                                                 cfg.snapshot_every, cfg.fid_every))):
                continue                                           # the usual case: no host sync
            if int(first_bad) >= 0:
                raise TrainingDiverged(f'a loss became NaN or inf at step {int(first_bad)}; '
                                       f'stopped. The last good checkpoint (step {good_step}) is '
                                       f'{ckpt_path}')
            if due(cfg.log_every) and rt.is_main:
                now, row = time.time(), {k: v / count for k, v in sums.items()}
                for name, net in (('sigma_max_g', G), ('sigma_max_d', D)):   # largest sigma(W)
                    row[name] = torch.stack([b for k, b in net.named_buffers()
                                             if k.endswith('sigma_w')]).max()
                row = dict(zip(row, torch.stack(list(row.values())).tolist()))
                text = ' '.join(f'{k} {v:.3f}' for k, v in row.items())
                row.update(step=step, images_per_s=count * cfg.batch_size * cfg.disc_iters
                           / (now - t_log), elapsed_s=now - t_start)
                if labels.accuracy is not None:
                    row['label_acc'] = labels.accuracy
                with open(os.path.join(cfg.out, 'log.jsonl'), 'a') as fh:
                    fh.write(json.dumps(row) + '\n')
                eta = (cfg.steps - step) * (now - t_log) / count
                print(f'step {step}/{cfg.steps} | {text} | {row["images_per_s"]:.0f} img/s | '
                      f'eta {eta / 60:.1f} min', flush=True)
                sums, count, t_log = {}, 0, time.time()
            if due(cfg.sample_every) and rt.is_main:
                standing_statistics(G_ema, min(cfg.grid_standing_batches, cfg.standing_batches),
                                    cfg.seed + 1)
                x = generate(G_ema, grid_z.to(rt.device), grid_y.to(rt.device), rt)
                save_grid(x, os.path.join(cfg.out, 'samples', f'step_{step:07d}.png'))
            if cfg.fid_stats and due(cfg.fid_every) and rt.is_main:
                fid_value = evaluate_fid(G_ema, cfg, rt)
                print(f'step {step} | FID {fid_value:.2f}', flush=True)
                with open(os.path.join(cfg.out, 'log.jsonl'), 'a') as fh:
                    fh.write(json.dumps(dict(step=step, fid=fid_value)) + '\n')
                if fid_value < best_fid:                           # the best weights so far
                    best_fid = fid_value
                    save_checkpoint(os.path.join(cfg.out, 'best.pt'), weights(fid=fid_value))
            if due(cfg.ckpt_every) or stop:
                rng = [rt.rng_state()]
                if rt.world > 1:                                    # every process's RNG state
                    rng = [None] * rt.world
                    torch.distributed.all_gather_object(rng, rt.rng_state())
                if rt.is_main:
                    save_checkpoint(ckpt_path, weights(G=G.state_dict(), rng=rng, best_fid=best_fid,
                                                       opt_G=opt_G.state_dict(),
                                                       opt_D=opt_D.state_dict()))
                good_step = step
            if step % cfg.snapshot_every == 0 and rt.is_main:     # kept: a collapse cannot
                save_checkpoint(os.path.join(cfg.out, 'snapshots', f'step_{step:07d}.pt'),
                                weights())                         # overwrite them
            if stop and step < cfg.steps:
                raise TrainingInterrupted(f'stopped by {signal.Signals(stop).name} after step '
                                          f'{step}; {ckpt_path} holds it: run the same command to '
                                          f'resume', stop)
    return dict(cfg=cfg, step=step, label_acc=labels.accuracy, G_ema=G_ema)


# --- Sampling and evaluation (compare_gan eval_gan_lib.py): G_ema with standing statistics --------

@torch.no_grad()
def standing_statistics(G, num_batches: int, seed: int, batch_size: int = 64):
    """Fill every BN of G with its batch moments averaged over sampled batches (compare_gan
    eval_gan_lib._update_bn_accumulators: 3,200 batches of 64, z ~ N(0, I), uniform labels).
    As there, each BN normalises with the running average so far while accumulating, and u keeps
    updating (TF's spectral_norm does on every call): G runs in training mode."""
    layers = [m for m in G.modules() if isinstance(m, BatchStandardize)]
    for m in layers:
        m.accu_mean.zero_(), m.accu_var.zero_(), m.accu_count.zero_()
        m.accumulate = True
    G.train()
    gen, device = torch.Generator().manual_seed(seed), next(G.parameters()).device
    K, z_dim = G.embed_y.num_embeddings, G.chunk * G.num_chunks
    for _ in synced(range(num_batches), device):          # on XLA: one program, run per batch
        z = torch.randn(batch_size, z_dim, generator=gen).to(device)
        G(z, torch.randint(0, K, (batch_size,), generator=gen).to(device))
    for m in layers:
        m.accumulate = False
    G.eval()


@torch.no_grad()
def generate(G, z, y, rt: Runtime):
    """Images G(z, y) in [0, 1], (B, 3, R, R), on the CPU."""
    with rt.autocast():
        x = G(z, y).float()
    device_sync(rt.device)                  # on XLA: one compiled batch, run once per batch
    return x.cpu()


def generate_uint8(G, num: int, cfg: Config, rt: Runtime, batch_size: int = 256, seed: int = 0):
    """Yield (x uint8 (B, R, R, 3), y) batches: uniform labels, z ~ N(0, I), no truncation."""
    standing_statistics(G, cfg.standing_batches, seed + 1)
    gen, K = torch.Generator().manual_seed(seed), G.embed_y.num_embeddings
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        z = torch.randn(b, cfg.z_dim, generator=gen)
        y = torch.randint(0, K, (b,), generator=gen)
        x = generate(G, z.to(rt.device), y.to(rt.device), rt)
        yield (x * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(), y.numpy()


def save_grid(x, path: str, per_row: int = 8):   # x (N, 3, R, R) in [0, 1] -> one PNG
    x = (x * 255).round().clamp(0, 255).byte().view(-1, per_row, *x.shape[1:])  # (rows, 8, 3, R, R)
    Image.fromarray(x.permute(0, 3, 1, 4, 2).flatten(0, 1).flatten(1, 2).numpy()).save(path)


def evaluate_fid(G, cfg: Config, rt: Runtime) -> float:
    """FID of cfg.fid_samples samples of G_ema against the statistics in cfg.fid_stats."""
    import fid   # lazily: only runs that ask for FID need it
    ref = np.load(cfg.fid_stats)
    model = fid.load_inception(device=rt.device)
    images = (torch.from_numpy(x).permute(0, 3, 1, 2) for x, _ in
              generate_uint8(G, cfg.fid_samples, cfg, rt, seed=cfg.seed + 7))
    mu, sigma = fid.compute_statistics(synced(images, rt.device), model)   # a sync per batch
    return float(fid.frechet_distance(mu, sigma, ref['mu'], ref['sigma']))


def load_run(out: str, device: str = 'auto', ckpt: str = 'ckpt.pt', config=Config):
    """(cfg, G_ema, rt) from a run folder: config.json and the G_ema of `ckpt` (in `out`):
    ckpt.pt, best.pt (the lowest FID during training) or snapshots/step_XXXXXXX.pt."""
    for name in ('config.json', ckpt):
        if not os.path.exists(os.path.join(out, name)):
            raise ValueError(f'--out {out}: no {name} (is this a training output folder?)')
    with open(os.path.join(out, 'config.json')) as fh:
        cfg = config(**{**json.load(fh), 'device': device, 'out': out})
    rt = Runtime(cfg.device, cfg.precision)
    G, _ = build_models(cfg)
    G.load_state_dict(torch.load(os.path.join(out, ckpt), map_location='cpu',
                                 weights_only=True)['G_ema'])
    return cfg, G.to(rt.device), rt


def sample(out: str, num: int, to: str, device: str = 'auto', batch_size: int = 256,
           seed: int = 0, ckpt: str = 'ckpt.pt', config=Config):
    """Write `num` samples of G_ema as an .npz (x uint8 NHWC, y int64) or a folder of PNGs."""
    cfg, G, rt = load_run(out, device, ckpt, config)
    xs, ys = zip(*generate_uint8(G, num, cfg, rt, batch_size, seed))
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
    if to.endswith('.npz'):
        os.makedirs(os.path.dirname(os.path.abspath(to)), exist_ok=True)
        np.savez(to, x=x, y=y)
    else:
        os.makedirs(to, exist_ok=True)
        for i, (img, label) in enumerate(zip(x, y)):
            Image.fromarray(img).save(os.path.join(to, f'{i:06d}_class{label:04d}.png'))
    return x, y


# --- Command line: flags are the Config fields with dashes ----------------------------------------

# The embedded demo: S3GAN with 10% labels on the shapes set at 32x32, small enough for a laptop.
# NOTE (deviation): ch 16, G's last block 2 x ch wide (compare_gan: 4 x ch), batch 32, 1,200 G
# steps, Adam at 1e-3 for G and D, G_ema from the first step with decay 0.99, 500 label-stage
# steps (800 by default at 32), 20 batches of standing stats (eval_gan_lib.py: 3,200); for speed
# only: channels_last, the images drawn in this process. The measurements behind them (learning
# rates, widths, batch): examples/demo.py's docstring, beside the judges that made them.
DEMO = dict(method='s3gan', data='shapes', resolution=32, ch=16, g_mult=(4, 4, 4, 2),
            batch_size=32, steps=1200, lr_g=1e-3, lr_d=1e-3, ema_start=0, ema_decay=0.99,
            pretrain_steps=500, num_images=5000, labeled_fraction=0.1, out='runs/demo',
            log_every=100, sample_every=400, ckpt_every=300, standing_batches=20, num_workers=0,
            channels_last=True)


def with_data_classes(cfg: Config, dataset) -> Config:
    """Fill num_classes from the data set when the user left it at 0."""
    if cfg.num_classes:
        if dataset.num_classes > cfg.num_classes:
            raise ValueError(f'--num-classes {cfg.num_classes}: {cfg.data} has '
                             f'{dataset.num_classes} classes')
        return cfg
    if not (dataset.num_classes or cfg.clusters):
        raise ValueError(f'--num-classes: {cfg.data} has no labels; say how many classes '
                         f'(or --clusters) to use')
    return dataclasses.replace(cfg, num_classes=dataset.num_classes or cfg.clusters)


def config_parser(parser, config=Config):
    """One flag per field of `config` (Config or a subclass); its help is the field's comment."""
    comments = dict(re.findall(r'^    (\w+): \w+ = .*?#\s*(.*)$', ''.join(
        inspect.getsource(c) for c in config.__mro__[:-1][::-1]), re.MULTILINE))
    for f in dataclasses.fields(config):
        flag, kw = '--' + f.name.replace('_', '-'), dict(default=None)
        kw['help'] = f'{comments.get(f.name, "")} (default: {f.default!r})'.replace('%', '%%')
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type is tuple:
            parser.add_argument(flag, metavar='A,B,...', **kw,
                                type=lambda s: tuple(int(v) for v in s.split(',')))
        else:
            parser.add_argument(flag, type=type(f.default), **kw)
    return parser


def main(argv=None, prog='s3gan.py', config=Config, commands=None, run_demo=None):
    """The command line. bigbigan.py's is this one with its own Config subclass, commands
    ({name: (help, function of a config)}: their flags are the config's fields) and demo."""
    parser = argparse.ArgumentParser(prog=prog, description=sys.modules[
        config.__module__].__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command')
    commands = commands or {'train': ('train a GAN (runs label inference if needed)', train),
                            'infer-labels': ('the label stage alone (paper Sec. 3.1)',
                                             infer_labels)}
    for name, (text, _) in commands.items():
        config_parser(sub.add_parser(name, help=text), config)
    p = sub.add_parser('sample', help='write samples of a trained G_ema for fid.py')
    p.add_argument('--out', required=True, help='the training output folder')
    p.add_argument('--num', type=int, default=50000)
    p.add_argument('--to', required=True, help='FILE.npz or a folder for PNG files')
    p.add_argument('--device', default='auto')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--ckpt', default='ckpt.pt', help='in --out: ckpt.pt, best.pt (lowest FID) '
                   'or snapshots/step_XXXXXXX.pt')
    p = sub.add_parser('import-tf', help="compare_gan's weights (TF checkpoint or TF-Hub module)")
    p.add_argument('path', help='a checkpoint prefix or a TF-Hub module folder (with variables/)')
    p.add_argument('--out', required=True, help='the run folder to write')
    args = parser.parse_args(argv)

    def interrupt(signum, frame):   # a stop signal ends any stage as an error does
        raise TrainingInterrupted(f'stopped by {signal.Signals(signum).name}', signum)
    handlers = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.command == 'import-tf':   # compare_gan's weights: tools/compare_gan_weights.py
            return _tool('tools', 'compare_gan_weights').import_tf(args.path, args.out)
        if args.command == 'sample':
            sample(**{k: v for k, v in vars(args).items() if k != 'command'}, config=config)
            print(f'wrote {args.num} samples to {args.to}')
            return
        given = {k: v for k, v in vars(args).items() if k != 'command' and v is not None}
        if args.command is None:
            return (run_demo or demo)()
        commands[args.command][1](config(**given))
    except TrainingInterrupted as e:
        print(f'{prog}: {e.args[0]}', file=sys.stderr)
        sys.exit(128 + e.args[1])
    except (ValueError, OSError, TrainingDiverged) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    finally:
        [signal.signal(s, h) for s, h in handlers.items()]
        if torch.distributed.is_initialized():   # else gloo's threads abort the exit
            torch.distributed.destroy_process_group()


def _tool(folder: str, name: str):
    """The module folder/name.py (examples/, tools/), imported on demand: a tool, not the paper."""
    sys.modules.setdefault('s3gan', sys.modules[__name__])   # `python s3gan.py`: one module
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), folder))
    return __import__(name)


def demo(**overrides):
    """The demo and its report (judges, CAS, picture): examples/demo.py, a tool, not the paper."""
    return _tool('examples', 'demo').demo(**overrides)


if __name__ == '__main__':
    main()

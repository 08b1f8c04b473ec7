"""BigBiGAN: an encoder beside BigGAN, for representations learned without labels.

Donahue & Simonyan, "Large Scale Adversarial Representation Learning", NeurIPS 2019
(arXiv:1907.02544). An encoder E maps images to latents, a joint discriminator D scores
(image, latent) pairs: encoder pairs (x, E(x)) against generator pairs (G(z), z). The sibling of
s3gan.py: G, D's blocks, spectral norm, the data, the devices, the loop, checkpoints, sampling
and FID are s3gan's; this file adds E, D's parts F, H and J, the losses and the step.
No official training code exists: DeepMind released trained modules (TF-Hub
deepmind/bigbigan-resnet50, deepmind/bigbigan-revnet50x4) and a demo notebook (tensorflow/docs
site/en/hub/tutorials/bigbigan_with_tf_hub.ipynb). What the paper, the modules or the notebook
confirm cites them; every other detail is a `NOTE (choice)` with its reason.

    python bigbigan.py                                  # the demo: 32x32 shapes, E at 64, CPU
    python bigbigan.py train --data /imagenet/train --resolution 128 --precision bf16 \
        --out runs/bigbigan128                          # one GPU (E reads 256x256)
    torchrun --nproc_per_node=8 bigbigan.py train ...   # many GPUs (--batch-size is global)
    PJRT_DEVICE=TPU python bigbigan.py train --device xla ...
    python bigbigan.py probe --out runs/bigbigan128 --labeled-fraction 0.1   # linear probe
    python bigbigan.py sample --out runs/bigbigan128 --num 50000 --to samples.npz
    python fid.py samples.npz imagenet_val_stats.npz
    python s3gan.py train --method s3gan --encoder runs/bigbigan128 ...  # labels from E

Paper -> code:
    Sec. 2 encoder E (stochastic) .......... Encoder, global_batch_norms
    Sec. 2 joint discriminator F, H, J ..... JointDiscriminator, ImageF, MLP
    Sec. 2 losses l_D, l_EG ................ loss_d, loss_eg
    Sec. 3.1 high-res E, unary terms, E lr . encoder_input, BigBiGANConfig, build_training
    training (D steps, E/G step, EMA) ...... train_step, train (s3gan.train's loop)
    Sec. 3.2 linear probe (avepool, BN+CReLU) encoder_features, linear_probe, probe

Parameter counts (128x128, ch 96, ResNet-50 E at 256, MLPs 4 x 2048; the tests check them):
G 70,306,116 (BigGAN's with one class); E 40,777,520 (23,500,352 in ResNet-50);
D 119,218,468 (F 86,446,370, H 12,836,864, J 19,931,136).
"""

import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import s3gan
from s3gan import SNLinear

# --- Config: s3gan's fields and BigBiGAN's own ------------------------------------------------


@dataclass
class BigBiGANConfig(s3gan.Config):
    method: str = 'single-label'       # G and D unconditional: BigGAN with one class (Sec. 2)
    out: str = 'runs/bigbigan'         # run folder (probe: the run whose E is probed)
    lr_e_factor: float = 10.0          # E's lr = lr_g x this (Table 1 "up Encoder LR"; 10 ours)
    high_res_e: bool = True            # E reads 2R x 2R, D its 2x2 average pool (Sec. 3.1, Table 1)
    unary: bool = True                 # the unary scores s_x and s_z (Sec. 2; Table 1 ablates them)
    mlp_width: int = 0                 # width of E's head, H and J (ours); 0: 2048 / 96 x ch
    mlp_depth: int = 4                 # layers of each: a linear map, then residual ones (ours)
    probe_features: str = 'bn_crelu'   # linear probe input: avepool or bn_crelu (Sec. 3.2)
    probe_steps: int = 500             # full-batch Adam steps of the linear probe (ours)

    def __post_init__(self):
        super().__post_init__()
        if self.method != 'single-label':
            raise ValueError(f'--method {self.method}: BigBiGAN is unconditional (single-label)')
        if self.high_res_e and 2 * self.resolution not in s3gan.ARCH:
            raise ValueError(f'--resolution {self.resolution}: the high-res E would read '
                             f'{2 * self.resolution}x{2 * self.resolution}; use --no-high-res-e')
        if self.probe_features not in ('avepool', 'bn_crelu'):
            raise ValueError(f'--probe-features: unknown {self.probe_features!r}; choose avepool '
                             f'or bn_crelu')
        # NOTE (choice): at 128 and ch 96 the MLPs are 2048 wide (ResNet-50's feature size)
        self.mlp_width = self.mlp_width or 2048 * self.ch // 96


s3gan.RESUMABLE.update({'probe_features', 'probe_steps'})   # the probe's, not in training's math


def encoder_resolution(cfg: BigBiGANConfig) -> int:
    return 2 * cfg.resolution if cfg.high_res_e else cfg.resolution


def encoder_input(x_hi, cfg: BigBiGANConfig):
    """What D's image branch reads of E's input: the 2x2 average pool of the high-res image
    (the released modules: avg_pool(x, 2, 2, 'SAME') from 256 to 128), else the image itself."""
    return F.avg_pool2d(x_hi, 2) if cfg.high_res_e else x_hi


# --- Encoder E (Sec. 2; the released modules) -------------------------------------------------

def global_batch_norms(net: nn.Module) -> nn.Module:
    """Every nn.BatchNorm2d of `net` replaced, in place, by s3gan's BatchNorm.
    NOTE (choice): moments of the global batch in float32 (one process equals many under
    torchrun; nn.SyncBatchNorm refuses CPU tensors) and standing statistics for evaluation, as
    G's batch norms; same parameters (gamma 1, beta 0), no running averages."""
    for name, m in net.named_children():
        if isinstance(m, nn.BatchNorm2d):
            setattr(net, name, s3gan.BatchNorm(m.num_features, m.eps))
        else:
            global_batch_norms(m)
    return net


class MLP(nn.Module):
    """A linear map to `width`, then `depth - 1` pre-activation residual layers h + W relu(h).
    NOTE (choice): the paper gives no sizes we can confirm. The identity path keeps every
    gradient open: with ReLU after each layer instead, E's head died whole in our demo (every
    unit of its first layer negative: E(x) stopped depending on x). `linear` is SNLinear in D
    (spectral norm throughout, as BigGAN's D), nn.Linear in E (batch norm, no spectral norm)."""

    def __init__(self, in_dim: int, width: int, depth: int, linear=SNLinear):
        super().__init__()
        self.layers = nn.ModuleList(linear(in_dim if i == 0 else width, width)
                                    for i in range(depth))

    def forward(self, h):                                          # (B, in_dim) -> (B, width)
        h = self.layers[0](h)
        for layer in self.layers[1:]:
            h = h + layer(F.relu(h))
        return h


class Encoder(nn.Module):
    """E(x) = mu + sigma * eps, eps ~ N(0, I), sigma = softplus(sigma_hat): a ResNet trunk (the
    paper's ResNet-50 at 128 and up; the label stage's small ResNet below), an MLP, and a linear
    layer giving mu and sigma_hat (Sec. 2 and the released modules; no KL term). Returns
    (z, mu, sigma), each (B, z_dim); `features` is the trunk's average-pooled h (avepool_feat)."""

    def __init__(self, resolution: int, z_dim: int, width: int, depth: int):
        super().__init__()
        self.trunk = global_batch_norms(s3gan.feature_net(resolution, 0))
        del self.trunk.rot_head                  # the label stage's head: E has none
        self.mlp = MLP(self.trunk.bn.weight.numel(), width, depth, nn.Linear)
        self.mu_sigma = nn.Linear(width, 2 * z_dim)

    def features(self, x):                       # (B, 3, R_E, R_E) in [0, 1] -> (B, C)
        return self.trunk(x)                     # the trunk reads x in [-1, 1] (x * 2 - 1)

    def forward(self, x):
        mu, sigma_hat = self.mu_sigma(self.mlp(self.features(x))).float().chunk(2, dim=1)
        sigma = F.softplus(sigma_hat)
        return mu + sigma * torch.randn_like(mu), mu, sigma


# --- Joint discriminator D(x, z) = (s_xz, s_x, s_z) (Sec. 2) -----------------------------------

class ImageF(s3gan.Discriminator):
    """F: BigGAN's D trunk without classes, x (B, 3, R, R) in [0, 1] -> h_x (B, C) sum-pooled;
    final_fc is theta_x, the unary score s_x = theta_x . h_x + b. NOTE (choice): the paper says
    F is a ConvNet; BigGAN's D trunk is the reading that shares the backbone."""

    def __init__(self, ch: int, mult: tuple, attn_block: int):
        super().__init__(1, ch, mult, attn_block, rotation_head=False, classifier_head=False)
        del self.embed_y                         # no projection: D has no classes

    def forward(self, x):
        return self.features(x)


class JointDiscriminator(nn.Module):
    """D(x, z): F on the image, H (an MLP) on the latent, J (an MLP) on both; returns the scores
    (3, B) = s_xz, s_x, s_z (Sec. 2; the released modules' three scores), or (1, B) = s_xz
    without the unary terms (Table 1's ablation)."""

    def __init__(self, ch: int, mult: tuple, attn_block: int, z_dim: int, width: int,
                 depth: int, unary: bool):
        super().__init__()
        self.F, self.H = ImageF(ch, mult, attn_block), MLP(z_dim, width, depth)   # the paper's
        self.J = MLP(mult[-1] * ch + width, width, depth)                           # F, H, J
        self.theta_xz = SNLinear(width, 1)
        self.theta_z = SNLinear(width, 1) if unary else None
        if not unary:
            del self.F.final_fc                  # s_x is not computed: no unused weights (DDP)

    def forward(self, x, z):                     # x (B, 3, R, R) in [0, 1], z (B, z_dim)
        h_x, h_z = self.F(x), self.H(z)                                      # (B, C), (B, W)
        s_xz = self.theta_xz(self.J(torch.cat([h_x, h_z.to(h_x.dtype)], 1)))
        if self.theta_z is None:
            return s_xz.t()
        return torch.cat([s_xz, self.F.final_fc(h_x), self.theta_z(h_z)], 1).t()   # (3, B)


def build_models(cfg: BigBiGANConfig):
    """(G, E, D) initialised: G and D orthogonal as BigGAN's (compare_gan); NOTE (choice): E
    PyTorch's defaults (a classifier's ResNet, not BigGAN's).
    G is s3gan's Generator with one class, fed y = 0: its class embedding is one learned
    vector, the same for every z (the released G's constant, label-free class vector)."""
    G = s3gan.Generator(cfg.z_dim, 1, cfg.ch, cfg.g_mult, cfg.g_attn, cfg.embed_dim, cfg.bn_eps)
    E = Encoder(encoder_resolution(cfg), cfg.z_dim, cfg.mlp_width, cfg.mlp_depth)
    D = JointDiscriminator(cfg.ch, cfg.d_mult, cfg.d_attn, cfg.z_dim, cfg.mlp_width,
                           cfg.mlp_depth, cfg.unary)
    s3gan.init_weights(G)
    s3gan.init_weights(D)
    return G, E, D


# --- Losses (Sec. 2; as the authors' notebook computes them) ----------------------------------

def loss_d(s_enc, s_gen):
    """l_D: each score hinged separately, encoder pairs up, generator pairs down, the means taken
    over the scores concatenated along the batch (the notebook):
    mean(relu(1 - s(x, E(x)))) + mean(relu(1 + s(G(z), z))). s_enc, s_gen (S, B), S = 3 scores
    (s_xz, s_x, s_z) or 1. The paper sums the per-score terms: 3x this, Adam does not mind."""
    return s3gan.hinge_loss_d(s_enc.flatten(), s_gen.flatten())


def loss_eg(s_enc, s_gen):
    """l_EG, linear (not hinged): E's loss mean(s(x, E(x))) and G's mean(-s(G(z), z)) over the
    concatenated scores. E gets no gradient from s_x (a function of x alone), G none from s_z."""
    return s_enc.mean(), s3gan.hinge_loss_g(s_gen.flatten())


# --- Training step: D steps on fresh data, then one E/G step, then G's EMA --------------------

def train_step(models, opts, batches, cfg: BigBiGANConfig, rt: s3gan.Runtime, ema_decay: float):
    """One global step; s3gan.train_step's contract (a dict of scalar tensors, no host sync).

    models = (G, D, G_ema, G_train, D_train, E, E_train); opts = (the E/G Adam, D's Adam).
    batches: cfg.disc_iters (x, y, y_true) real batches at E's resolution; labels are unused.
    NOTE (choice): cfg.disc_iters D steps per E/G step, each on fresh data (BigGAN's 2; the
    paper does not say), and the E/G step reads the last D step's images with fresh eps and z
    (the notebook computes D's and E/G's losses on one batch)."""
    G, D, G_ema, G_train, D_train, E, E_train = models
    opt_EG, opt_D = opts
    stats = {}
    for x_hi, y, _ in batches:                   # x_hi (B, 3, R_E, R_E) in [0, 1]
        x_real, B = encoder_input(x_hi, cfg), x_hi.shape[0]                 # (B, 3, R, R)
        z, y = torch.randn(B, cfg.z_dim, device=x_hi.device), torch.zeros_like(y)   # G's y = 0
        with torch.no_grad(), rt.autocast():
            x_fake, z_enc = G(z, y), E(x_hi)[0]
        with rt.autocast():                      # one D call on encoder then generator pairs
            s = D_train(torch.cat([x_real, x_fake.to(x_real.dtype)]), torch.cat([z_enc, z]))
        s = s.float()                                                        # (S, 2B)
        loss = loss_d(s[:, :B], s[:, B:])
        opt_D.zero_grad(set_to_none=True)
        loss.backward()
        opt_D.step()
    stats['loss_d'] = loss.detach()
    for name, s_enc, s_gen in zip(('s_xz', 's_x', 's_z'), s[:, :B], s[:, B:]):
        stats[f'{name}_enc'], stats[f'{name}_gen'] = s_enc.mean(), s_gen.mean()

    z = torch.randn(B, cfg.z_dim, device=x_hi.device)
    D.requires_grad_(False)                      # no D gradients (nor DDP hooks) in E/G's step
    with rt.autocast():
        x_fake = G_train(z, y)
        z_enc, mu, sigma = E_train(x_hi)
        s = D(torch.cat([x_real, x_fake.to(x_real.dtype)]), torch.cat([z_enc, z])).float()
    stats['loss_e'], stats['loss_g'] = loss_eg(s[:, :B], s[:, B:])
    opt_EG.zero_grad(set_to_none=True)
    (stats['loss_e'] + stats['loss_g']).backward()
    opt_EG.step()
    D.requires_grad_(True)
    s3gan.ema_update(G_ema, G, ema_decay)
    stats['sigma_e'] = sigma.detach().mean()     # E's mean sigma, and the spread of mu over
    stats['mu_spread'] = mu.detach().std(0).mean()   # images: 0 when E(x) ignores x
    return {k: v.detach().float() for k, v in stats.items()}


def build_training(cfg: BigBiGANConfig, rt: s3gan.Runtime):
    """s3gan.train's build hook: (G, D, G_ema, opt_EG, opt_D, ('E', E)) on the device, the same
    initial weights in every process. E and G share one Adam, E's group at lr_g x lr_e_factor.
    NOTE (choice): BigGAN's learning rates, Adam settings and G_ema (0.9999 from step 40k), and
    s3gan's 250k steps (secondary sources quote 500k and 1M): the paper's are unconfirmed."""
    torch.manual_seed(cfg.seed)
    G, E, D = build_models(cfg)
    G_ema = copy.deepcopy(G).eval()
    G, E, D, G_ema = (m.to(rt.device) for m in (G, E, D, G_ema))
    if cfg.channels_last:
        G, E, D = (m.to(memory_format=torch.channels_last) for m in (G, E, D))
    if cfg.compile and rt.type != 'xla':
        G.compile(dynamic=False), E.compile(dynamic=False), D.compile(dynamic=False)
    rt.manual_seed(cfg.seed)
    opt_EG = rt.adam([dict(params=G.parameters()),
                      dict(params=E.parameters(), lr=cfg.lr_g * cfg.lr_e_factor)], cfg.lr_g, cfg)
    return G, D, G_ema, opt_EG, rt.adam(D.parameters(), cfg.lr_d, cfg), ('E', E)


def encoder_data(cfg: s3gan.Config, resolution: int, augment: bool = True):
    """cfg's data set at E's resolution (the same images, index by index, as at G's)."""
    return s3gan.make_dataset(s3gan.Config(resolution=resolution, **{k: getattr(cfg, k) for k in (
        'data', 'num_images', 'seed', 'skip_bad_images')}), augment)


def train(cfg: BigBiGANConfig):
    """s3gan.train with BigBiGAN's data (at E's resolution), models and step. NOTE (choice):
    s3gan's augmentation (a square crop of 50-100% of the area, no flip), not the paper's
    ResNet-style random-size crop and flip: the same images as S3GAN's for comparisons."""
    return s3gan.train(cfg, data=lambda c: encoder_data(c, encoder_resolution(c)),
                       build=build_training, step_fn=train_step)


# --- The representation, measured: E's features and a linear probe (Sec. 3.2) ----------------

def load_config(run: str) -> BigBiGANConfig:
    path = os.path.join(run, 'config.json')
    if not os.path.exists(path):
        raise ValueError(f'{run}: no config.json (is this a bigbigan.py run folder?)')
    with open(path) as fh:
        return BigBiGANConfig(**json.load(fh))


@torch.no_grad()
def encoder_features(run: str, cfg: s3gan.Config, device, kind: str = 'bn_crelu',
                     standing_batches: int = 20) -> torch.Tensor:
    """(N, C) features of the run's E for every image of cfg's data (central crops, at E's
    resolution), E in eval mode: its batch norms with standing statistics over
    `standing_batches` random batches of 250 real images (as G's, over sampled ones).
    kind: 'avepool', the trunk's average-pooled output (the released avepool_feat), or
    'bn_crelu', [ReLU(BN(h)), ReLU(-BN(h))] (bn_crelu_feat, the paper's best). NOTE (choice):
    BN here standardises each feature with its mean and variance over the N images."""
    run_cfg = load_config(run)
    E = Encoder(encoder_resolution(run_cfg), run_cfg.z_dim, run_cfg.mlp_width, run_cfg.mlp_depth)
    E.load_state_dict(torch.load(os.path.join(run, 'ckpt.pt'), map_location='cpu',
                                 weights_only=True)['E'])
    E = E.to(device)
    ds = encoder_data(cfg, encoder_resolution(run_cfg), augment=False)
    layers = [m for m in E.modules() if isinstance(m, s3gan.BatchStandardize)]
    for m in layers:                             # as s3gan.standing_statistics, on real images
        m.accu_mean.zero_(), m.accu_var.zero_(), m.accu_count.zero_()
        m.accumulate = True
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))
    for b in order[:250 * standing_batches].split(250):
        E.features(torch.stack([ds[i][0] for i in b.tolist()]).to(device))
    for m in layers:
        m.accumulate = False
    E.eval()
    h = torch.cat([E.features(x.to(device)) for x, _ in DataLoader(ds, 250)]).float()
    if kind == 'avepool':
        return h
    h = (h - h.mean(0)) * (h.var(0, unbiased=False) + 1e-5).rsqrt()
    return torch.cat([F.relu(h), F.relu(-h)], 1)


def linear_probe(h, y, seed: int = 0, steps: int = 500) -> nn.Linear:
    """A linear classifier on features h (n, C) with labels y (n,): multinomial logistic
    regression, full-batch Adam (lr 1e-2) with weight decay 1e-4, from zeros. NOTE (choice):
    the paper's probes train on ImageNet's 1.28M labels with SGD; this fits a few hundred."""
    y = torch.as_tensor(y, device=h.device)
    torch.manual_seed(seed)
    head = nn.Linear(h.shape[1], int(y.max()) + 1).to(h.device)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(head(h), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.requires_grad_(False)


def probe(cfg: BigBiGANConfig) -> dict:
    """`python bigbigan.py probe --out RUN`: fits a linear classifier on E's features of the
    run's data with cfg.labeled_fraction of the labels (drawn as s3gan's label stage draws them,
    from --seed) and reports its accuracy on the rest; writes RUN/probe.json."""
    run_cfg = dataclasses.replace(load_config(cfg.out), seed=cfg.seed)
    labels = np.asarray(s3gan.make_dataset(run_cfg).labels)
    if (labels < 0).all():
        raise ValueError(f'--out {cfg.out}: its data {run_cfg.data} has no labels to probe with')
    device = s3gan.pick_device(cfg.device)
    labeled = s3gan.select_labeled(labels, cfg.labeled_fraction, cfg.seed)
    h = encoder_features(cfg.out, run_cfg, device, cfg.probe_features)
    head = linear_probe(h[labeled], labels[labeled], cfg.seed, cfg.probe_steps)
    rest = ~labeled & (labels >= 0)
    accuracy = float((head(h[rest]).argmax(1).cpu().numpy() == labels[rest]).mean())
    result = dict(features=cfg.probe_features, dims=h.shape[1], labeled=int(labeled.sum()),
                  labeled_fraction=cfg.labeled_fraction, seed=cfg.seed, accuracy=accuracy)
    print(f'linear probe on E ({cfg.probe_features}, {h.shape[1]} features), '
          f'{labeled.sum()} labeled images: accuracy {accuracy:.4f} on the other {rest.sum()}')
    with open(os.path.join(cfg.out, 'probe.json'), 'a') as fh:
        fh.write(json.dumps(result) + '\n')
    return result


# --- Command line and demo ---------------------------------------------------------------------

# The demo: s3gan's demo settings (32x32 shapes, ch 16, batch 32, 1,200 steps, Adam at 1e-3),
# unconditional, E at 64x64. NOTE (choice): MLPs 4 x 256 wide.
DEMO = dict(s3gan.DEMO, method='single-label', out='runs/bigbigan_demo', mlp_width=256)


def demo(**overrides):
    cfg = BigBiGANConfig(**{**DEMO, **overrides})
    print(f'BigBiGAN demo: {cfg.data} at {cfg.resolution}x{cfg.resolution} (E at '
          f'{encoder_resolution(cfg)}), {cfg.steps} steps, output in {cfg.out}/', flush=True)
    train(cfg)
    for kind in ('avepool', 'bn_crelu'):
        probe(dataclasses.replace(cfg, probe_features=kind))


def main(argv=None):
    s3gan.main(argv, 'bigbigan.py', BigBiGANConfig, run_demo=demo, commands={
        'train': ('train BigBiGAN (E, G and the joint D)', train),
        'probe': ('a linear classifier on E\'s features, --labeled-fraction of the labels', probe)})


if __name__ == '__main__':
    main()

"""compare_gan's TensorFlow weights in s3gan.py's modules: `python s3gan.py import-tf`.

A compare_gan checkpoint or a TF-Hub module of the paper's released S3GAN generators becomes a
run folder (config.json, ckpt.pt) that `s3gan.py sample`, fid.py and `s3gan.py train --out` read.
load_compare_gan is the one converter from TF names and layouts; the golden tests check ours
against compare_gan's own outputs through it (tools/make_compare_gan_golden.py,
docs/compare_gan.md).

It lives here, not in s3gan.py, because it reads another code base's checkpoint format, not the
paper: s3gan.py's `import-tf` imports it on demand, as `python s3gan.py` does examples/demo.py.

    pip install tensorflow-cpu      # for import-tf only
    python s3gan.py import-tf s3gan_10_128x128/ --out runs/s3gan10   # an unpacked TF-Hub module
"""
import dataclasses
import json
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s3gan import ARCH, Config, Runtime, build_models, build_training, save_checkpoint  # noqa: E402

# compare_gan's scopes (resnet_biggan.py, resnet_ops.py, arch_ops.py, gans/s3gan.py) as our
# module names; B<i> is blocks.<i-1>. TF_IGNORED: not weights (eval_gan_lib's switch, Adam, steps)
TF_SCOPES = dict(generator='G', discriminator='D', up_conv1='conv1', same_conv1='conv1',
                 down_conv2='conv2', same_conv2='conv2', up_conv_shortcut='shortcut',
                 down_conv_shortcut='shortcut', same_conv_shortcut='shortcut', condition='',
                 non_local_block='attn', conv2d_theta='theta', conv2d_phi='phi', conv2d_g='g',
                 conv2d_attn_g='o', final_norm='bn_out', final_conv='conv_out', kernel='weight',
                 accu='standardize', accu_variance='accu_var', accu_counter='accu_count', u_var='u',
                 embedding_fc='embed_y', discriminator_projection='D.embed_y', score_classify=
                 'rotation', discriminator_rotation='D', discriminator_predictor='D',
                 predictor_linear='classifier')
TF_IGNORED = re.compile(r'(update_accus|/Adam(_\d+)?|beta[12]_power|global_step)$')


def tf_to_ours(name: str) -> str:
    """'module/generator/B2/bn1/condition/gamma/kernel/u_var' -> 'G.blocks.1.bn1.gamma.u'; a
    scope before generator/ or discriminator*/ (TF-Hub modules may have one) is dropped."""
    parts = re.sub(r'^(.*?/)?(?=(generator|discriminator)\w*/)', '', name).replace(
        'kernel/u_var', 'u_var').split('/')
    parts[-1] = dict(gamma='weight', beta='bias').get(parts[-1], parts[-1])   # final_norm's
    return '.'.join(p for p in (f'blocks.{int(p[1:]) - 1}' if re.fullmatch(r'B\d+', p) else
                                TF_SCOPES.get(p, p) for p in parts) if p)


def load_compare_gan(arrays: dict, ema: bool = True):
    """(cfg, G state, D state) from compare_gan's variables {TF name: array} (resnet_biggan +
    S3GAN): heads give the method, shapes the sizes; EMA shadows (ModularGAN.g_use_ema) replace
    G's weights unless `ema` is False; no D variable (the TF-Hub export keeps G's only): D None.
    A variable without a place here, or one of ours left without a value, is an error."""
    names = {tf_to_ours(n.removesuffix('/ExponentialMovingAverage')): n for n in sorted(
        arrays, key=lambda n: n.endswith('Average'))   # our key -> TF name; EMA last: it wins
        if not TF_IGNORED.search(n) and (ema or not n.endswith('/ExponentialMovingAverage'))}
    has_d = any(k.startswith('D.') for k in names)
    shape = {k: arrays[n].shape for k, n in names.items()}
    n_g = sum(bool(re.fullmatch(r'G\.blocks\.\d+\.conv1\.weight', k)) for k in names)
    res = next((r for r, a in ARCH.items() if len(a['g_mult']) == n_g + 1), 0)
    if not res or 'G.fc_noise.weight' not in shape:
        raise ValueError(f'not a compare_gan resnet_biggan generator: {n_g} G blocks found')
    (chunk, seed_width), arch = shape['G.fc_noise.weight'], ARCH[res]
    ch = seed_width // 16 // arch['g_mult'][0]    # attention: after the first block that wide
    attn = lambda net, mult: next((i for i, m in enumerate(mult) if i and m * ch == shape.get(
        f'{net}.attn.theta.weight', [0] * 3)[2]), 0 if net == 'G' or has_d else -1)  # noqa: E731
    method = {(1, 1): 's3gan-co', (1, 0): 's3gan', (0, 1): 's2gan-co', (0, 0): 's2gan'}[
        'D.rotation.weight' in names, 'D.classifier.weight' in names] if has_d else 's3gan'
    cfg = Config(method=method, resolution=res, ch=ch, num_classes=shape['G.embed_y.weight'][0],
                 embed_dim=shape['G.embed_y.weight'][1], z_dim=chunk * len(arch['g_mult']),
                 g_attn=attn('G', arch['g_mult']), d_attn=attn('D', (0,) + arch['d_mult']))
    states, bad = dict(zip('GD', (m.state_dict() for m in build_models(cfg)))), []
    for key, name in names.items():
        a, (net, _, k) = np.asarray(arrays[name], np.float32), key.partition('.')
        a = (a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.reshape(-1) if k.endswith('.u')
             else a.T if a.ndim == 2 and key != 'G.embed_y.weight' else a)   # HWIO, (in, out)
        if key.startswith('G.fc_noise.') and len(a) == seed_width:   # rows (4, 4, C) -> (C, 4, 4)
            a = a.reshape(16, seed_width // 16, -1).swapaxes(0, 1).reshape(a.shape)
        if k in states.get(net, {}) and states[net][k].shape == a.shape:
            states[net][k] = torch.from_numpy(np.ascontiguousarray(a))
        else:
            bad.append(f'{name} {arrays[name].shape} has no place in ours')
    bad += [f'our {n}.{k} has no value' for n, st in states.items() for k in st
            if f'{n}.{k}' not in names and (n == 'G' or has_d)]
    if bad:
        raise ValueError(f'compare_gan checkpoint vs our {cfg.method} at {res}x{res}, ch {ch}: '
                         f'{"; ".join(bad[:8])}' + f' (+{len(bad) - 8} more)' * (len(bad) > 8))
    return cfg, states['G'], states['D'] if has_d else None


def import_tf(path: str, out: str):
    """A compare_gan checkpoint or TF-Hub module folder -> a run folder (config.json, ckpt.pt)
    for `sample`, fid.py and `train --out`; G_ema from the EMA shadows where there are."""
    try:
        import tensorflow as tf   # only here: TF's checkpoint format
    except ImportError:
        raise ValueError('import-tf needs TensorFlow: pip install tensorflow-cpu') from None
    if os.path.exists(os.path.join(path, 'variables', 'variables.index')):   # a TF-Hub module
        path = os.path.join(path, 'variables', 'variables')
    reader = tf.train.load_checkpoint(path)
    arrays = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}
    (cfg, G_state, D_state), rt = load_compare_gan(arrays, ema=False), Runtime('cpu')
    _, D, _, opt_G, opt_D = build_training(dataclasses.replace(cfg, device='cpu'), rt)  # new Adam
    save_checkpoint(os.path.join(out, 'ckpt.pt'), dict(   # no D variables: ours, initialised
        G=G_state, G_ema=load_compare_gan(arrays)[1], D=D_state or D.state_dict(),
        opt_G=opt_G.state_dict(), opt_D=opt_D.state_dict(), step=0, rng=[rt.rng_state()]))
    with open(os.path.join(out, 'config.json'), 'w') as fh:     # only what the weights fix
        json.dump({k: getattr(cfg, k) for k in ('method', 'resolution', 'ch', 'num_classes',
                   'z_dim', 'embed_dim', 'g_mult', 'd_mult', 'g_attn', 'd_attn')}, fh, indent=1)
    print(f'{path} -> {out}: {cfg.method} {cfg.resolution}px' + ', G only' * (not D_state))

"""Golden outputs of the official S3GAN code (google/compare_gan), for test_s3gan.py.

Run by hand; the tests only read what it writes (tools/golden/compare_gan_{32,128}.npz), so CI
needs no TensorFlow. It needs tensorflow-cpu, gin-config, absl-py, numpy and a checkout of
google/compare_gan (tried with TF 2.21, gin-config 0.5, compare_gan at 19922d3):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu gin-config absl-py numpy
    git clone https://github.com/google/compare_gan /tmp/compare_gan
    /tmp/tfenv/bin/python tools/make_compare_gan_golden.py --compare-gan /tmp/compare_gan
    # and, with torch and pillow installed in that environment too (pip install torch pillow):
    /tmp/tfenv/bin/python tools/make_compare_gan_golden.py --compare-gan /tmp/compare_gan \
        --check-import runs/golden_import     # TF checkpoint -> import-tf -> sample == compare_gan

compare_gan is written for TF 1.x; four shims, applied here and never to its files, let it run
under TF 2.x: gin 0.5 renamed configurable(blacklist=, whitelist=) to denylist/allowlist;
tensorflow.contrib is gone, so tpu_function.get_tpu_context() (one device, no shards) and
tf.contrib.tpu.cross_replica_sum (identity) are stubbed; tf.layers' pools are gone with Keras 3
(tf.nn's pools do the same); and `import tensorflow as tf` in compare_gan means tf.compat.v1 with
v2 behaviour disabled. tensorflow_hub, tensorflow_gan, scipy.misc and compare_gan.test_utils are
imported by modules we use but not needed by the parts we call: empty stand-ins (the hub one
records the outputs that ModularGAN._module_fn hands to hub.add_signature).

Everything is built through compare_gan's own functions: the S3GAN class (gans/s3gan.py) with
resnet_biggan's Generator and Discriminator, S3GAN.discriminator_with_additonal_heads (projection,
rotation and classifier heads: S3GAN.project_y and use_predictor, the arch projection off),
S3GAN.create_loss (hinge, rotation, co-training class loss) and ModularGAN._module_fn, the TF-Hub
export's generator, which reads the EMA shadows through its custom getter. Not called: the
Estimator/TPU training loop (ModularGAN.model_fn) and the optimizers; instead the script runs the
loss code twice as model_fn's D and G sub-steps do (each with its own z and fake labels, from the
same weights, since no optimizer step is taken) and takes tf.gradients of d_loss with respect to
D's variables and of g_loss with respect to G's, the var_lists the optimizers get. Standing
statistics are eval_gan_lib._update_bn_accumulators' procedure (set every accu/update_accus to 1,
run the generator, set them to 0), written out here: that function runs a generator tensor
without feeds (evaluate_tfhub_module draws z inside the graph), and we feed fixed batches.

Each configuration starts from the same state S0: compare_gan's initialisers (orthogonal kernels,
glorot projection, random u), then biases, BN gains/offsets and attention gains set to random
values (they start at 0 or 1), every kernel's outputs scaled by U(0.5, 1.5) plus noise (so no
kernel is orthogonal: for an orthogonal square W both sides of the power iteration give the same
u), and EMA shadows = weights + noise, so that every parameter shows. The real images are blocky
(4x4 random cells plus 30% pixel noise), so the rotation and class losses depend on which rows
they are computed on.
Weights are rounded to float16 values (stored as float16, exact), outputs and gradients float32.
The .npz holds: var/<TF name> (S0: every variable, u_var, accu_*, EMA shadows); the inputs x_real
(uint8, NHWC, /255 gives the float images), y_real (-1: unlabeled), z1, y1, z2, y2, z_accu,
y_accu, z_eval, y_eval; phase F (from S0): g_images (G(z1, y1), training mode, NHWC), d_logits,
d_rot_logits, d_cls_logits (the D heads on x_real, y_real); phase L (from S0): d_loss with
grad_d/<name> (D sub-step: z1, y1), then g_loss with grad_g/<name> (G sub-step: z2, y2),
their parts d_loss_rot, d_loss_cls, g_loss_rot (as create_loss logs them) and u_after/<name>; phase E (from S0): the EMA generator in evaluation mode after standing statistics
over the z_accu/y_accu batches, eval_images = G_ema(z_eval, y_eval), accu_after/<name>.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

# Small models of the two layouts, attention in G and D. At 128, ch 4 is as narrow as G's default
# attention (B4, 2 ch wide: C/8 = 1) allows; D's default B1 would be 4 wide (C/8 = 0), so D's
# attention is after B2 (8 wide). At 32 G has no attention by default: here after B1. The 32
# config makes G's CBN maps square (z chunk 16 + embedding 16 = 32 = G's width), where the side
# u lives on is a choice ("auto": the left one).
CONFIGS = {
    32: dict(ch=8, num_classes=10, z_dim=64, embed_dim=16, g_attn='B1', d_attn='B1', batch=16,
             rotated_batch_fraction=2, eval_batch=8),
    128: dict(ch=4, num_classes=3, z_dim=60, embed_dim=16, g_attn='B4', d_attn='B2', batch=4,
              rotated_batch_fraction=1, eval_batch=2),
}
STANDING_BATCHES = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_compare_gan(path: str):
    """compare_gan's modules under TF 2.x, with the four shims (module docstring)."""
    import gin
    import tensorflow as tf2
    tf = tf2.compat.v1
    tf.disable_v2_behavior()
    configurable = gin.configurable

    def renamed(*args, **kw):   # gin 0.5: blacklist -> denylist, whitelist -> allowlist
        for old, new in (('blacklist', 'denylist'), ('whitelist', 'allowlist')):
            if old in kw:
                kw[new] = kw.pop(old)
        return configurable(*args, **kw)
    gin.configurable = renamed
    tpu_function = types.ModuleType('tpu_function')
    tpu_function.get_tpu_context = lambda: types.SimpleNamespace(number_of_shards=None)
    for name in ('contrib', 'contrib.tpu', 'contrib.tpu.python', 'contrib.tpu.python.tpu'):
        sys.modules['tensorflow.' + name] = types.ModuleType('tensorflow.' + name)
    sys.modules['tensorflow.contrib.tpu.python.tpu'].tpu_function = tpu_function
    sys.modules['tensorflow.contrib.tpu.python.tpu.tpu_function'] = tpu_function
    tf.contrib = types.SimpleNamespace(summary=types.SimpleNamespace(scalar=None), tpu=types.SimpleNamespace(
        cross_replica_sum=lambda x, *args, **kw: x))
    tf.layers = types.SimpleNamespace(
        max_pooling2d=lambda inputs, pool_size, strides: tf.nn.max_pool2d(
            inputs, pool_size, strides, 'VALID'),
        average_pooling2d=lambda inputs, pool_size, strides: tf.nn.avg_pool2d(
            inputs, pool_size, strides, 'VALID'))
    sys.modules['tensorflow'] = tf
    hub = types.ModuleType('tensorflow_hub')
    hub.signatures = []
    hub.add_signature = lambda inputs, outputs: hub.signatures.append((inputs, outputs))
    sys.modules['tensorflow_hub'] = hub
    for name in ('tensorflow_gan', 'compare_gan.test_utils', 'scipy', 'scipy.misc'):
        if name.startswith('scipy'):
            try:
                __import__(name)
                continue
            except ImportError:
                pass
        sys.modules[name] = types.ModuleType(name)
    sys.modules['compare_gan.test_utils'].Generator = None
    sys.modules['compare_gan.test_utils'].Discriminator = None
    sys.path.insert(0, path)
    from compare_gan.gans.s3gan import S3GAN
    return tf, gin, hub, S3GAN


def build(tf, gin, hub, S3GAN, resolution: int, c: dict):
    """The graph: placeholders, S3GAN's heads, losses, gradients and the hub generator."""
    gin.clear_config()
    gin.parse_config([
        'weights.initializer = "orthogonal"', 'spectral_norm.singular_value = "auto"',
        'G.batch_norm_fn = @conditional_batch_norm', 'G.spectral_norm = True',
        'D.spectral_norm = True', 'ModularGAN.g_use_ema = True', 'ModularGAN.conditional = True',
        'resnet_biggan.Generator.hierarchical_z = True', 'resnet_biggan.Generator.embed_y = True',
        f'resnet_biggan.Generator.embed_y_dim = {c["embed_dim"]}',
        f'resnet_biggan.Generator.ch = {c["ch"]}', f'resnet_biggan.Discriminator.ch = {c["ch"]}',
        f'resnet_biggan.Generator.blocks_with_attention = "{c["g_attn"]}"',
        f'resnet_biggan.Discriminator.blocks_with_attention = "{c["d_attn"]}"',
        'resnet_biggan.Discriminator.project_y = False', 'standardize_batch.decay = 0.9',
        'standardize_batch.epsilon = 1e-5', 'standardize_batch.use_moving_averages = False',
        'loss.fn = @hinge', 'S3GAN.self_supervision = "rotation"',
        f'S3GAN.rotated_batch_fraction = {c["rotated_batch_fraction"]}',
        'S3GAN.project_y = True', 'S3GAN.use_predictor = True'])
    tf.reset_default_graph()
    tf.set_random_seed(resolution)                 # compare_gan's initialisers: the same S0
    R, B, K, Z = resolution, c['batch'], c['num_classes'], c['z_dim']
    dataset = types.SimpleNamespace(name='golden', image_shape=(R, R, 3), num_classes=K)
    gan = S3GAN(dataset=dataset, parameters={'architecture': 'resnet_biggan_arch', 'z_dim': Z, 'lambda': 1},
                model_dir=tempfile.mkdtemp())
    t = types.SimpleNamespace(gan=gan)
    t.x_real = tf.placeholder(tf.float32, [B, R, R, 3])
    t.y_real, t.y = tf.placeholder(tf.int32, [B]), tf.placeholder(tf.int32, [B])
    t.z = tf.placeholder(tf.float32, [B, Z])
    t.g_images = gan.generator(t.z, y=tf.one_hot(t.y, K), is_training=True)
    _, t.d_logits, t.d_rot_logits, t.d_cls_logits, _ = gan.discriminator_with_additonal_heads(
        t.x_real, tf.one_hot(t.y_real, K), is_training=True)
    summaries = {}                                 # create_loss's parts, as it logs them
    gan._tpu_summary.scalar = lambda name, tensor, *args: summaries.__setitem__(name, tensor)
    gan.create_loss(dict(images=t.x_real, z=t.z, sampled_labels=t.y), t.y_real, params={})
    t.d_loss, t.g_loss = gan.d_loss, gan.g_loss
    t.d_loss_rot, t.d_loss_cls, t.g_loss_rot = (summaries[f'loss/{name}'] for name in (
        'real_loss', 'class_loss_real', 'fake_loss'))
    t.d_vars, t.g_vars = gan.discriminator.trainable_variables, gan.generator.trainable_variables
    t.grad_d = tf.gradients(t.d_loss, t.d_vars)
    t.grad_g = tf.gradients(t.g_loss, t.g_vars)
    hub.signatures.clear()
    gan._module_fn('gen', None)                    # the TF-Hub generator: EMA weights, eval mode
    (inputs, outputs), = hub.signatures
    t.hub_z, t.hub_y, t.hub_images = inputs['z'], inputs['labels'], outputs['generated']
    names = ('kernel', 'bias', 'gamma', 'beta', 'sigma', 'u_var', 'accu_mean', 'accu_variance',
             'accu_counter', 'update_accus', 'ExponentialMovingAverage')
    t.vars = {v.op.name: v for v in tf.global_variables() if v.op.name.split('/')[-1] in names}
    return t


def initial_state(sess, t, seed: int):
    """S0: compare_gan's initial values, then every offset and gain random, kernels no longer
    orthogonal (each output scaled by 0.5-1.5, plus noise: with orthogonal square kernels both
    sides of the power iteration give the same u, and sigma is 1), EMA = weights + noise, all
    rounded to float16 values (exact in the .npz)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, v in sorted(t.vars.items()):
        x, leaf = sess.run(v), name.split('/')[-1]
        if leaf == 'kernel':
            x = x * rng.uniform(0.5, 1.5, x.shape[-1]) + 0.3 * x.std() * rng.standard_normal(
                x.shape)
        elif leaf in ('bias', 'beta'):
            x = 0.2 * rng.standard_normal(x.shape)
        elif leaf == 'gamma':
            x = 1 + 0.2 * rng.standard_normal(x.shape)
        elif leaf == 'sigma':
            x = np.float32(rng.uniform(0.5, 1.0))
        state[name] = x
    for name in state:
        if name.endswith('/ExponentialMovingAverage'):
            w = state[name[:-len('/ExponentialMovingAverage')]]
            state[name] = w + 0.1 * (np.abs(w).mean() + 0.1) * rng.standard_normal(w.shape)
    return {k: (np.float16(v).astype(np.float32) if k.split('/')[-1] not in (
        'accu_counter', 'update_accus') else v).astype(t.vars[k].dtype.as_numpy_dtype)
        for k, v in state.items()}


def load_state(sess, t, state):
    for name, v in t.vars.items():
        v.load(state[name], sess)


def standing_then_eval(sess, t, z_accu, y_accu, z_eval, y_eval):
    """eval_gan_lib._update_bn_accumulators on the hub generator, then its images on z_eval."""
    switches = [v for name, v in t.vars.items() if name.endswith('accu/update_accus')]
    for v in switches:
        v.load(1, sess)
    for z, y in zip(z_accu, y_accu):
        sess.run(t.hub_images, {t.hub_z: z, t.hub_y: y})
    for v in switches:
        v.load(0, sess)
    return sess.run(t.hub_images, {t.hub_z: z_eval, t.hub_y: y_eval})


def golden(tf, gin, hub, S3GAN, resolution: int, out_dir: str):
    c = CONFIGS[resolution]
    t = build(tf, gin, hub, S3GAN, resolution, c)
    rng = np.random.default_rng(resolution)
    B, K, Z, R = c['batch'], c['num_classes'], c['z_dim'], resolution
    y_real = rng.integers(0, K, B)
    y_real[rng.permutation(B)[:B // 2]] = -1                  # half of the reals unlabeled
    smooth = rng.random((B, 4, 4, 3)).repeat(R // 4, 1).repeat(R // 4, 2)   # blocky images with
    x_real = 255 * (0.7 * smooth + 0.3 * rng.random((B, R, R, 3)))        # an up and a down
    g = dict(x_real=x_real.astype(np.uint8), y_real=y_real,
             z1=rng.standard_normal((B, Z)), y1=rng.integers(0, K, B),
             z2=rng.standard_normal((B, Z)), y2=rng.integers(0, K, B),
             z_accu=rng.standard_normal((STANDING_BATCHES, B, Z)),
             y_accu=rng.integers(0, K, (STANDING_BATCHES, B)),
             z_eval=rng.standard_normal((c['eval_batch'], Z)),
             y_eval=rng.integers(0, K, c['eval_batch']),
             rotated_batch_fraction=np.int64(c['rotated_batch_fraction']))
    g = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in g.items()}
    x = g['x_real'].astype(np.float32) / np.float32(255)
    with tf.Session() as sess:
        sess.run([tf.global_variables_initializer(), tf.local_variables_initializer()])
        s0 = initial_state(sess, t, seed=resolution + 1)
        load_state(sess, t, s0)
        g.update(zip(('g_images', 'd_logits', 'd_rot_logits', 'd_cls_logits'), sess.run(
            [t.g_images, t.d_logits, t.d_rot_logits, t.d_cls_logits],
            {t.x_real: x, t.y_real: g['y_real'], t.z: g['z1'], t.y: g['y1']})))
        load_state(sess, t, s0)
        feed = {t.x_real: x, t.y_real: g['y_real']}
        g['d_loss'], g['d_loss_rot'], g['d_loss_cls'], grad_d = sess.run(
            [t.d_loss, t.d_loss_rot, t.d_loss_cls, t.grad_d], {**feed, t.z: g['z1'], t.y: g['y1']})
        g['g_loss'], g['g_loss_rot'], grad_g = sess.run(
            [t.g_loss, t.g_loss_rot, t.grad_g], {**feed, t.z: g['z2'], t.y: g['y2']})
        g.update({f'grad_d/{v.op.name}': d for v, d in zip(t.d_vars, grad_d)})
        g.update({f'grad_g/{v.op.name}': d for v, d in zip(t.g_vars, grad_g)})
        g.update({f'u_after/{k}': sess.run(v) for k, v in t.vars.items() if k.endswith('u_var')})
        load_state(sess, t, s0)
        g['eval_images'] = standing_then_eval(sess, t, g['z_accu'], g['y_accu'], g['z_eval'],
                                              g['y_eval'])
        g.update({f'accu_after/{k}': sess.run(v) for k, v in t.vars.items()
                  if k.split('/')[-1] in ('accu_mean', 'accu_variance', 'accu_counter')})
        load_state(sess, t, s0)
        # a TF checkpoint of S0 as compare_gan names it, and as a hub module with a scope prefix
        ckpt_dir = os.path.join(out_dir, f'compare_gan_{resolution}_ckpt')
        os.makedirs(os.path.join(ckpt_dir, 'hub', 'variables'), exist_ok=True)
        tf.train.Saver(t.vars).save(sess, os.path.join(ckpt_dir, 'model.ckpt'))
        tf.train.Saver({'module/' + k: v for k, v in t.vars.items()}).save(
            sess, os.path.join(ckpt_dir, 'hub', 'variables', 'variables'))
    g.update({f'var/{k}': v.astype(np.float16) if v.dtype == np.float32 and k.split('/')[-1]
              not in ('accu_counter', 'accu_mean', 'accu_variance') else v for k, v in s0.items()})
    path = os.path.join(ROOT, 'tools', 'golden', f'compare_gan_{resolution}.npz')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **g)
    print(f'{path}: {os.path.getsize(path) / 1e6:.2f} MB, d_loss {g["d_loss"]:.6f}, '
          f'g_loss {g["g_loss"]:.6f}; TF checkpoint in {ckpt_dir}')
    return t


def check_import(tf, gin, hub, S3GAN, resolution: int, ckpt: str, out: str, num: int = 16,
                 standing_batches: int = 4, seed: int = 0):
    """A compare_gan checkpoint -> `s3gan.py import-tf` -> `s3gan.py sample`; the same z, y and
    standing-statistics batches (drawn as s3gan.generate_uint8 draws them) through compare_gan's
    hub generator. Prints the largest difference of the uint8 images."""
    import torch
    subprocess.run([sys.executable, os.path.join(ROOT, 's3gan.py'), 'import-tf', ckpt,
                    '--out', out], check=True)
    with open(os.path.join(out, 'config.json')) as fh:
        cfg = json.load(fh)
    cfg['standing_batches'] = standing_batches      # 3,200 batches of 64 by default: slow here
    with open(os.path.join(out, 'config.json'), 'w') as fh:
        json.dump(cfg, fh)
    to = os.path.join(out, 'check.npz')
    subprocess.run([sys.executable, os.path.join(ROOT, 's3gan.py'), 'sample', '--out', out,
                    '--num', str(num), '--to', to, '--device', 'cpu', '--seed', str(seed)],
                   check=True)
    ours = np.load(to)
    K, Z = cfg['num_classes'], cfg['z_dim']
    gen = torch.Generator().manual_seed(seed + 1)               # s3gan.standing_statistics
    z_accu, y_accu = zip(*[(torch.randn(64, Z, generator=gen).numpy(),
                            torch.randint(0, K, (64,), generator=gen).numpy())
                           for _ in range(standing_batches)])
    gen = torch.Generator().manual_seed(seed)                   # s3gan.generate_uint8
    z, y = torch.randn(num, Z, generator=gen).numpy(), torch.randint(0, K, (num,), generator=gen)
    assert (y.numpy() == ours['y']).all()
    t = build(tf, gin, hub, S3GAN, resolution, CONFIGS[resolution])
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        tf.train.Saver(t.vars).restore(sess, os.path.join(os.path.dirname(ckpt), 'model.ckpt')
                                       if os.path.isdir(ckpt) else ckpt)
        x = standing_then_eval(sess, t, z_accu, y_accu, z, y.numpy())
    theirs = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
    diff = np.abs(theirs.astype(int) - ours['x'].astype(int))
    print(f'{ckpt}: {num} samples at {resolution}x{resolution}: max |uint8 difference| '
          f'{diff.max()}, pixels that differ {np.mean(diff > 0):.2e}; float images in [0, 1] '
          f'vs ours / 255: max {np.abs(x - ours["x"] / 255.0).max():.2e}')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--compare-gan', required=True, help='a checkout of google/compare_gan')
    p.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'compare_gan_golden'),
                   help='where the TF checkpoints go (not committed)')
    p.add_argument('--check-import', default='', help='a run folder for the import-tf check')
    args = p.parse_args()
    modules = import_compare_gan(args.compare_gan)
    for resolution in CONFIGS:
        if args.check_import:
            ckpt_dir = os.path.join(args.out, f'compare_gan_{resolution}_ckpt')
            for ckpt in (os.path.join(ckpt_dir, 'model.ckpt'), os.path.join(ckpt_dir, 'hub')):
                check_import(*modules, resolution, ckpt, f'{args.check_import}_{resolution}_'
                             f'{os.path.basename(ckpt).split(".")[0]}')
        else:
            golden(*modules, resolution, args.out)


if __name__ == '__main__':
    main()

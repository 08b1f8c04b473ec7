"""The paper's comparison of methods (Lucic et al. 2019, Sec. 5: FID / IS on ImageNet 128x128 by
method and labels used), in miniature: every method trained at the demo's budget on the embedded
shapes set and scored by the demo's judge (s3gan.judge_scores: class accuracy and the Frechet
distance in the judge's feature space, the embedded set's stand-ins for IS and FID).

    python examples/paper_table.py                # five methods, about 35 min on 2 idle CPUs
    python examples/paper_table.py --methods s3gan,s3gan-co --out runs/paper_table

Writes OUT/table.md (markdown) and OUT/methods.png (a row of G_ema samples per method, one
column per class). Each method's row is kept in OUT/results.json as soon as it is done, so a
stopped run goes on with the methods that are left; the methods can also run in parallel, one
process each, with the same --out (and then once more all together for the table).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import s3gan  # noqa: E402

# method -> labels used: the true ones (biggan), 10% and inferred ones, or none at all
LABELS_USED = {'biggan': '100%', 's3gan': '10%', 's2gan': '10%', 's3gan-co': '10%',
               's2gan-co': '10%', 'clustering': '0%', 'clustering-ss': '0%',
               'single-label': '0%', 'random-label': '0%'}
# CI's size: the whole table in seconds, nothing learned
TINY = dict(ch=4, steps=2, num_images=200, pretrain_steps=4, batch_size=8,
            standing_batches=2, log_every=1, sample_every=1000, ckpt_every=1000, num_workers=0)


def write_outputs(out: str, rows: dict, real: dict):
    lines = ['| method | labels used | inferred-label accuracy | class accuracy | FD | wall time |',
             '|---|---|---|---|---|---|']
    for m, r in rows.items():
        acc = '—' if r['label_acc'] is None else f'{r["label_acc"]:.1%}'
        lines.append(f'| {m} | {LABELS_USED[m]} | {acc} | {r["class_acc"]:.2f} | '
                     f'{r["fd"]:.2f} | {r["wall_s"] / 60:.1f} min |')
    lines.append(f'| real images (ceiling) | | | {real["real_acc"]:.3f} | {real["real_fd"]:.2f} | |')
    with open(os.path.join(out, 'table.md'), 'w') as fh:
        fh.write('\n'.join(lines) + '\n')
    print('\n'.join(lines), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--methods', default='biggan,s3gan,s2gan,clustering,single-label')
    p.add_argument('--out', default='runs/paper_table')
    p.add_argument('--judge-samples', type=int, default=1000)
    p.add_argument('--tiny', action='store_true', help="CI's size: a few steps, tiny networks")
    p.add_argument('--rescore', action='store_true',
                   help='judge finished methods again (a new judge), keeping their wall time')
    args = p.parse_args(argv)
    methods = args.methods.split(',')
    for m in methods:
        if m not in LABELS_USED:
            p.error(f'--methods: unknown method {m!r}; choose from {", ".join(s3gan.METHODS)}')
    base = s3gan.Config(**{**s3gan.DEMO, **(TINY if args.tiny else {}), 'out': args.out})
    rt = s3gan.Runtime(base.device)
    os.makedirs(args.out, exist_ok=True)
    judge = s3gan.load_judge(base, rt.device, base.pretrain_steps if args.tiny else 0)   # once
    path, real, figure = os.path.join(args.out, 'results.json'), None, []
    for m in methods:
        out, t = os.path.join(args.out, m), time.time()
        rows = json.load(open(path)) if os.path.exists(path) else {}   # others' rows too
        if m not in rows:                 # a finished method is only loaded (and judged)
            s3gan.train(dataclasses.replace(base, method=m, out=out))
        wall = time.time() - t
        cfg, G, _ = s3gan.load_run(out, base.device)
        labels = os.path.join(out, 'labels.npz')
        label_acc = s3gan.load_labels(labels)[2] if os.path.exists(labels) else None
        scores = s3gan.judge_scores(judge, G, cfg, rt, args.judge_samples)
        x_real, y_real = scores.pop('real')
        real = dict(real_acc=scores['real_acc'], real_fd=scores['real_fd'])
        if m not in rows or args.rescore:   # a finished method keeps its first wall time
            rows[m] = dict(label_acc=label_acc, wall_s=rows.get(m, {}).get('wall_s', wall),
                           **scores)
            with open(f'{path}.{m}.tmp', 'w') as fh:
                json.dump(rows, fh, indent=1)
            os.replace(f'{path}.{m}.tmp', path)
        K = G.embed_y.num_embeddings     # one column per class (per cluster; one for single-label)
        y = torch.arange(cfg.num_classes) % K
        z = torch.randn(len(y), cfg.z_dim, generator=torch.Generator().manual_seed(1))
        if not figure:
            figure.append(('real', torch.stack([x_real[y_real == c][0] for c in range(len(y))])))
        figure.append((m, s3gan.generate(G, z.to(rt.device), y.to(rt.device), rt)))
        write_outputs(args.out, {k: rows[k] for k in methods if 'fd' in rows.get(k, {})}, real)
        s3gan.save_named_rows(figure, os.path.join(args.out, 'methods.png'))
    print(f'table: {args.out}/table.md   figure: {args.out}/methods.png')


if __name__ == '__main__':
    main()

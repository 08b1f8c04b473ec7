"""The paper's comparison of methods (Lucic et al. 2019, Sec. 5: FID / IS on ImageNet 128x128 by
method and labels used), in miniature and over seeds: every method trained at the demo's budget
on the embedded shapes set with seeds 0..N-1 (the seed changes the data set, the weights and the
labeled subset), each run measured as the demo is (examples/demo.py: judge A, judge B, CAS, FD).

    python examples/paper_table.py --seeds 3     # 7 rows x 3 seeds: ~2.5 h on 2 cores (measured
                                                 # 2026-11-30; the five S3GAN rows ~1.7 h)
    python examples/paper_table.py --methods s3gan,s3gan-co --seeds 1 --out runs/paper_table
    python examples/paper_table.py --methods bigbigan,s3gan-bigbigan --seeds 3   # BigBiGAN rows

BigBiGAN's rows (Donahue & Simonyan 2019; bigbigan.py): `bigbigan` is its unconditional G (0% of
the labels, judged after matching like single-label); `s3gan-bigbigan` is s3gan whose label stage
reads the same seed's BigBiGAN E instead of the rotation network (Config.encoder), so its
inferred-label accuracy sits beside s3gan's on the same 10% of the labels.

Run layout: OUT/seed{k}/{method}/ (a training folder of s3gan.train), with wall.json
({"wall_s": seconds of training, ...}) written right after its training and scores.json after
its measurement. A run whose ckpt.pt is at the last step is finished: it is measured, never
trained again (runs trained by another process are picked up the same way); an unfinished one is
resumed. OUT/table.md has mean and min-max over the finished seeds per measure and method, and a
ranking only where the ranges do not overlap; OUT/methods.png has a row of samples per run.
"""
import argparse
import dataclasses
import json
import os
import shutil
import time

import numpy as np
import torch

from demo import held_out, load_judges, measure, save_named_rows   # puts the root on the path
import bigbigan  # noqa: E402 (isort: after demo)
import s3gan  # noqa: E402

# method -> labels used: the true ones (biggan), 10% and inferred ones, or none at all
LABELS_USED = {'biggan': '100%', 's3gan': '10%', 's2gan': '10%', 's3gan-co': '10%',
               's2gan-co': '10%', 'clustering': '0%', 'clustering-ss': '0%',
               'single-label': '0%', 'random-label': '0%', 'bigbigan': '0%',
               's3gan-bigbigan': '10%'}
# CI's size: the whole table in seconds, nothing learned
TINY = dict(ch=4, steps=2, num_images=200, pretrain_steps=4, batch_size=8,
            standing_batches=2, log_every=1, sample_every=1000, ckpt_every=1000, num_workers=0)
# column -> (key in scores.json, format, higher is better)
MEASURES = {'inferred-label accuracy': ('label_acc', '{:.1%}', True),
            'judge A': ('judge_a', '{:.2f}', True), 'judge B': ('judge_b', '{:.2f}', True),
            'CAS': ('cas', '{:.2f}', True), 'FD': ('fd', '{:.2f}', False)}


def write_json(path: str, obj):
    with open(path + '.tmp', 'w') as fh:
        json.dump(obj, fh, indent=1)
    os.replace(path + '.tmp', path)


def finished(out: str, steps: int) -> bool:
    path = os.path.join(out, 'ckpt.pt')
    return os.path.exists(path) and torch.load(path, map_location='cpu',
                                               weights_only=True)['step'] >= steps


def run_config(base: s3gan.Config, method: str, seed: int, out: str):
    """(config, train function) of one run: a row of LABELS_USED at seed `seed`, base otherwise."""
    run = os.path.join(out, f'seed{seed}', method)
    if method == 'bigbigan':                        # the base with bigbigan.DEMO's own choices
        return bigbigan.BigBiGANConfig(**{**dataclasses.asdict(base), 'seed': seed, 'out': run,
                                          'method': 'single-label',
                                          'mlp_width': bigbigan.DEMO['mlp_width']}), bigbigan.train
    if method == 's3gan-bigbigan':                  # labels from the same seed's BigBiGAN E
        encoder = os.path.join(out, f'seed{seed}', 'bigbigan')
        if not os.path.exists(os.path.join(encoder, 'wall.json')):
            raise ValueError(f'--methods s3gan-bigbigan: {encoder} is not trained yet; put '
                             'bigbigan before it in --methods')
        return dataclasses.replace(base, method='s3gan', encoder=encoder, seed=seed,
                                   out=run), s3gan.train
    return dataclasses.replace(base, method=method, seed=seed, out=run), s3gan.train


def share_label_stage(cfg: s3gan.Config) -> dict:
    """s2gan and s3gan of one seed make the same labels (s3gan.label_provenance): the second one
    trained takes the first one's labels.npz, so the two rows differ only in the GAN's
    self-supervision (and the label stage runs once). -> what wall.json should say about it."""
    pair = {'s2gan': 's3gan', 's3gan': 's2gan'}.get(cfg.method)
    if pair is None or cfg.encoder:                 # s3gan-bigbigan: its labels are E's
        return {}
    seed_dir, mine = os.path.dirname(cfg.out), os.path.join(cfg.out, 'labels.npz')
    other = os.path.join(seed_dir, pair, 'labels.npz')
    if os.path.exists(mine) or not os.path.exists(other):
        return {}
    os.makedirs(cfg.out, exist_ok=True)
    shutil.copyfile(other, mine)
    return dict(labels_from=os.path.relpath(other, seed_dir))


def spread(values: list, fmt: str) -> str:   # "mean (min-max)"; one value: itself
    if not values:
        return '—'
    mean = fmt.format(np.mean(values))
    return mean if len(values) == 1 else f'{mean} ({fmt.format(min(values))}–' \
                                         f'{fmt.format(max(values))})'


def ranking(rows: dict, key: str, higher: bool) -> str:
    """Methods with two seeds or more by mean, best first: '>' where the two neighbours' min-max
    ranges do not overlap, '≈' where they do; a method with one seed has no range: not ranked."""
    runs = {m: [r[key] for r in rs if r.get(key) is not None] for m, rs in rows.items()}
    order = sorted((m for m in runs if len(runs[m]) > 1), key=lambda m: np.mean(runs[m]),
                   reverse=higher)
    text = order[0] if order else ''
    for a, b in zip(order, order[1:]):
        apart = (min(runs[a]) > max(runs[b]) if higher else max(runs[a]) < min(runs[b]))
        text += (' > ' if apart else ' ≈ ') + b
    single = [m for m in runs if len(runs[m]) == 1]
    return text + (f'; one seed, not ranked: {", ".join(single)}' if single else '')


def write_table(out: str, rows: dict):
    """rows: method -> [scores.json of each finished seed]. Writes and prints OUT/table.md."""
    lines = ['| method | labels used | seeds | ' + ' | '.join(MEASURES) + ' | wall time |',
             '|---' * (len(MEASURES) + 4) + '|']
    for m, rs in rows.items():
        cells = [spread([r[k] for r in rs if r.get(k) is not None], f)
                 for k, f, _ in MEASURES.values()]
        walls = [r['wall_s'] / 60 for r in rs if r.get('wall_s')]
        lines.append(f'| {m} | {LABELS_USED[m]} | {len(rs)} | ' + ' | '.join(cells) +
                     f' | {spread(walls, "{:.1f}")} min |')
    every = [r for rs in rows.values() for r in rs]
    ceil = {k: spread([r[k] for r in every], '{:.3f}') for k in ('real_judge_a', 'real_judge_b')}
    lines.append(f'| real images (ceiling) | | | | {ceil["real_judge_a"]} | {ceil["real_judge_b"]}'
                 f' | {ceil["real_judge_b"]} | {spread([r["real_fd"] for r in every], "{:.2f}")} |'
                 f' |')
    lines += ['', 'Mean (min–max) over the finished seeds. Ranking by mean: ">" where the ranges'
              ' of two neighbours do not overlap, "≈" where they do; one seed: not ranked.', '']
    lines += [f'- {name}: {ranking(rows, k, hi)}' for name, (k, _, hi) in MEASURES.items()
              if name != 'inferred-label accuracy']
    with open(os.path.join(out, 'table.md'), 'w') as fh:
        fh.write('\n'.join(lines) + '\n')
    print('\n'.join(lines), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--methods', default='biggan,s3gan,s2gan,clustering,single-label,bigbigan,'
                                        's3gan-bigbigan')
    p.add_argument('--seeds', type=int, default=1, help='seeds 0..N-1 of every method')
    p.add_argument('--out', default='runs/paper_table')
    p.add_argument('--judge-samples', type=int, default=1000)
    p.add_argument('--tiny', action='store_true', help="CI's size: a few steps, tiny networks")
    p.add_argument('--score-only', action='store_true',
                   help='measure the finished runs only (another process trains the others)')
    p.add_argument('--rescore', action='store_true', help='measure measured runs again')
    args = p.parse_args(argv)
    methods = args.methods.split(',')
    for m in methods:
        if m not in LABELS_USED:
            p.error(f'--methods: unknown method {m!r}; choose from {", ".join(s3gan.METHODS)}')
    if args.seeds < 1:
        p.error(f'--seeds {args.seeds}: at least 1')
    base = s3gan.Config(**{**s3gan.DEMO, **(TINY if args.tiny else {}), 'out': args.out})
    rt = s3gan.Runtime(base.device)
    os.makedirs(args.out, exist_ok=True)
    judges = load_judges(base, rt.device)          # once, on seed 0's data set, cached in OUT
    rows, figure = {m: [] for m in methods}, [('real', held_out(base, len(s3gan.SHAPES))[0])]
    for seed in range(args.seeds):
        for m in methods:
            try:
                cfg, train = run_config(base, m, seed, args.out)
            except ValueError as e:          # s3gan-bigbigan without its seed's BigBiGAN
                if not args.score_only:
                    p.error(str(e))
                print(f'{os.path.join(args.out, f"seed{seed}", m)}: not finished, left out')
                continue
            wall_path, scores_path = (os.path.join(cfg.out, n) for n in ('wall.json',
                                                                         'scores.json'))
            if not (os.path.exists(wall_path) or finished(cfg.out, cfg.steps)):
                if args.score_only:
                    print(f'{cfg.out}: not finished, left out')
                    continue
                shared = share_label_stage(cfg)
                t = time.time()
                train(cfg)
                write_json(wall_path, dict(wall_s=time.time() - t, threads=torch.get_num_threads(),
                                           **shared))
            cfg, G, _ = s3gan.load_run(cfg.out, base.device, config=type(cfg))
            if args.rescore or not os.path.exists(scores_path):
                scores = measure(G, cfg, rt, judges, args.judge_samples)
                scores.pop('real')
                labels = os.path.join(cfg.out, 'labels.npz')
                scores['label_acc'] = (s3gan.load_labels(labels)[2] if os.path.exists(labels)
                                       else None)
                write_json(scores_path, scores)
            scores = json.load(open(scores_path))
            wall = json.load(open(wall_path)) if os.path.exists(wall_path) else {}
            rows[m].append(dict(scores, wall_s=wall.get('wall_s')))
            y = torch.arange(cfg.num_classes) % G.embed_y.num_embeddings   # a column a class
            z = torch.randn(len(y), cfg.z_dim, generator=torch.Generator().manual_seed(1))
            s3gan.standing_statistics(G, cfg.standing_batches, cfg.seed + 1)
            figure.append((f'{m} s{seed}', s3gan.generate(G, z.to(rt.device), y.to(rt.device),
                                                          rt)))
    write_table(args.out, {m: rs for m, rs in rows.items() if rs})
    save_named_rows(figure, os.path.join(args.out, 'methods.png'))
    print(f'table: {args.out}/table.md   figure: {args.out}/methods.png')


if __name__ == '__main__':
    main()

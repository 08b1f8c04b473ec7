"""Do the compare_gan golden tests catch a wrong detail? Run by hand:

    python tools/mutation_check.py

Copies s3gan.py, test_s3gan.py and what it imports (fid.py, bigbigan.py, examples/,
tools/compare_gan_weights.py) and tools/golden/ to a temporary folder, then, one at a time,
changes one detail of s3gan.py there (the repository is never touched) and runs the golden
tests (test_s3gan.py -k compare_gan). Each mutant must fail them and the unchanged copy pass.
"""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTANTS = {   # name: (text of s3gan.py, its replacement); each text occurs exactly once
    "CBN's +1 (BigGAN-PyTorch's 1 + gamma(c))": (
        'self.standardize(x) * self.gamma(c)[:, :, None, None]',
        'self.standardize(x) * (1 + self.gamma(c)[:, :, None, None])'),
    "u's side (the other side for square matrices)": (
        'if M.shape[1] <= M.shape[0]:', 'if M.shape[1] < M.shape[0]:'),
    'attention block (softmax scaled by 1/sqrt(d), as in transformers)': (
        'o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0)',
        'o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])'),
    "rotation-loss weight (G's 0.2 -> 0.25)": (
        'weight_rotation_loss_g: float = 0.2', 'weight_rotation_loss_g: float = 0.25'),
    'rotated rows (the first n images, not the last n)': ('src = x[-n:]', 'src = x[:n]'),
    'classifier rows (the last B real rows, rotated copies included)': (
        'class_loss(out.cls_logits[:B], y_real)', 'class_loss(out.cls_logits[m - B:m], y_real)'),
}


def run_tests(folder: str) -> tuple:
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
                           'test_s3gan.py', '-k', 'compare_gan'], cwd=folder,
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    failed = [l for l in lines if l.startswith(('FAILED', 'ERROR', 'E   '))]
    return proc.returncode == 0, (failed[:2] or lines[-1:])


def main():
    with open(os.path.join(ROOT, 's3gan.py')) as fh:
        source = fh.read()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ('test_s3gan.py', 'fid.py', 'bigbigan.py'):   # and what the tests import
            shutil.copy(os.path.join(ROOT, name), tmp)
        shutil.copytree(os.path.join(ROOT, 'examples'), os.path.join(tmp, 'examples'))
        shutil.copytree(os.path.join(ROOT, 'tools', 'golden'), os.path.join(tmp, 'tools', 'golden'))
        shutil.copy(os.path.join(ROOT, 'tools', 'compare_gan_weights.py'),
                    os.path.join(tmp, 'tools'))
        for name, (old, new) in [('unchanged', ('', ''))] + list(MUTANTS.items()):
            if old and source.count(old) != 1:
                sys.exit(f'mutation "{name}": {old!r} occurs {source.count(old)} times in s3gan.py')
            with open(os.path.join(tmp, 's3gan.py'), 'w') as fh:
                fh.write(source.replace(old, new) if old else source)
            passed, why = run_tests(tmp)
            ok = passed == (name == 'unchanged')
            results.append(ok)
            print(f'{"ok  " if ok else "BAD "} {name}: golden tests {"pass" if passed else "FAIL"}'
                  + ('' if passed else f' ({why[0].strip()[:110]})'), flush=True)
    sys.exit(0 if all(results) else 1)


if __name__ == '__main__':
    main()

"""Time to fit a control's adapted head from N corrections, on CPU, with cached embeddings.

    python bench/adaptation_fit.py [--dim 512] [--labels 50] [--corrections 200 1000 3000]

The whole procedure is timed as the backend runs it: nested cross-validation over the
training-free candidates (and the linear probe once every label has enough corrections), the
guard, calibration and the final refit; then the learning curve stored with the head.
Embeddings are synthetic clusters (ViT-B-sized by default); only the shapes matter for time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.adapt.fit import Examples, adapt, learning_curve  # noqa: E402
from backend.zeroshot.scoring import ZeroShotHead  # noqa: E402


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument("--corrections", type=int, nargs="+", default=[200, 1000, 3000])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    text = unit(rng.normal(size=(args.labels, args.dim)))
    centres = unit(text + rng.normal(size=args.dim) + rng.normal(size=text.shape) * 0.5)
    head = ZeroShotHead(torch.from_numpy(text).float(), torch.arange(args.labels), args.labels,
                        "mean", "softmax", 100.0, 0.0)
    print(f"threads {torch.get_num_threads()}, dim {args.dim}, labels {args.labels}")
    print("corrections  fit (s)  learning curve (s)  method      held-out acc zero-shot → served")
    for n in args.corrections:
        y = rng.integers(0, args.labels, n)
        x = unit(centres[y] + rng.normal(size=(n, args.dim)) * 0.05)
        examples = Examples(x, np.eye(args.labels)[y], np.arange(n, dtype=float))
        started = time.perf_counter()
        fit = adapt(head, examples, multiple=False)
        fitted = time.perf_counter() - started
        started = time.perf_counter()
        learning_curve(head, examples)
        curve = time.perf_counter() - started
        print(f"{n:11d} {fitted:8.2f} {curve:19.2f}  {fit.adapter.method:10s}  "
              f"{fit.zero_shot['accuracy']:.3f} → {fit.after['accuracy']:.3f}")


if __name__ == "__main__":
    main()

"""The evaluator's shape reader: softmax regression on a shape's 16x16 coverage map.

Hand-made features (how much of its box a shape fills, how convex it is) are
exact on the dataset's crisp images but a 1-pixel blur rounds a square into a
"circle" and a triangle's apex away: shape accuracy fell to 84 %. Generated
images are blurrier than that, so the evaluator instead crops the shape with a
margin, scales the crop to 16x16 and applies a linear classifier trained on the
generator's own images, a third of them crisp and the rest blurred and noisy.
1028 weights, trained in about 15 s on one core:

    python examples/shapes/shape_classifier.py   # rewrites shape_classifier.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

try:  # imported as examples.shapes.shape_classifier or run as a script
    from . import dataset
except ImportError:
    import dataset  # type: ignore[no-redef]

WEIGHTS = Path(__file__).with_name("shape_classifier.json")
SIDE = 16
MARGIN = 0.2  # of the box's longer side, so a square's crop still shows its edges


def template(coverage: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """The shape's coverage (0..1 per pixel) cropped to its blob's box plus a margin, as SIDE*SIDE unit vector."""
    from PIL import Image

    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = max(2, round(MARGIN * max(y1 - y0, x1 - x0)))
    crop = np.pad(coverage, m)[y0 : y1 + 2 * m, x0 : x1 + 2 * m].astype(np.float32)
    t = np.asarray(Image.fromarray(crop, mode="F").resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    return t / (np.linalg.norm(t) + 1e-8)


@lru_cache(maxsize=1)
def _weights() -> tuple[np.ndarray, tuple[str, ...]]:
    saved = json.loads(WEIGHTS.read_text())
    return np.asarray(saved["weights"], dtype=np.float64), tuple(saved["classes"])


def predict(t: np.ndarray) -> tuple[str, float]:
    """(shape, probability) for a template."""
    weights, classes = _weights()
    z = np.append(t, 1.0) @ weights
    p = np.exp(z - z.max())
    p /= p.sum()
    return classes[int(p.argmax())], float(p.max())


def degrade(image, rng: np.random.Generator, blur: float, noise: float):
    """``image`` blurred (Gaussian radius ``blur``) and with Gaussian pixel noise of std ``noise``."""
    from PIL import Image, ImageFilter

    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(image, dtype=np.float32)
    if noise > 0:
        a = a + rng.normal(0.0, noise, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _templates(images, labels, classes):
    try:
        from . import evaluate
    except ImportError:
        import evaluate  # type: ignore[no-redef]
    rows, ys = [], []
    for image, label in zip(images, labels):
        seg = evaluate.segment(image)
        if "blob" in seg:
            rows.append(np.append(template(seg["coverage"], seg["blob"]), 1.0))
            ys.append(classes.index(label))
    return np.array(rows), np.array(ys)


def train(n: int = 1500, seed: int = 1, iterations: int = 1500, lr: float = 0.05) -> dict:
    """Fit softmax regression (Adam, full batch) on ``n`` generator images in three versions each."""
    classes = list(dataset.SHAPES)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for image, _, attrs in dataset.make_dataset(n, seed):
        # Crisp, mildly and strongly degraded: the evaluator must read a blurry generation as it reads the data.
        for blur, noise in ((0.0, 0.0), (rng.uniform(0.3, 1.2), rng.uniform(0, 10)), (rng.uniform(1.2, 2.5), rng.uniform(5, 25))):
            images.append(degrade(image, rng, blur, noise))
            labels.append(attrs["shape"])
    x, y = _templates(images, labels, classes)
    onehot = np.eye(len(classes))[y]
    w = np.zeros((x.shape[1], len(classes)))
    m, v = np.zeros_like(w), np.zeros_like(w)
    for it in range(1, iterations + 1):
        z = x @ w
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = x.T @ (p - onehot) / len(x) + 1e-4 * w
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
        w -= lr * (m / (1 - 0.9**it)) / (np.sqrt(v / (1 - 0.999**it)) + 1e-8)
    return {
        "classes": classes,
        "side": SIDE,
        "margin": MARGIN,
        "trained_on": {"n": n, "seed": seed, "versions": "crisp; blur 0.3-1.2 + noise 0-10; blur 1.2-2.5 + noise 5-25",
                       "iterations": iterations, "lr": lr},
        "train_accuracy": float(((x @ w).argmax(axis=1) == y).mean()),
        "weights": np.round(w, 5).tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(WEIGHTS), help="where to write the weights (JSON)")
    parser.add_argument("--n", type=int, default=1500, help="generator images to train on (each in three versions)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the training images and their degradation")
    args = parser.parse_args(argv)
    start = time.time()
    model = train(args.n, args.seed)
    Path(args.out).write_text(json.dumps(model) + "\n")
    print(f"train accuracy {model['train_accuracy']:.4f} in {time.time() - start:.1f} s", file=sys.stderr)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

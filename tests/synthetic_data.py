"""Small, learnable image data that the training and job tests write for themselves."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 220), (230, 210, 40), (200, 60, 200), (40, 210, 210)]


def make_image_folder(root: str, classes: int = 4, per_class: int = 24, size: int = 32, seed: int = 0,
                      test_per_class: int = 0) -> str:
    """``root/train/<class>/NNN.png`` (+ ``root/test/...``): each class a noisy colour with a bar,
    so a narrow network separates them within two epochs."""
    rng = np.random.default_rng(seed)
    splits = [("train", per_class)] + ([("test", test_per_class)] if test_per_class else [])
    for split, count in splits:
        for label in range(classes):
            folder = os.path.join(root, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                pixels = rng.normal(COLOURS[label % len(COLOURS)], 40, (size, size, 3))
                row = (label * size) // classes
                pixels[row:row + max(2, size // 8)] = 255  # a position cue as well as colour
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{index:03d}.png"))
    return root

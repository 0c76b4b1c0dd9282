"""Coloured shapes sliding across a small frame: the videos of the demo model's training corpus
(wave_rt.train.demo_corpus) and the matching clips of the bundled demo archive (wave_rt.archive.demo_data),
drawn by one function so that the demo archive shows the model exactly the kind of clip it was trained on."""

from __future__ import annotations

import numpy as np

SIZE = 56  # pixels: 4 x 4 patches of 14, i.e. 4 visual tokens per temporal patch
FPS = 8
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230)}
# a bar is a tall thin rectangle: at 56 x 56 pixels a square and a circle share too many patches
SHAPES = ("circle", "bar")
DIRECTIONS = ("left", "right")


def shape_frames(rng: np.random.Generator, colour: str, shape: str, direction: str,
                 seconds: float) -> np.ndarray:
    """rgb24 frames [n, SIZE, SIZE, 3] at FPS: one `shape` of (a random shade of) `colour` crossing a dark
    background of random tint towards `direction`; size, height and start/end columns drawn from rng."""
    n = max(2, int(round(FPS * seconds)))
    bg = rng.integers(10, 50, size=3)
    frames = np.empty((n, SIZE, SIZE, 3), np.uint8)
    frames[:] = bg.astype(np.uint8)
    r = rng.uniform(9, 12.5)
    rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, size=3), 0, 255).astype(np.uint8)
    cy = rng.uniform(r + 2, SIZE - r - 2)
    x0, x1 = SIZE - r - 3 - rng.uniform(0, 6), r + 3 + rng.uniform(0, 6)
    if direction == "right":
        x0, x1 = x1, x0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(n):
        cx = x0 + (x1 - x0) * i / (n - 1)
        if shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        else:
            mask = (np.abs(yy - SIZE / 2) <= SIZE * 0.4) & (np.abs(xx - cx) <= r * 0.4)
        frames[i][mask] = rgb
    return frames

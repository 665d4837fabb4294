"""Pose fixtures shared by the rendering tests and ``bench/pose_draw_speed.py`` (no pytest here)."""
import math

import numpy as np

from steadydancer_turbo import dwpose as D


def dancer(t, aspect, cx=0.5, cy=0.45, s=1.0, conf=0.9):
    """A whole-body figure (body, two 21-point hands, 68-point face) normalized to a canvas of aspect W/H; ``t``
    swings the arms and sways the body."""
    a = 0.9 * math.sin(2 * math.pi * t)
    cx = cx + 0.08 * math.sin(2 * math.pi * t)
    pts = {0: (0, -0.3), 1: (0, -0.2), 2: (-0.09, -0.2), 5: (0.09, -0.2), 8: (-0.05, 0.1), 11: (0.05, 0.1),
           3: (-0.09 - 0.12 * math.cos(a), -0.2 + 0.12 * math.sin(a)),
           6: (0.09 + 0.12 * math.cos(a), -0.2 - 0.12 * math.sin(a)),
           9: (-0.06, 0.27), 12: (0.06, 0.27), 10: (-0.07, 0.43), 13: (0.07, 0.43),
           14: (-0.02, -0.32), 15: (0.02, -0.32), 16: (-0.04, -0.31), 17: (0.04, -0.31)}
    pts[4] = (pts[3][0] - 0.1, pts[3][1] + 0.05)
    pts[7] = (pts[6][0] + 0.1, pts[6][1] + 0.05)
    body = np.zeros((18, 3))
    for i, (x, y) in pts.items():
        body[i] = (cx + s * x / aspect, cy + s * y, conf)

    def hand(w, side):
        ang = np.linspace(-1.0, 1.0, 21) * side + t
        r = s * np.r_[0, np.tile([0.02, 0.035, 0.05, 0.06], 5)]
        return np.column_stack([body[w, 0] + r * np.sin(ang) / aspect, body[w, 1] + r * np.cos(ang),
                                np.full(21, min(conf, 0.8))])

    rng = np.random.default_rng(int(t * 1000))
    face = np.column_stack([body[0, 0] + s * rng.normal(0, 0.01, 68) / aspect, body[0, 1] + s * rng.normal(0, 0.01, 68),
                            np.full(68, min(conf, 0.7))])
    return D.Person(body, hand(7, 1), hand(4, -1), face)

"""Overlays: frames with boxes, masks and target names drawn, as PNG grids and animated GIFs.

Visibility states: a VISIBLE target is drawn filled with a solid box; a RELOCALIZING one dimmed (a
faint fill, its outline and a thin box, ``?`` after its name); a LOST one only marked (a thin grey box
and ``LOST``), its mask not drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from UltramotionIGTLib.core.packet import HostResult

#: Fill opacity of a RELOCALIZING target relative to a VISIBLE one.
DIM = 0.3
LOST_COLOR = (150, 150, 150)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the mask's inner boundary)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw_overlay(frame: np.ndarray, result: HostResult, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 HxWx3 image: ``frame`` (HxW grey or HxWx3 RGB, uint8) with masks blended and boxes and
    names drawn, each target as its visibility state says (see the module docstring)."""
    frame = np.asarray(frame, dtype=np.uint8)
    rgb = (frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=2)).astype(np.float32)
    colors = [np.array(c, np.float32) * 255.0 for c in result.segment_colors()]
    states = result.state_names()
    for i in np.argsort(result.scores, kind="stable"):
        if states[i] == "LOST":
            continue
        m = result.masks[i]
        a = alpha if states[i] == "VISIBLE" else alpha * DIM
        rgb[m] = (1.0 - a) * rgb[m] + a * colors[i]
        if states[i] != "VISIBLE":
            edge = _outline(m)
            rgb[edge] = colors[i]
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(result.segment_names()):
        color = tuple(int(v) for v in colors[i])
        x1, y1, x2, y2 = (float(v) for v in result.boxes[i])
        label = f"{name} {result.scores[i]:.2f}"
        if states[i] == "VISIBLE":
            draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        elif states[i] == "LOST":
            color = LOST_COLOR
            draw.rectangle([x1, y1, x2, y2], outline=color, width=1)
            label = f"{name} LOST"
        else:
            draw.rectangle([x1, y1, x2, y2], outline=color, width=1)
            label += " ?"
        draw.text((x1 + 2, max(0.0, y1 - 11)), label, fill=color)
    return np.asarray(image)


def _pick(n: int, count: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, num=min(count, n))}) if n else []


def save_overlay_grid(
    path: str | Path,
    frames: Sequence[np.ndarray],
    results: Sequence[HostResult],
    max_tiles: int = 6,
    columns: int = 3,
) -> Path:
    """Save up to ``max_tiles`` evenly spaced frames with overlays as one PNG grid."""
    picks = _pick(len(results), max_tiles)
    tiles = [Image.fromarray(draw_overlay(frames[i], results[i])) for i in picks]
    if not tiles:
        raise ValueError("no frames to draw")
    w, h = tiles[0].size
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for n, tile in enumerate(tiles):
        draw = ImageDraw.Draw(tile)
        draw.text((4, 4), f"frame {results[picks[n]].frame_index}", fill=(255, 255, 255))
        grid.paste(tile, ((n % cols) * w, (n // cols) * h))
    path = Path(path)
    grid.save(path)
    return path


def save_overlay_gif(
    path: str | Path,
    frames: Sequence[np.ndarray],
    results: Sequence[HostResult],
    max_frames: int = 40,
    fps: float = 10.0,
) -> Path:
    """Save the first ``max_frames`` frames with overlays as an animated GIF."""
    images = [
        Image.fromarray(draw_overlay(frames[i], results[i])) for i in range(min(max_frames, len(results)))
    ]
    if not images:
        raise ValueError("no frames to draw")
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path

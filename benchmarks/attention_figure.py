"""The README's picture: the same validation images with the [CLS], SimPool and GAP-CAM maps.

Draws the maps that ``benchmarks/attention_quality.py --save-maps FILE`` wrote: one column per
validation image, and the rows of :func:`~simpool_lightning.callbacks.attention.plot_attention`
(the drawing code of the ``AttentionMapLogger`` images): the image, then per model its map as a heat
map and the contour of the map's kept mass, with the object's mask dashed.

    python benchmarks/attention_quality.py --seed 0 --save-maps maps.npz
    python benchmarks/attention_figure.py maps.npz docs/attention.png
    python benchmarks/attention_figure.py --fast out.png     # trains tiny models in seconds, then draws
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from attention_quality import main as attention_quality  # the benchmark beside this script
from simpool_lightning.callbacks.attention import figure_to_array, plot_attention

# Rows of attention_quality's output, by the first word of their name, and how the figure names them.
ROWS = {"token": "[CLS]", "simpool": "SimPool", "avg": "GAP-CAM", "centred": "centred Gaussian", "uniform": "uniform"}
DEFAULT_ROWS = ("token", "simpool", "avg")
FAST = [
    "--epochs", "1", "--train-size", "64", "--val-size", "32", "--batch-size", "32", "--image-size", "32",
    "--patch-size", "8", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--simpool-heads", "2", "--num-saved", "4",
]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("maps", nargs="?", help="the .npz of attention_quality.py --save-maps (not with --fast)")
    p.add_argument("output", help="PNG to write")
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS), help="which maps, in this order")
    p.add_argument("--num-images", type=int, default=None, help="the first N saved images (default: all)")
    p.add_argument("--panel-inches", type=float, default=1.1)
    p.add_argument("--fast", action="store_true", help="train tiny models first (seconds): a check that the pipeline runs")
    args = p.parse_args(argv)
    if args.fast == (args.maps is not None):
        p.error("give the maps file, or --fast, not both")
    return args


def draw(maps_file: str, output: str, rows: Sequence[str] = DEFAULT_ROWS, num_images: Optional[int] = None, panel_inches: float = 1.1) -> None:
    """Read ``maps_file`` and write the figure to ``output`` (PNG)."""
    saved = np.load(maps_file)
    names = [str(name).split(" ")[0] for name in saved["names"]]
    missing = [row for row in rows if row not in names]
    if missing:
        raise ValueError(f"{maps_file} has no maps for {missing}; it has {list(saved['names'])}")
    n = len(saved["images"]) if num_images is None else min(num_images, len(saved["images"]))
    images = torch.from_numpy(saved["images"][:n])
    maps = {ROWS[row]: torch.from_numpy(saved[f"map{names.index(row)}"][:n]) for row in rows}
    titles = [str(saved["classes"][label]) for label in saved["labels"][:n]]
    fig = plot_attention(images, maps, float(saved["mass"]), torch.from_numpy(saved["masks"][:n]), titles, panel_inches=panel_inches)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    Image.fromarray(figure_to_array(fig)).save(output, optimize=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.fast:
        with tempfile.TemporaryDirectory() as tmp:
            maps_file = os.path.join(tmp, "maps.npz")
            attention_quality([*FAST, "--save-maps", maps_file])
            draw(maps_file, args.output, args.rows, args.num_images, args.panel_inches)
    else:
        draw(args.maps, args.output, args.rows, args.num_images, args.panel_inches)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

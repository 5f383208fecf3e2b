"""Render labelled axial, coronal and sagittal mid-slices of generated volumes (and optionally of the training data).

    python examples/demo/render_samples.py --output docs/source/en/imgs/demo_samples.png --seeds 0 1 \
        --data_dir ../shared/data
    python examples/demo/render_samples.py --model meddiff-fm-demo --seeds 0 1 --scheduler ddim --steps 25 \
        --data_dir ../shared/data --output docs/source/en/imgs/patch_demo_samples.png --scale 1.0

The volumes are shown as a radiologist would look at them: the tensor `(D, H, W)` of a RAS+ pipeline is
(inferior -> superior, left -> right, posterior -> anterior), so the axial view (a `D` slice) is drawn with anterior
at the top and the patient's right on the left of the image, the coronal view (a `W` slice) and the sagittal view (an
`H` slice) with superior at the top, and the sagittal one with anterior on the left. Every tile has the
physical aspect ratio of its voxel spacing and orientation letters at its edges. Intensities are the model space,
`[-1, 1]` -> black..white (for MedDiff-FM models, the region's HU window). Only Pillow is needed (it comes with
diffusers). Works for `MedDiffusionPipeline` and `PatchSlidingWindowPipeline` folders.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from meddiffusers import MedDiffusionPipeline, PatchSlidingWindowPipeline, scheduler_from_name
from meddiffusers.demo import BUNDLED_MODELS, demo_model_path
from meddiffusers.io.intensity import PercentileScaling
from meddiffusers.training.data import VolumePreprocessor
from meddiffusers.utils import center_crop_or_pad

HERE = os.path.dirname(os.path.abspath(__file__))
VIEWS = ("axial", "coronal", "sagittal")


def radiological_planes(volume: np.ndarray, spacing) -> list[tuple[str, np.ndarray, tuple[float, float], str]]:
    """The three mid-slices of a RAS+ `(D, H, W)` volume in display orientation.

    Returns `(view, plane, (row_mm, column_mm), "top bottom left right" letters)` for the axial (`D`), coronal
    (`W`) and sagittal (`H`) slices through the centre, with rows and columns flipped for the radiological
    convention (see the module docstring).
    """
    depth, height, width = volume.shape
    spacing_d, spacing_h, spacing_w = spacing
    axial = volume[depth // 2].T[::-1, ::-1]  # rows: anterior -> posterior, columns: right -> left
    coronal = volume[:, :, width // 2][::-1, ::-1]  # rows: superior -> inferior, columns: right -> left
    sagittal = volume[:, height // 2, :][::-1, ::-1]  # rows: superior -> inferior, columns: anterior -> posterior
    return [
        ("axial", axial, (spacing_w, spacing_h), "A P R L"),
        ("coronal", coronal, (spacing_d, spacing_h), "S I R L"),
        ("sagittal", sagittal, (spacing_d, spacing_w), "S I A P"),
    ]


def font(size: int):
    """Pillow's default font at `size` pixels (a bitmap font on Pillow builds without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def tile(plane: np.ndarray, pixel_mm: tuple[float, float], letters: str, scale: float) -> Image.Image:
    """One slice as a labelled greyscale tile, `scale` pixels per millimetre."""
    grey = (np.clip((np.ascontiguousarray(plane, dtype=np.float32) + 1) / 2, 0, 1) * 255).astype(np.uint8)
    rows, columns = plane.shape
    size = (round(columns * pixel_mm[1] * scale), round(rows * pixel_mm[0] * scale))
    image = Image.fromarray(grey).resize(size, Image.BILINEAR).convert("RGB")
    draw = ImageDraw.Draw(image)
    small = font(14)
    top, bottom, left, right = letters.split()
    width, height = image.size
    for text, (x, y) in {
        top: (width // 2, 2),
        bottom: (width // 2, height - 16),
        left: (3, height // 2 - 7),
        right: (width - 11, height // 2 - 7),
    }.items():
        draw.text((x, y), text, fill=(255, 210, 0), font=small)
    return image


def sheet(rows: list[tuple[str, list[Image.Image]]], scale: float) -> Image.Image:
    """Rows of tiles with a label column on the left and the view names on top."""
    label_width, header, gap = 170, 24, 6
    column_widths = [max(images[i].width for _, images in rows) for i in range(len(VIEWS))]
    row_heights = [max(image.height for image in images) for _, images in rows]
    width = label_width + sum(column_widths) + gap * len(VIEWS)
    height = header + sum(row_heights) + gap * len(rows)
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    titles = ["axial (D slice)", "coronal (W slice)", "sagittal (H slice)"]
    x = label_width
    for title, column_width in zip(titles, column_widths):
        draw.text((x + 4, 4), title, fill=(235, 235, 235), font=font(15))
        x += column_width + gap
    y = header
    for (label, images), row_height in zip(rows, row_heights):
        draw.multiline_text((6, y + row_height // 2 - 18), label, fill=(235, 235, 235), font=font(14))
        x = label_width
        for image, column_width in zip(images, column_widths):
            canvas.paste(image, (x, y))
            x += column_width + gap
        y += row_height + gap
    return canvas


def training_volume(data_dir: str, region) -> np.ndarray | None:
    """A demo's canonical, resampled training volume of `region` in model space, if a build script knows it."""
    sys.path.insert(0, HERE)
    from build_demo_model import SOURCES, canonical_demo_volume
    from build_patch_demo_model import REGIONS as PATCH_REGIONS
    from build_patch_demo_model import SOURCE as PATCH_SOURCE

    if region.name in SOURCES:
        name, spacing = SOURCES[region.name]
        return PercentileScaling()(canonical_demo_volume(os.path.join(data_dir, name), spacing))[0, 0].numpy()
    if region.intensity_window and region.name in [entry["name"] for entry in PATCH_REGIONS]:
        low, high = region.intensity_window
        preprocess = VolumePreprocessor(intensity=f"ct:{low:g}:{high:g}", spacing=tuple(region.spacing))
        volume = preprocess(os.path.join(data_dir, PATCH_SOURCE))
        return center_crop_or_pad(volume, region.volume_size)[0].numpy()
    return None


def load_pipeline(model: str | None):
    """A `MedDiffusionPipeline` or `PatchSlidingWindowPipeline` from a folder or a bundled demo's name."""
    path = BUNDLED_MODELS.get(model, model) if model else demo_model_path()
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as handle:
        windowed = '"PatchSlidingWindowPipeline"' in handle.read()
    return (PatchSlidingWindowPipeline if windowed else MedDiffusionPipeline).from_pretrained(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Pipeline folder (default: the bundled demo model).")
    parser.add_argument("--output", required=True, help="PNG to write.")
    parser.add_argument("--regions", nargs="+", default=None, help="Regions to render (default: all).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=100, help="Inference steps (the pipeline's scheduler).")
    parser.add_argument("--data_dir", default=None, help="Also show each region's training volume from here.")
    parser.add_argument("--scale", type=float, default=0.75, help="Pixels per millimetre.")
    parser.add_argument("--volume_size", type=int, nargs=3, default=None, help="(D, H, W) (default: the region's).")
    parser.add_argument("--scheduler", default=None, help="A short scheduler name (default: the pipeline's).")
    parser.add_argument("--window_batch_size", type=int, default=4, help="Windows per call (MedDiff-FM models).")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for region in args.regions or pipe.region_registry.names:
        spacing = pipe.get_region(region).spacing
        volumes = []
        if args.data_dir:
            reference = training_volume(args.data_dir, pipe.get_region(region))
            if reference is not None:
                volumes.append((f"{region}\ntraining volume", reference))
        for seed in args.seeds:
            generator = torch.Generator().manual_seed(seed)
            size = {"volume_size": tuple(args.volume_size)} if args.volume_size else {}
            if isinstance(pipe, PatchSlidingWindowPipeline):
                size["window_batch_size"] = args.window_batch_size
            output = pipe(region, num_inference_steps=args.steps, generator=generator, output_type="np", **size)
            volumes.append((f"{region}\nseed {seed}, {args.steps} steps", output.volumes[0, 0]))
        for label, volume in volumes:
            planes = radiological_planes(volume, spacing)
            rows.append((label, [tile(plane, mm, letters, args.scale) for _, plane, mm, letters in planes]))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    sheet(rows, args.scale).save(args.output)
    print(f"wrote {args.output} ({len(rows)} rows)")


if __name__ == "__main__":
    main()

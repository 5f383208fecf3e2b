"""Inpaint the lung lesion of the shared chest CT with RePaint and the bundled MedDiff-FM demo prior, and render the
CT before, the mask and the CT after as axial, coronal and sagittal slices through the lesion.

    python examples/restoration/render_inpainting.py --data_dir ../shared/data \
        --output docs/source/en/imgs/restoration_inpainting.png

The CT (pyradiomics `lung1`, BSD-3-Clause) is brought to the prior's grid (RAS+, 8 mm voxels, chest window
[-1400, 400] HU -> [-1, 1]) and its tumour label, on the same grid, is dilated by one voxel: that is the region to
replace (mask 0), everything else is kept (mask 1). The slices go through the lesion's centre and are drawn as a
radiologist looks at them (see `examples/demo/render_samples.py`); the mask row shows the replaced voxels in red.
Only Pillow is needed. `--save_nifti DIR` also writes the three volumes (HU) for a viewer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from meddiffusers import PatchSlidingWindowPipeline, RePaint3DPipeline, RePaintDDPMScheduler, save_nifti
from meddiffusers.demo import patch_demo_model_path
from meddiffusers.io import affine_from_tensor_spacing
from meddiffusers.training.data import VolumePreprocessor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "demo"))
from render_samples import sheet, tile  # noqa: E402  (the demo renderer's tiles and sheet)

CT_FILE, LABEL_FILE = "ct_chest_pyradiomics_lung1.nii.gz", "ct_chest_pyradiomics_lung1_label.nii.gz"


def planes_through(volume: np.ndarray, spacing, centre) -> list[tuple[np.ndarray, tuple[float, float], str]]:
    """Axial, coronal and sagittal slices of a RAS+ `(D, H, W)` volume through the voxel `centre`, in display
    orientation (the axes flipped as `render_samples.radiological_planes` does for the mid-slices)."""
    d, h, w = centre
    spacing_d, spacing_h, spacing_w = spacing
    return [
        (volume[d].T[::-1, ::-1], (spacing_w, spacing_h), "A P R L"),
        (volume[:, :, w][::-1, ::-1], (spacing_d, spacing_h), "S I R L"),
        (volume[:, h, :][::-1, ::-1], (spacing_d, spacing_w), "S I A P"),
    ]


def overlay(background: Image.Image, plane: np.ndarray, colour=(230, 40, 40), opacity: float = 0.65) -> Image.Image:
    """`background` (a tile) with the voxels where `plane` is 1 painted in `colour`."""
    mask = Image.fromarray((np.ascontiguousarray(plane) > 0.5).astype(np.uint8) * 255).resize(
        background.size, Image.NEAREST
    )
    painted = Image.new("RGB", background.size, colour)
    return Image.composite(Image.blend(background, painted, opacity), background, mask)


def rows_for(volumes: list[tuple[str, np.ndarray]], spacing, centre, scale: float, mask: np.ndarray | None = None):
    """Sheet rows of labelled tiles; a row labelled with `mask` given shows that mask over its volume."""
    rows = []
    for label, volume in volumes:
        tiles = [tile(plane, mm, letters, scale) for plane, mm, letters in planes_through(volume, spacing, centre)]
        if mask is not None and label.startswith("mask"):
            tiles = [
                overlay(image, plane) for image, (plane, _, _) in zip(tiles, planes_through(mask, spacing, centre))
            ]
        rows.append((label, tiles))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="Folder with the lung1 CT and its label.")
    parser.add_argument("--output", default="docs/source/en/imgs/restoration_inpainting.png", help="PNG to write.")
    parser.add_argument("--steps", type=int, default=50, help="RePaint respaced steps (50; the paper: 250).")
    parser.add_argument("--jump_length", type=int, default=5, help="RePaint jump length (5; the paper: 10).")
    parser.add_argument("--jump_n_sample", type=int, default=3, help="RePaint passes per segment (3; the paper: 10).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window_batch_size", type=int, default=16, help="Windows per network call (speed only).")
    parser.add_argument("--scale", type=float, default=1.5, help="Pixels per millimetre.")
    parser.add_argument("--save_nifti", default=None, help="Also write before / mask / after NIfTI files here.")
    args = parser.parse_args(argv)

    fm = PatchSlidingWindowPipeline.from_pretrained(patch_demo_model_path())
    scheduler = RePaintDDPMScheduler.from_config(fm.scheduler.config, timestep_spacing="linspace")
    pipe = RePaint3DPipeline.from_pipe(fm, scheduler=scheduler)
    window = pipe.hu_window("Chest")
    spacing = tuple(pipe.get_region("Chest").spacing)
    prep = VolumePreprocessor(f"ct:{window.min_hu:g}:{window.max_hu:g}", spacing=spacing, multiple=2)
    ct = prep(os.path.join(args.data_dir, CT_FILE))[None]  # (1, 1, D, H, W) in [-1, 1]
    lesion = prep.labels(os.path.join(args.data_dir, LABEL_FILE))[None].float().clamp(0, 1)
    replace = F.max_pool3d(lesion, 3, stride=1, padding=1)  # dilated by one voxel
    start = time.perf_counter()
    inpainted = pipe(
        ct, 1 - replace, region="Chest", num_inference_steps=args.steps, jump_length=args.jump_length,
        jump_n_sample=args.jump_n_sample, window_batch_size=args.window_batch_size,
        generator=torch.Generator().manual_seed(args.seed), output_type="pt",
    ).volumes  # fmt: skip
    elapsed = time.perf_counter() - start

    inside = replace.bool()
    before_hu, after_hu = window.inverse(ct), window.inverse(inpainted)
    tumour = lesion.bool()
    print(f"volume {tuple(ct.shape[2:])}, replaced {int(inside.sum())} voxels, {elapsed:.0f} s")
    before_tumour, after_tumour = before_hu[tumour].round().tolist(), after_hu[tumour].round().tolist()
    print(f"tumour voxels before / after (HU): {before_tumour} / {after_tumour}")
    print(
        f"replaced region mean HU before {before_hu[inside].mean():.0f}, after {after_hu[inside].mean():.0f}; "
        f"below -500 HU before {(before_hu[inside] < -500).float().mean():.0%}, after "
        f"{(after_hu[inside] < -500).float().mean():.0%}; "
        f"max |change| outside (model space) {(inpainted - ct)[~inside].abs().max():.2g}"
    )
    centre = [int(c) for c in torch.nonzero(lesion[0, 0]).float().mean(0).round().tolist()]
    volumes = [
        ("before\n(lung1, 8 mm)", ct[0, 0].numpy()),
        (f"mask: {int(inside.sum())} voxels\nreplaced (red)", ct[0, 0].numpy()),
        (f"after: RePaint\n{args.steps} steps,\njumps {args.jump_length} x {args.jump_n_sample}", inpainted[0, 0]),
    ]
    volumes = [(label, torch.as_tensor(volume).numpy()) for label, volume in volumes]
    rows = rows_for(volumes, spacing, centre, args.scale, mask=replace[0, 0].numpy())
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    sheet(rows, args.scale).save(args.output)
    print(f"wrote {args.output}")
    if args.save_nifti:
        affine = affine_from_tensor_spacing(spacing)
        for name, volume in (("before", before_hu), ("mask", replace), ("after", after_hu)):
            save_nifti(volume, os.path.join(args.save_nifti, f"lung1_{name}.nii.gz"), affine=affine)


if __name__ == "__main__":
    main()

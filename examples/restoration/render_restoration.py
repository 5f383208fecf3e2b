"""Before / after mid-slices of DiffPIR restorations of the shared chest CT with the bundled MedDiff-FM demo prior.

    python examples/restoration/render_restoration.py --data_dir ../shared/data --tasks ct_sparse_view ct_sr_4x

For each task (the recipes of `benchmarks/restoration_tasks.py`, whose degradations and scores this reuses, so
the numbers are those of the restoration guide's table for the same steps and seed) one PNG,
`docs/source/en/imgs/restoration_<task>.png`: rows ground truth, the baseline (FBP, trilinear, ...) and DiffPIR, with
PSNR / SSIM against the truth, columns the axial, coronal and sagittal mid-slices in the prior's window
[-1400, 400] HU (drawn as `examples/demo/render_samples.py` draws them).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

from meddiffusers import DiffPIRPipeline, PatchSlidingWindowPipeline
from meddiffusers.demo import patch_demo_model_path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "demo"))
from render_samples import radiological_planes, sheet, tile  # noqa: E402

NAMES = {
    "ct_denoise": "denoising (60 HU)",
    "ct_sr_4x": "z-SR x4",
    "ct_sr_5x": "z-SR x5",
    "ct_sparse_view": "sparse view (24)",
    "ct_inpaint": "inpainting (box)",
}


def load_tasks_module():
    """`benchmarks/restoration_tasks.py` (its task definitions and scores)."""
    path = os.path.join(ROOT, "benchmarks", "restoration_tasks.py")
    spec = importlib.util.spec_from_file_location("restoration_tasks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--tasks", nargs="+", default=["ct_sparse_view", "ct_sr_4x"], choices=sorted(NAMES))
    parser.add_argument("--steps", type=int, default=50, help="DiffPIR's quad timesteps (50).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "docs", "source", "en", "imgs"))
    parser.add_argument("--scale", type=float, default=1.5, help="Pixels per millimetre.")
    args = parser.parse_args(argv)
    tasks = load_tasks_module()
    fm = PatchSlidingWindowPipeline.from_pretrained(patch_demo_model_path())
    pipe = DiffPIRPipeline.from_pipe(fm)
    spacing = tuple(fm.get_region("Chest").spacing)
    for name in args.tasks:
        task = tasks.ct_task(name, args.data_dir, fm, args.seed)
        start = time.perf_counter()
        restored = pipe(
            task["measurement"], task["operator"], num_inference_steps=args.steps,
            intensity_map=task["intensity_map"], generator=torch.Generator().manual_seed(args.seed),
            output_type="pt", region="Chest", window_size=16, overlap=0.5, window_batch_size=16, **task["arguments"],
        ).volumes  # fmt: skip
        elapsed = time.perf_counter() - start
        rows = []
        for label, volume in (
            ("ground truth", task["truth"]),
            (task["baseline_name"], task["baseline"]),
            (f"DiffPIR\n{args.steps} steps", restored),
        ):
            volume = volume.float().clamp(-1, 1)
            score = "" if label == "ground truth" else tasks.scores(volume, task["truth"])
            text = f"{label}\n{score['psnr']:.2f} dB / {score['ssim']:.3f}" if score else label
            planes = radiological_planes(volume[0, 0].numpy(), spacing)
            tiles = [tile(plane, mm, letters, args.scale) for _, plane, mm, letters in planes]
            rows.append((f"{NAMES[name]}:\n{text}", tiles))
            print(f"{name}: {label.splitlines()[0]} {score or ''}")
        path = os.path.join(args.output_dir, f"restoration_{name.removeprefix('ct_')}.png")
        os.makedirs(args.output_dir, exist_ok=True)
        sheet(rows, args.scale).save(path)
        print(f"wrote {path} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()

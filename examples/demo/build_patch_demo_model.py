"""Train the small MedDiff-FM demonstration pipeline shipped with meddiffusers (`--model meddiff-fm-demo`).

    python examples/demo/build_patch_demo_model.py --data_dir ../shared/data --work_dir /tmp/fm-demo \
        --output_dir src/meddiffusers/demo/meddiff-fm-demo

Data (redistribution allowed, attribution in the model card): the BSD-3 CT chest `lung1` of the pyradiomics test
data (stored LPS, 0.57 x 0.57 x 5 mm). `examples/train_patch_unet.py` brings it to RAS+, resamples it to 8 mm voxels
(a 30 x 36 x 36 volume: the whole chest) and maps the chest HU window [-1400, 400] to [-1, 1]; its multi-level
patches are 16³ windows: the whole chest resized, a 32³ crop resized, or a native 16³ crop, each with its global
coordinates. Sampling the default 28 x 36 x 36 volume takes 3 x 4 x 4 windows at overlap 0.5. The result is a
demonstration of the recipe and of sliding-window sampling, not a clinical model.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from build_demo_model import strip_machine_paths  # examples/demo/, this script's folder

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.dirname(HERE)
SOURCE = "ct_chest_pyradiomics_lung1.nii.gz"
SPACING = (8.0, 8.0, 8.0)
PATCH = 16
REGIONS = [
    {
        "name": "Chest",
        "class_id": 0,
        "aliases": ["CTChest", "Thorax"],
        "volume_size": [28, 36, 36],
        "spacing": list(SPACING),
        "description": "CT of the chest (demo, 8 mm voxels, RAS+)",
        "intensity_window": [-1400.0, 400.0],
    }
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--resume_from_checkpoint", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    os.makedirs(args.work_dir, exist_ok=True)
    manifest = os.path.join(args.work_dir, "manifest.json")
    with open(manifest, "w") as handle:
        json.dump(
            [
                {
                    "image": os.path.abspath(os.path.join(args.data_dir, SOURCE)),
                    "region": "Chest",
                }
            ],
            handle,
        )
    regions = os.path.join(args.work_dir, "regions.json")
    with open(regions, "w") as handle:
        json.dump(REGIONS, handle)
    command = [
        sys.executable, os.path.join(EXAMPLES, "train_patch_unet.py"),
        "--train_data", manifest, "--regions", regions, "--output_dir", args.work_dir,
        "--spacing", *map(str, SPACING), "--patch_size", str(PATCH),
        "--block_out_channels", "16", "32", "--attention_levels", "0", "1", "--attention_head_dim", "16",
        "--norm_num_groups", "8", "--num_position_frequencies", "4",
        "--train_batch_size", "4", "--learning_rate", "5e-4", "--max_train_steps", str(args.steps),
        "--ema_decay", "0.999", "--checkpointing_steps", "500", "--checkpoints_total_limit", "2",
        "--validation_steps", "0", "--report_to", "none", "--seed", "0",
    ]  # fmt: skip
    if args.resume_from_checkpoint:
        command += ["--resume_from_checkpoint", args.resume_from_checkpoint]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    os.makedirs(args.output_dir, exist_ok=True)
    for part in ("model_index.json", "unet", "scheduler"):
        source = os.path.join(args.work_dir, part)
        subprocess.run(["cp", "-r", source, args.output_dir], check=True)
    strip_machine_paths(args.output_dir)
    print(f"built {args.output_dir} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()

"""Train the small demonstration pipeline shipped with meddiffusers (`meddiffusers generate`'s default model).

    OMP_NUM_THREADS=1 python examples/demo/build_demo_model.py --data_dir ../shared/data --work_dir /tmp/demo \
        --output_dir src/meddiffusers/demo/meddiffusion-demo

The defaults (3000 / 400 / 12000 steps) are the recipe of the bundled model (2.5 hours on two shared CPU cores;
one thread per process is much faster than two when other jobs share the cores).

Data (redistribution allowed, attribution in the model card): an Apache-2.0 T1-weighted MRI head slab from the
Insight Toolkit examples (stored LSA) and a BSD-3 CT chest from the pyradiomics test data (stored LPS). Both are
reoriented to RAS+ (so the tensor D axis runs inferior -> superior and a D slice is axial, H left -> right, W
posterior -> anterior), resampled to coarse voxels that make the 32 x 64 x 64 grid cover the anatomy, and centred in
it, small enough for the whole recipe to train on a laptop CPU. The latents are cached without augmentation, so the
model only ever sees the anatomy in its true orientation. The result is a demonstration of the recipe, not a
clinical or research-grade model.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from meddiffusers import load_nifti, save_nifti
from meddiffusers.io import affine_from_tensor_spacing

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.dirname(HERE)
# (file, (D, H, W) spacing in mm of the RAS+ tensor). The MR head slab is 256 mm S-I x 256 mm R-L x 186 mm A-P once
# canonical: 8 mm x 32 and 4 mm x 64 cover it (the A-P extent, 46 voxels, is centred and padded). The CT chest is
# 240 mm S-I x 292 mm x 292 mm: 7.5 mm x 32 and 4.5625 mm x 64.
SOURCES = {
    "MRBrainT1": ("mr_t1_itk_kmeanstest.nii.gz", (8.0, 4.0, 4.0)),
    "CTChestAbdomen": ("ct_chest_pyradiomics_lung1.nii.gz", (7.5, 4.5625, 4.5625)),
}
SIZE = (32, 64, 64)
REGIONS = [
    {
        "name": "MRBrainT1",
        "class_id": 0,
        "aliases": ["MRBrain", "MRT1Brain", "BrainT1"],
        "volume_size": list(SIZE),
        "spacing": list(SOURCES["MRBrainT1"][1]),
        "description": "T1-weighted MRI of the head (demo, coarse voxels, RAS+)",
    },
    {
        "name": "CTChestAbdomen",
        "class_id": 1,
        "aliases": ["CTChest", "CTThorax"],
        "volume_size": list(SIZE),
        "spacing": list(SOURCES["CTChestAbdomen"][1]),
        "description": "CT of the chest (demo, coarse voxels, RAS+)",
    },
]


def canonical_demo_volume(path, spacing, size=SIZE) -> torch.Tensor:
    """A source volume as the demo model sees it: `(1, 1, D, H, W)` in RAS+ (D inferior -> superior, H left ->
    right, W posterior -> anterior), resampled to `spacing` and centred (cropped / padded with its minimum) in
    `size`. Scanner intensities are kept; training scales them per volume."""
    volume = load_nifti(path, canonical=True)
    grid = [round(n * s / t) for n, s, t in zip(volume.tensor.shape[2:], volume.spacing, spacing)]
    tensor = F.interpolate(volume.tensor.float(), size=grid, mode="trilinear", align_corners=False)
    background = float(tensor.min())
    for axis, want in enumerate(size, start=2):
        have = tensor.shape[axis]
        if have > want:
            tensor = tensor.narrow(axis, (have - want) // 2, want)
        elif have < want:
            before = (want - have) // 2
            pads = [0, 0] * (4 - axis) + [before, want - have - before]
            tensor = F.pad(tensor, pads, value=background)
    return tensor


def resample(path, spacing, target):
    """Write the canonical, resampled demo volume of `path` to `target` with a diagonal (RAS+) affine."""
    save_nifti(canonical_demo_volume(path, spacing), target, affine=affine_from_tensor_spacing(spacing))


def strip_machine_paths(folder):
    """Drop `_name_or_path` (the absolute path of the build folder) from every config written under `folder`."""
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
            if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run(*args):
    print("+", " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *map(str, args)], check=True)
    print(f"= {os.path.basename(str(args[0]))} took {time.perf_counter() - start:.0f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--ae_steps", type=int, default=3000)
    parser.add_argument("--joint_steps", type=int, default=400)
    parser.add_argument("--unet_steps", type=int, default=12000)
    args = parser.parse_args()
    started = time.perf_counter()
    os.makedirs(args.work_dir, exist_ok=True)
    rows = []
    for region, (name, spacing) in SOURCES.items():
        target = os.path.join(args.work_dir, f"{region}.nii.gz")
        resample(os.path.join(args.data_dir, name), spacing, target)
        rows.append({"image": target, "region": region})
    manifest = os.path.join(args.work_dir, "manifest.json")
    with open(manifest, "w") as handle:
        json.dump(rows, handle)
    regions = os.path.join(args.work_dir, "regions.json")
    with open(regions, "w") as handle:
        json.dump(REGIONS, handle)
    ae = [
        "--block_out_channels",
        16,
        32,
        "--latent_channels",
        4,
        "--num_vq_embeddings",
        256,
        "--norm_num_groups",
        8,
        "--patch_size",
        16,
        "--disc_channels",
        8,
        "--disc_layers",
        2,
        "--report_to",
        "none",
        "--seed",
        0,
    ]
    work = args.work_dir
    run(
        f"{EXAMPLES}/train_vqmodel3d.py",
        "--stage",
        "patch",
        "--train_data",
        manifest,
        "--output_dir",
        f"{work}/s1",
        "--max_train_steps",
        args.ae_steps,
        "--learning_rate",
        1e-3,
        "--train_batch_size",
        2,
        "--disc_start_step",
        args.ae_steps * 2 // 3,
        "--checkpointing_steps",
        100000,
        *ae,
    )
    run(
        f"{EXAMPLES}/train_vqmodel3d.py",
        "--stage",
        "joint",
        "--pretrained_vqvae",
        f"{work}/s1/vqvae",
        "--train_data",
        manifest,
        "--output_dir",
        f"{work}/s2",
        "--max_train_steps",
        args.joint_steps,
        "--learning_rate",
        3e-4,
        "--checkpointing_steps",
        100000,
        *ae,
    )
    run(
        f"{EXAMPLES}/cache_latents.py",
        "--pretrained_vqvae",
        f"{work}/s2/vqvae",
        "--train_data",
        manifest,
        "--output_dir",
        f"{work}/latents",
        "--regions",
        regions,
        "--volume_size",
        *SIZE,
        "--augmentation",
        "none",
        "--augment_copies",
        0,
    )
    run(
        f"{EXAMPLES}/train_biflownet.py",
        "--train_latents",
        f"{work}/latents",
        "--pretrained_vqvae",
        f"{work}/s2/vqvae",
        "--output_dir",
        f"{work}/unet",
        "--base_channels",
        12,
        "--channel_mults",
        1,
        1,
        2,
        2,
        "--attention_levels",
        0,
        0,
        1,
        1,
        "--attention_heads",
        4,
        "--norm_num_groups",
        4,
        "--dit_num_heads",
        4,
        "--dit_patch_size",
        2,
        "--max_train_steps",
        args.unet_steps,
        "--train_batch_size",
        2,
        "--learning_rate",
        3e-4,
        "--loss_type",
        "l2",
        "--use_ema",
        "--ema_decay",
        0.999,
        "--checkpointing_steps",
        100000,
        "--report_to",
        "none",
    )
    if os.path.isdir(args.output_dir):
        shutil.rmtree(args.output_dir)
    shutil.copytree(f"{work}/unet/pipeline", args.output_dir)
    strip_machine_paths(args.output_dir)
    print(f"demo pipeline written to {args.output_dir} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    with torch.no_grad():
        main()

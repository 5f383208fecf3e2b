"""Convert the released 3D MedDiffusion checkpoints into a meddiffusers folder.

    python scripts/convert_checkpoints/convert_meddiffusion_to_diffusers.py \
        --vqvae_checkpoint checkpoints/PatchVolume_8x_s2.ckpt \
        --unet_checkpoint checkpoints/BiFlowNet_0453500.pt \
        --output_dir meddiffusion-8x [--dtype fp16] [--push_to_hub --repo_id user/meddiffusion-8x]

Same as `meddiffusers convert ...`. The original files are read without executing pickled code.
"""

import sys

from meddiffusers.conversion import build_argument_parser, run_from_args

if __name__ == "__main__":
    try:
        sys.exit(run_from_args(build_argument_parser().parse_args()))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

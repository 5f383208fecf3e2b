"""Generate one volume per region with a pipeline and save a PNG of its three orthogonal mid-slices.

    python examples/demo/render_mid_slices.py --model src/meddiffusers/demo/meddiffusion-demo \
        --output docs/source/en/imgs/demo_samples.png --steps 100 --seed 0
"""

import argparse

import numpy as np
import torch
from PIL import Image

from meddiffusers import MedDiffusionPipeline


def to_image(plane: np.ndarray, size: int) -> Image.Image:
    scaled = np.clip((plane + 1) / 2, 0, 1) * 255
    return Image.fromarray(scaled.astype(np.uint8)).resize((size, size), Image.NEAREST)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=192, help="Side of each slice in the PNG (pixels).")
    args = parser.parse_args()
    pipe = MedDiffusionPipeline.from_pretrained(args.model)
    rows = []
    for region in pipe.region_registry.names:
        generator = torch.Generator().manual_seed(args.seed)
        volume = pipe(region, num_inference_steps=args.steps, generator=generator).volumes[0, 0]
        depth, height, width = volume.shape
        # Axial (a D slice), coronal-like (an H slice) and sagittal-like (a W slice) planes through the centre.
        planes = [volume[depth // 2], volume[:, height // 2, :][::-1], volume[:, :, width // 2][::-1]]
        row = Image.new("L", (3 * args.tile, args.tile))
        for index, plane in enumerate(planes):
            row.paste(to_image(np.ascontiguousarray(plane), args.tile), (index * args.tile, 0))
        rows.append(row)
    sheet = Image.new("L", (3 * args.tile, len(rows) * args.tile))
    for index, row in enumerate(rows):
        sheet.paste(row, (0, index * args.tile))
    sheet.save(args.output)
    print(f"wrote {args.output} (rows: {', '.join(pipe.region_registry.names)})")


if __name__ == "__main__":
    main()

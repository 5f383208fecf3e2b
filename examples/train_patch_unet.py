"""Train MedDiff-FM's patch denoiser (PatchUNet3DModel) on CT volumes and save a PatchSlidingWindowPipeline.

    accelerate launch examples/train_patch_unet.py --train_data manifest.json --output_dir outputs/meddiff-fm \
        --patch_size 128 --train_batch_size 2 --gradient_accumulation_steps 4 --max_train_steps 200000 \
        --mixed_precision bf16 --checkpointing_steps 5000 --checkpoints_total_limit 3 --validation_steps 5000

The manifest (JSON or CSV) lists NIfTI CT volumes in HU with their `region` (`HeadNeck`, `Chest`, `Abdomen`, an alias
or a class id of `--regions`) and optionally an `anatomy` label file on the same grid (0 background). Every volume is
brought to RAS, resampled to `--spacing` (1 mm) and windowed with its region's HU window to [-1, 1], once per
process (then kept in memory). Each training sample is a multi-level patch: with probability 1/3 each the whole
volume resized to the patch size, a crop of twice the patch size resized, or a native patch crop, with its global
coordinate map and anatomy through the same crop and resize (`meddiffusers.training.multilevel`).

Recipe: cosine schedule (`squaredcos_cap_v2`, T = 1000), epsilon prediction, L1 loss, Adam at 1e-4, an EMA of the
weights for sampling. The result in `--output_dir` loads with `PatchSlidingWindowPipeline.from_pretrained`.
Multi-GPU and multi-node come from Accelerate's own configuration with no change here.
"""

import argparse
import json
import os
from dataclasses import replace

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import EMAModel

from meddiffusers import PatchSlidingWindowPipeline, PatchUNet3DModel
from meddiffusers.io.regions import RegionRegistry, meddiff_fm_regions
from meddiffusers.models.unets.unet_patch_3d import ANATOMY_ENCODINGS
from meddiffusers.training.data import VolumePreprocessor, read_manifest
from meddiffusers.training.loop import (
    finish_step,
    model_with_ema_weights,
    optimization_step,
    resumable_batches,
    save_final_pipeline,
    start_run,
)
from meddiffusers.training.multilevel import DEFAULT_LEVEL_PROBABILITIES, sample_multilevel_patch
from meddiffusers.training.setup import (
    add_training_arguments,
    build_accelerator,
    build_lr_scheduler,
    diffuse,
    step_generator,
)

logger = get_logger(__name__)
PATCH_STREAM = 1  # the patch and anatomy-dropout draws of a micro-step; the noise is stream 0 (`diffuse`)


def parse_args(argv=None):
    """The command line (see `--help`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_data", required=True, help="Manifest (JSON or CSV): image, region, optional anatomy.")
    p.add_argument("--output_dir", required=True, help="Checkpoints, validation volumes and the final pipeline.")
    p.add_argument("--regions", default=None, help="JSON list of region dicts (default: MedDiff-FM's three).")
    # data
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="(D, H, W) spacing in mm.")
    p.add_argument("--orientation", default="RAS", help="Axis codes every volume is brought to (or 'native').")
    p.add_argument("--patch_size", type=int, nargs="+", default=[128], help="One side or (D, H, W).")
    p.add_argument(
        "--level_probabilities",
        type=float,
        nargs=3,
        default=list(DEFAULT_LEVEL_PROBABILITIES),
        help="Probabilities of the whole-volume, 2x-patch and native-patch levels.",
    )
    p.add_argument("--anatomy_dropout", type=float, default=0.1, help="Probability to train without the anatomy.")
    # architecture (defaults: the paper's base width 32, one block per level, attention at 16^3 of a 128^3 patch)
    p.add_argument("--unet_config", default=None, help="JSON config of a new PatchUNet3DModel (overrides the flags).")
    p.add_argument("--pretrained_unet", default=None, help="Start from this PatchUNet3DModel or pipeline folder.")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 128, 128])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--attention_levels", type=int, nargs="+", default=[0, 0, 0, 1])
    p.add_argument("--no_mid_block_attention", action="store_true")
    p.add_argument("--attention_head_dim", type=int, default=32)
    p.add_argument("--transformer_layers", type=int, default=1)
    p.add_argument("--norm_num_groups", type=int, default=16)
    p.add_argument("--region_cross_attention", action="store_true")
    p.add_argument("--num_position_frequencies", type=int, default=4)
    p.add_argument("--no_raw_position", action="store_true", help="Drop the raw coordinates from the encoding.")
    p.add_argument("--anatomy_encoding", choices=["none", *ANATOMY_ENCODINGS], default="none")
    p.add_argument("--num_anatomy_classes", type=int, default=118)
    # optimisation, EMA, checkpoints, validation, logging (shared with the other training scripts)
    add_training_arguments(p, learning_rate=1e-4, use_ema=True)
    p.add_argument("--train_batch_size", type=int, default=1, help="Volumes (= patches) per device and micro-step.")
    p.add_argument("--validation_regions", nargs="+", default=None, help="Default: every region of the manifest.")
    p.add_argument("--validation_volume_size", type=int, nargs=3, default=None, help="Default: one patch.")
    args = p.parse_args(argv)
    if len(args.patch_size) not in (1, 3):
        p.error("--patch_size takes one side or three (D, H, W).")
    args.patch_size = tuple(args.patch_size * 3 if len(args.patch_size) == 1 else args.patch_size)
    if not 0 <= args.anatomy_dropout <= 1:
        p.error("--anatomy_dropout is a probability in [0, 1].")
    return args


def load_regions(path) -> RegionRegistry:
    """The regions of `--regions` (a JSON list of region dicts), or MedDiff-FM's; each needs an HU window."""
    registry = meddiff_fm_regions()
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            registry = RegionRegistry(json.load(handle))
    missing = [region.name for region in registry.regions if region.intensity_window is None]
    if missing:
        raise ValueError(f"{path}: regions {missing} have no `intensity_window` (the HU window mapped to [-1, 1]).")
    return registry


def at_spacing(regions: RegionRegistry, spacing) -> RegionRegistry:
    """The regions at the training `spacing`, which the saved pipeline writes into the affines of its volumes."""
    spacing = tuple(float(s) for s in spacing)
    changed = [region.name for region in regions.regions if tuple(region.spacing) != spacing]
    if changed:
        logger.warning(f"Regions {changed} are saved with the training spacing {spacing} mm.")
    return RegionRegistry([replace(region, spacing=spacing, other_sizes=()) for region in regions.regions])


class RegionVolumes(torch.utils.data.Dataset):
    """The manifest's volumes in model space, each read and preprocessed once and then kept in memory.

    Items are `{"image": (1, D, H, W) float in [-1, 1], "anatomy": (1, D, H, W) int64 or None, "class_labels": id}`:
    RAS (or `orientation`), resampled to `spacing`, HU windowed with the region's window; the anatomy (read only when
    `num_anatomy_classes` is given, labels `0 .. num_anatomy_classes`) through the same orientation and
    nearest-neighbour resampling.
    """

    def __init__(self, manifest, regions: RegionRegistry, spacing, orientation="RAS", num_anatomy_classes=None):
        self.manifest, self.regions = manifest, regions
        self.spacing, self.orientation = tuple(spacing), orientation
        self.num_anatomy_classes = num_anatomy_classes
        self.cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.manifest)

    def preprocessor(self, class_id: int) -> VolumePreprocessor:
        """Preprocessing with the HU window of the region `class_id`."""
        low, high = self.regions.resolve(int(class_id)).intensity_window
        return VolumePreprocessor(f"ct:{low!r}:{high!r}", self.spacing, orientation=self.orientation)

    def load(self, index: int) -> dict:
        """Read and preprocess item `index` (no cache)."""
        row = self.manifest[index]
        preprocessor = self.preprocessor(row["class_id"])
        image = preprocessor(row["image"])[:1]
        anatomy = None
        if row["anatomy"] and self.num_anatomy_classes is not None:
            anatomy = preprocessor.labels(row["anatomy"])[:1]
            if anatomy.shape != image.shape:
                raise ValueError(
                    f"{row['anatomy']}: anatomy grid {tuple(anatomy.shape[1:])} differs from its image "
                    f"{row['image']} {tuple(image.shape[1:])} after preprocessing; resample it onto the image grid."
                )
            if anatomy.min() < 0 or anatomy.max() > self.num_anatomy_classes:
                raise ValueError(
                    f"{row['anatomy']}: labels must lie in [0, {self.num_anatomy_classes}] (--num_anatomy_classes)."
                )
        return {"image": image, "anatomy": anatomy, "class_labels": int(row["class_id"])}

    def __getitem__(self, index: int) -> dict:
        if index not in self.cache:
            self.cache[index] = self.load(index)
        return self.cache[index]


def collate(items):
    """Whole volumes of different sizes stay a list; the patches are drawn in the training loop."""
    return items


def build_unet(args, num_classes: int) -> PatchUNet3DModel:
    """A new model from `--unet_config` or the flags, or the `--pretrained_unet` one."""
    if args.pretrained_unet:
        subfolder = "unet" if os.path.isdir(os.path.join(args.pretrained_unet, "unet")) else None
        return PatchUNet3DModel.from_pretrained(args.pretrained_unet, subfolder=subfolder)
    if args.unet_config:
        model = PatchUNet3DModel.from_config(PatchUNet3DModel.load_config(args.unet_config))
    else:
        model = PatchUNet3DModel(
            block_out_channels=args.block_out_channels,
            layers_per_block=args.layers_per_block,
            attention_levels=[bool(a) for a in args.attention_levels],
            mid_block_attention=not args.no_mid_block_attention,
            attention_head_dim=args.attention_head_dim,
            transformer_layers=args.transformer_layers,
            norm_num_groups=args.norm_num_groups,
            num_class_embeds=num_classes,
            region_cross_attention=args.region_cross_attention,
            num_position_frequencies=args.num_position_frequencies,
            include_raw_position=not args.no_raw_position,
            anatomy_encoding=None if args.anatomy_encoding == "none" else args.anatomy_encoding,
            num_anatomy_classes=args.num_anatomy_classes,
        )
    if model.config.num_class_embeds is not None and model.config.num_class_embeds < num_classes:
        raise ValueError(
            f"The model has {model.config.num_class_embeds} region embeddings; the regions need {num_classes}."
        )
    return model


def make_batch(items, args, micro_step, accelerator, use_anatomy: bool) -> dict:
    """Multi-level patches of a list of whole volumes, drawn from the micro-step's own random stream (exact resume)."""
    generator = step_generator(args.seed, micro_step, accelerator, stream=PATCH_STREAM)
    images, positions, anatomies = [], [], []
    for item in items:
        patch = sample_multilevel_patch(
            item["image"], args.patch_size, generator, item["anatomy"], args.level_probabilities
        )
        images.append(patch.image)
        positions.append(patch.position)
        labels = patch.anatomy if patch.anatomy is not None else torch.zeros_like(patch.image, dtype=torch.long)
        if float(torch.rand((), generator=generator)) < args.anatomy_dropout:
            labels = torch.zeros_like(labels)  # background: the model also learns to sample without a mask
        anatomies.append(labels)
    device = accelerator.device
    batch = {
        "pixel_values": torch.stack(images).to(device),
        "position": torch.stack(positions).to(device),
        "class_labels": torch.tensor([item["class_labels"] for item in items], device=device),
    }
    if use_anatomy:
        batch["anatomy"] = torch.stack(anatomies).to(device)
    return batch


def build_pipeline(accelerator, unet, ema, scheduler, regions, patch_size) -> PatchSlidingWindowPipeline:
    """A pipeline with a copy of the (EMA) weights, for validation and the final save; its default window is the
    training patch."""
    model = model_with_ema_weights(accelerator, unet, ema)
    window = patch_size[0] if len(set(patch_size)) == 1 else tuple(patch_size)  # a cube is saved as one side
    return PatchSlidingWindowPipeline(unet=model, scheduler=scheduler, regions=regions.to_config(), window_size=window)


def validate(args, pipeline, names, step) -> list[str]:
    """One volume per region (few steps), saved in HU as NIfTI under `output_dir/validation/step-N`."""
    pipeline.set_progress_bar_config(disable=True)
    output = pipeline(
        region=names,
        volume_size=args.validation_volume_size or args.patch_size,
        window_size=args.patch_size,
        num_inference_steps=args.validation_inference_steps,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="nifti",
    )
    paths = output.save(os.path.join(args.output_dir, "validation", f"step-{step}"))
    logger.info(f"step {step}: validation volumes {paths}")
    return paths


def main(argv=None):
    """Train, checkpoint, validate and save the pipeline."""
    args = parse_args(argv)
    accelerator = build_accelerator(args)

    regions = at_spacing(load_regions(args.regions), args.spacing)
    manifest = read_manifest(args.train_data, regions)
    num_classes = max(region.class_id for region in regions.regions) + 1
    unet = build_unet(args, num_classes)
    if any(side % unet.size_multiple for side in args.patch_size):
        raise ValueError(f"--patch_size {args.patch_size} must be a multiple of {unet.size_multiple} for this model.")
    use_anatomy = unet.config.anatomy_encoding is not None
    if not use_anatomy and any(manifest["anatomy"]):
        logger.warning("The manifest has anatomy files but the model takes none (--anatomy_encoding): ignored.")
    dataset = RegionVolumes(
        manifest, regions, args.spacing, args.orientation, unet.config.num_anatomy_classes if use_anatomy else None
    )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=PatchUNet3DModel, model_config=unet.config)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        thresholding=True,
        sample_max_value=1.0,
    )
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.learning_rate)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,  # keeps each worker's cache of preprocessed volumes
    )
    lr_scheduler = build_lr_scheduler(args, optimizer, accelerator)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    loader = accelerator.prepare_data_loader(loader, device_placement=False)  # whole volumes stay on the CPU
    validation_names = args.validation_regions or [
        regions.resolve(class_id).name for class_id in sorted(set(manifest["class_id"]))
    ]

    global_step, progress = start_run(accelerator, args, "train_patch_unet", ema, logger)
    alphas = noise_scheduler.alphas_cumprod.to(accelerator.device)
    loss_fn = F.l1_loss if args.loss_type == "l1" else F.mse_loss
    loss = torch.tensor(float("nan"))
    batches = resumable_batches(
        accelerator, loader, global_step, args.gradient_accumulation_steps, args.max_train_steps
    )
    for micro_step, items in batches:
        batch = make_batch(items, args, micro_step, accelerator, use_anatomy)
        with accelerator.accumulate(unet):
            noisy, noise, timesteps = diffuse(batch["pixel_values"], alphas, args.seed, micro_step, accelerator)
            prediction = unet(
                noisy, timesteps, batch["class_labels"], position=batch["position"], anatomy=batch.get("anatomy")
            ).sample
            loss = loss_fn(prediction.float(), noise.float())
            optimization_step(accelerator, unet, loss, optimizer, lr_scheduler, args.max_grad_norm)
        if not accelerator.sync_gradients:
            continue
        global_step = finish_step(accelerator, args, unet, ema, progress, global_step, loss, lr_scheduler)
        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            scheduler = DDIMScheduler.from_config(noise_scheduler.config)  # few steps, deterministic
            pipeline = build_pipeline(accelerator, unet, ema, scheduler, regions, args.patch_size).to(
                accelerator.device
            )
            validate(args, pipeline, validation_names, global_step)
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info(f"Finished at step {global_step}; last loss {loss.detach().item():.6f}")
        pipeline = build_pipeline(accelerator, unet, ema, noise_scheduler, regions, args.patch_size)
        save_final_pipeline(pipeline, args.output_dir, args, logger)
    accelerator.end_training()


if __name__ == "__main__":
    main()

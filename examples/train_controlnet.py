"""Fine-tune a ControlNet on a frozen pipeline: 3D MedDiffusion (latent) or MedDiff-FM's patch model (CT windows).

    accelerate launch examples/train_controlnet.py --pretrained_model meddiffusion-8x --train_data manifest.json \
        --condition sparse_view_ct --num_views 18 --volume_size 256 256 256 --output_dir cn-svct \
        --max_train_steps 20000 --mixed_precision bf16 --checkpointing_steps 1000 --validation_steps 1000

    accelerate launch examples/train_controlnet.py --pretrained_model meddiff-fm --train_data ct.json \
        --condition thick_slice --slice_factor 5 --patch_size 128 --output_dir cn-sr --max_train_steps 20000

Conditions are built on the fly from each ground-truth volume (`sparse_view_ct`: parallel-beam FBP of `--num_views`
projections per slice; `undersampled_mri`: zero-filled reconstruction of a Cartesian `--acceleration`x mask;
`thick_slice`: every `--slice_factor` axial slices averaged and repeated back, for super-resolution; `mask`: the
manifest's `mask` label volume; `lesion_mask`: the same file as a binary mask, for lesion generation) or read from
the manifest's `condition` file (`paired`). The base model stays frozen; the ControlNet starts as a copy of its
encoder half with zero convolutions, so it changes nothing before training.

With a `MedDiffusionPipeline`, volumes are centre cropped/padded to `--volume_size`, condition and target are encoded
by the autoencoder, and the result is a `MedDiffusionControlNetPipeline` folder. With a `PatchSlidingWindowPipeline`
(read from `model_index.json`), every volume is windowed with its region's HU window and resampled to the region's
spacing (or `--spacing`), the condition is built on the whole volume, and training uses random native
`--patch_size` crops with their global coordinates (and anatomy crops where the manifest has `anatomy` files and
the U-Net takes them); the result is a `PatchSlidingWindowPipeline` folder with a `PatchControlNet3DModel`.
"""

import argparse
import math
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline

from meddiffusers import (
    ControlNet3DModel,
    MedDiffusionControlNetPipeline,
    MedDiffusionPipeline,
    PatchControlNet3DModel,
    PatchSlidingWindowPipeline,
    load_nifti,
    save_nifti,
)
from meddiffusers.operators import (
    segmentation_condition,
    sparse_view_ct_condition,
    thick_slice_condition,
    undersampled_mri_condition,
)
from meddiffusers.training.checkpoints import save_checkpoint
from meddiffusers.training.data import VolumePreprocessor, read_manifest
from meddiffusers.training.loop import start_run
from meddiffusers.training.multilevel import resize_image, sample_multilevel_patch
from meddiffusers.training.setup import build_accelerator, diffuse
from meddiffusers.utils import center_crop_or_pad
from meddiffusers.utils.validation import as_triple

logger = get_logger(__name__)
CONDITIONS = ("sparse_view_ct", "undersampled_mri", "thick_slice", "mask", "lesion_mask", "paired")
LABEL_CONDITIONS = ("mask", "lesion_mask")  # built from the manifest's `mask` label file


def parse_args(argv=None):
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pretrained_model", required=True, help="MedDiffusionPipeline or PatchSlidingWindowPipeline (frozen)."
    )
    p.add_argument("--train_data", required=True, help="Manifest of NIfTI volumes (with `mask`/`condition` columns).")
    p.add_argument("--condition", choices=CONDITIONS, required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--volume_size", type=int, nargs=3, default=None, help="MedDiffusion: centre crop/pad volumes to (D, H, W)."
    )
    p.add_argument("--patch_size", type=int, nargs="+", default=[128], help="Patch model: training crop side(s).")
    p.add_argument("--num_views", type=int, default=18, help="sparse_view_ct: projections over a full circle.")
    p.add_argument("--acceleration", type=float, default=4.0, help="undersampled_mri: undersampling factor.")
    p.add_argument("--slice_factor", type=int, default=5, help="thick_slice: thin slices per thick slice.")
    p.add_argument("--num_mask_classes", type=int, default=None, help="mask: number of labels (default: from data).")
    p.add_argument("--intensity", default="percentile", help="MedDiffusion only (the patch model uses HU windows).")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="Resample to (D, H, W) mm.")
    p.add_argument("--resume_controlnet", default=None, help="Start from this ControlNet folder.")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--loss_type", choices=["l1", "l2"], default="l1")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    p.add_argument("--validation_steps", type=int, default=0)
    p.add_argument("--validation_inference_steps", type=int, default=50)
    p.add_argument("--report_to", default="tensorboard")
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    return p.parse_args(argv)


def make_condition(args, target, index, labels=None, paired=None):
    """The condition of a `(C, D, H, W)` model-space target: computed from it, from its label volume `labels`
    (`mask`, `lesion_mask`) or the `paired` volume read from the manifest."""
    if args.condition == "sparse_view_ct":
        return sparse_view_ct_condition(target[None], args.num_views)[0]
    if args.condition == "undersampled_mri":
        return undersampled_mri_condition(target[None], args.acceleration, seed=index)[0]
    if args.condition == "thick_slice":
        return thick_slice_condition(target[None], args.slice_factor)[0]
    if args.condition == "mask":
        return segmentation_condition(labels[None], args.num_mask_classes)[0]
    if args.condition == "lesion_mask":
        return segmentation_condition((labels[None] > 0).long(), 2)[0]
    return paired


def required_file(row, column, condition):
    """The manifest row's `column` file, or a `ValueError` naming the image that has none."""
    if not row[column]:
        raise ValueError(f"{row['image']}: the manifest gives no {column} file for it (needed by {condition}).")
    return row[column]


class ConditionedVolumes(torch.utils.data.Dataset):
    """Ground-truth volumes and their image-space conditions, cropped/padded to one size."""

    def __init__(self, manifest, args):
        self.manifest, self.args = manifest, args
        self.preprocessor = VolumePreprocessor(args.intensity, tuple(args.spacing) if args.spacing else None)

    def __len__(self):
        return len(self.manifest)

    def __getitem__(self, index):
        row, args = self.manifest[index], self.args
        target = center_crop_or_pad(self.preprocessor(row["image"]), args.volume_size)
        labels = paired = None
        if args.condition in LABEL_CONDITIONS:
            labels = load_nifti(required_file(row, "mask", args.condition)).tensor[0]
            labels = center_crop_or_pad(labels, args.volume_size).clamp(min=0)  # pad = background
        elif args.condition == "paired":
            paired = center_crop_or_pad(self.preprocessor(required_file(row, "condition", "paired")), args.volume_size)
        condition = make_condition(args, target, index, labels, paired)
        return {"target": target, "condition": condition.float(), "class_labels": int(row["class_id"])}


class ConditionedPatches(torch.utils.data.Dataset):
    """Native random crops of whole region volumes (HU window of the region) with their global coordinates, their
    anatomy crop and their condition (computed on the whole volume, then cropped by the same window).

    The crop depends only on `(seed, epoch, index)` ([`set_epoch`]), so a resumed run sees the same patches.
    """

    def __init__(self, manifest, args, base, patch_size, anatomy: bool):
        self.manifest, self.args, self.base = manifest, args, base
        self.patch_size, self.anatomy, self.epoch = patch_size, anatomy, 0

    def __len__(self):
        return len(self.manifest)

    def set_epoch(self, epoch: int):
        """Draw the crops of this epoch."""
        self.epoch = epoch

    def preprocessor(self, class_id: int) -> VolumePreprocessor:
        """HU window and spacing of the region: how its files become model space."""
        region = self.base.get_region(class_id)
        window = self.base.hu_window(region)
        spacing = tuple(self.args.spacing) if self.args.spacing else tuple(region.spacing)
        return VolumePreprocessor(f"ct:{window.min_hu}:{window.max_hu}", spacing)

    @staticmethod
    def on_grid(tensor, volume, path, image):
        """`tensor`, or a `ValueError` when it does not cover the image's voxel grid."""
        if tuple(tensor.shape[1:]) != tuple(volume.shape[1:]):
            raise ValueError(
                f"{path}: its grid {tuple(tensor.shape[1:])} differs from that of {image} {tuple(volume.shape[1:])}."
            )
        return tensor

    def __getitem__(self, index):
        row, args = self.manifest[index], self.args
        preprocessor = self.preprocessor(int(row["class_id"]))
        volume = preprocessor(row["image"])
        labels = paired = anatomy = None
        if args.condition in LABEL_CONDITIONS:
            path = required_file(row, "mask", args.condition)
            labels = self.on_grid(preprocessor.labels(path).clamp(min=0), volume, path, row["image"])
        elif args.condition == "paired":
            path = required_file(row, "condition", "paired")
            paired = self.on_grid(preprocessor(path), volume, path, row["image"])
        condition = make_condition(args, volume, index, labels, paired).float()
        if self.anatomy:
            path = required_file(row, "anatomy", "the anatomy-conditioned U-Net")
            anatomy = self.on_grid(preprocessor.labels(path), volume, path, row["image"])
        generator = torch.Generator().manual_seed(args.seed + 104729 * (self.epoch * len(self) + index))
        patch = sample_multilevel_patch(volume, self.patch_size, generator, anatomy=anatomy, level="native")
        item = {
            "target": patch.image,
            "condition": resize_image(condition[(slice(None), *patch.window)], self.patch_size).contiguous(),
            "position": patch.position,
            "class_labels": int(row["class_id"]),
        }
        if anatomy is not None:
            item["anatomy"] = patch.anatomy
        return item


class MedDiffusionTask:
    """A ControlNet3DModel on a frozen MedDiffusionPipeline: latent conditions and targets."""

    def __init__(self, args):
        if args.volume_size is None:
            raise ValueError("`--volume_size D H W` is required with a MedDiffusionPipeline.")
        self.args = args
        self.base = MedDiffusionPipeline.from_pretrained(args.pretrained_model)
        self.vqvae = self.base.vqvae.eval().requires_grad_(False)
        self.unet = self.base.unet.eval().requires_grad_(False)
        if args.resume_controlnet:
            self.controlnet = ControlNet3DModel.from_pretrained(args.resume_controlnet)
        else:
            channels = self.vqvae.config.latent_channels
            self.controlnet = ControlNet3DModel.from_biflownet(self.unet, conditioning_channels=channels)
        self.dataset = ConditionedVolumes(read_manifest(args.train_data, self.base.region_registry), args)
        self.frozen = (self.vqvae, self.unet)

    def inputs(self, batch):
        """Clean latents, condition latents and the model keywords of a batch."""
        latents = self.vqvae.normalize_latents(self.vqvae.encode(batch["target"]).latents)
        control = self.vqvae.normalize_latents(self.vqvae.encode(batch["condition"]).latents)
        return latents, control, {"class_labels": batch["class_labels"]}

    def pipeline(self, controlnet):
        """The base pipeline with `controlnet`."""
        return MedDiffusionControlNetPipeline(
            **self.base.components, controlnet=controlnet, regions=self.base.config.regions
        )

    def sample(self, pipeline, batch):
        """A volume generated from the batch's first condition."""
        return pipeline(
            int(batch["class_labels"][0]), condition=batch["condition"][:1],
            num_inference_steps=self.args.validation_inference_steps,
            generator=torch.Generator().manual_seed(self.args.seed), output_type="pt",
        )  # fmt: skip


class PatchTask:
    """A PatchControlNet3DModel on a frozen PatchSlidingWindowPipeline: native CT patches in model space."""

    def __init__(self, args):
        self.args = args
        self.base = PatchSlidingWindowPipeline.from_pretrained(args.pretrained_model)
        self.unet = self.base.unet.eval().requires_grad_(False)
        prediction = self.base.scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon" or getattr(self.base.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"The patch model is trained as an ε-predictor with a DDPM-type scheduler; the pipeline's "
                f"{type(self.base.scheduler).__name__} predicts {prediction!r}."
            )
        self.patch_size = as_triple(args.patch_size[0] if len(args.patch_size) == 1 else tuple(args.patch_size),
                                    "--patch_size")  # fmt: skip
        if any(side % self.unet.size_multiple for side in self.patch_size):
            raise ValueError(f"`--patch_size` {self.patch_size} must be multiples of {self.unet.size_multiple}.")
        if args.resume_controlnet:
            self.controlnet = PatchControlNet3DModel.from_pretrained(args.resume_controlnet)
        else:
            channels = 1 if args.condition in LABEL_CONDITIONS else self.unet.config.in_channels
            self.controlnet = PatchControlNet3DModel.from_unet(self.unet, conditioning_channels=channels)
        manifest = read_manifest(args.train_data, self.base.region_registry)
        with_anatomy = [bool(path) for path in manifest["anatomy"]]
        anatomy = bool(self.unet.anatomy_channels) and any(with_anatomy)
        if anatomy and not all(with_anatomy):
            raise ValueError("Give an `anatomy` file for every manifest entry, or for none.")
        self.dataset = ConditionedPatches(manifest, args, self.base, self.patch_size, anatomy)
        self.frozen = (self.unet,)

    def inputs(self, batch):
        """Clean patches, their conditions and the model keywords (region, global position, anatomy)."""
        keywords = {"class_labels": batch["class_labels"], "position": batch["position"]}
        if "anatomy" in batch:
            keywords["anatomy"] = batch["anatomy"]
        return batch["target"], batch["condition"], keywords

    def pipeline(self, controlnet):
        """The base pipeline with `controlnet`."""
        config = self.base.config
        return PatchSlidingWindowPipeline(
            self.unet, self.base.scheduler, controlnet, regions=config.regions, window_size=config.window_size
        )

    def sample(self, pipeline, batch):
        """A patch-sized volume generated from the batch's first condition (and anatomy)."""
        anatomy = batch["anatomy"][:1] if "anatomy" in batch else None
        return pipeline(
            int(batch["class_labels"][0]), volume_size=self.patch_size, anatomy=anatomy,
            controlnet_cond=batch["condition"][:1], window_size=self.patch_size,
            num_inference_steps=self.args.validation_inference_steps,
            generator=torch.Generator().manual_seed(self.args.seed), output_type="pt",
        )  # fmt: skip


def make_task(args):
    """The task for the base pipeline's class (`_class_name` of its `model_index.json`)."""
    if DiffusionPipeline.load_config(args.pretrained_model).get("_class_name") == "PatchSlidingWindowPipeline":
        return PatchTask(args)
    return MedDiffusionTask(args)


def main(argv=None):
    """Train the ControlNet on the frozen base pipeline and save the controlled pipeline."""
    args = parse_args(argv)
    accelerator = build_accelerator(args)

    task = make_task(args)
    controlnet = task.controlnet
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    controlnet.train()
    loader = torch.utils.data.DataLoader(task.dataset, batch_size=args.train_batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.learning_rate)
    controlnet, optimizer, loader = accelerator.prepare(controlnet, optimizer, loader)
    for module in task.frozen:
        module.to(accelerator.device)
    alphas = task.base.scheduler.alphas_cumprod.to(accelerator.device)

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    global_step, progress = start_run(accelerator, args, "train_controlnet", logger=logger, desc=None)
    first_epoch = global_step // steps_per_epoch
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    micro_step = global_step * args.gradient_accumulation_steps
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch)):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if hasattr(task.dataset, "set_epoch"):
            task.dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, resume_batches) if epoch == first_epoch else loader
        for batch in epoch_loader:
            with torch.no_grad():
                clean, control, keywords = task.inputs(batch)
            with accelerator.accumulate(controlnet):
                noisy, noise, timesteps = diffuse(clean, alphas, args.seed, micro_step, accelerator)
                micro_step += 1
                residuals = controlnet(noisy, timesteps, controlnet_cond=control, **keywords)
                prediction = task.unet(
                    noisy,
                    timesteps,
                    down_block_additional_residuals=residuals.down_block_res_samples,
                    mid_block_additional_residual=residuals.mid_block_res_sample,
                    **keywords,
                ).sample
                loss_fn = F.l1_loss if args.loss_type == "l1" else F.mse_loss
                loss = loss_fn(prediction.float(), noise.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            progress.set_postfix(loss=loss.item())
            accelerator.log({"loss": loss.item()}, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                validate(args, task, accelerator.unwrap_model(controlnet), batch, global_step)
            if global_step >= args.max_train_steps:
                break
        resume_batches = 0
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(controlnet).eval()
        model.save_pretrained(os.path.join(args.output_dir, "controlnet"))
        pipeline = task.pipeline(model)
        pipeline.save_pretrained(os.path.join(args.output_dir, "pipeline"))
        logger.info(f"Saved the ControlNet pipeline to {os.path.join(args.output_dir, 'pipeline')}")
        if args.push_to_hub:
            pipeline.push_to_hub(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
    accelerator.end_training()


def validate(args, task, controlnet, batch, step):
    """Generate from the first condition of the batch and save condition, target and sample as NIfTI."""
    pipeline = task.pipeline(controlnet.eval())
    pipeline.set_progress_bar_config(disable=True)
    output = task.sample(pipeline, batch)
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    save_nifti(batch["condition"][:1].cpu(), os.path.join(folder, "condition.nii.gz"))
    save_nifti(batch["target"][:1].cpu(), os.path.join(folder, "target.nii.gz"))
    output.save(os.path.join(folder, "sample.nii.gz"))
    controlnet.train()


if __name__ == "__main__":
    main()

"""Fine-tune a ControlNet on a frozen 3D MedDiffusion pipeline for sparse-view CT, fast MRI or mask conditions.

    accelerate launch examples/train_controlnet.py --pretrained_model meddiffusion-8x --train_data manifest.json \
        --condition sparse_view_ct --num_views 18 --volume_size 256 256 256 --output_dir cn-svct \
        --max_train_steps 20000 --mixed_precision bf16 --checkpointing_steps 1000 --validation_steps 1000

Conditions are built on the fly from each ground-truth volume (`sparse_view_ct`: parallel-beam FBP of `--num_views`
projections per slice; `undersampled_mri`: zero-filled reconstruction of a Cartesian `--acceleration`x mask;
`mask`: the manifest's `mask` label volume) or read from the manifest's `condition` file (`paired`). Condition and
target are encoded by the pipeline's autoencoder; the base BiFlowNet stays frozen; the ControlNet starts as a copy
of its encoder half with zero convolutions. The result is a `MedDiffusionControlNetPipeline` folder.
"""

import argparse
import math
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from meddiffusers import ControlNet3DModel, MedDiffusionControlNetPipeline, MedDiffusionPipeline, load_nifti
from meddiffusers.operators import segmentation_condition, sparse_view_ct_condition, undersampled_mri_condition
from meddiffusers.training.checkpoints import resume_from_checkpoint, save_checkpoint
from meddiffusers.training.data import VolumePreprocessor, read_manifest
from meddiffusers.training.setup import build_accelerator, diffuse
from meddiffusers.utils import center_crop_or_pad

logger = get_logger(__name__)
CONDITIONS = ("sparse_view_ct", "undersampled_mri", "mask", "paired")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model", required=True, help="MedDiffusionPipeline folder (frozen base model).")
    p.add_argument("--train_data", required=True, help="Manifest of NIfTI volumes (with `mask`/`condition` columns).")
    p.add_argument("--condition", choices=CONDITIONS, required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--volume_size", type=int, nargs=3, required=True, help="Centre crop/pad every volume to (D, H, W)."
    )
    p.add_argument("--num_views", type=int, default=18, help="sparse_view_ct: projections over a full circle.")
    p.add_argument("--acceleration", type=float, default=4.0, help="undersampled_mri: undersampling factor.")
    p.add_argument("--num_mask_classes", type=int, default=None, help="mask: number of labels (default: from data).")
    p.add_argument("--intensity", default="percentile")
    p.add_argument("--spacing", type=float, nargs=3, default=None)
    p.add_argument("--resume_controlnet", default=None, help="Start from this ControlNet3DModel folder.")
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
        if args.condition == "sparse_view_ct":
            condition = sparse_view_ct_condition(target[None], args.num_views)[0]
        elif args.condition == "undersampled_mri":
            condition = undersampled_mri_condition(target[None], args.acceleration, seed=index)[0]
        else:
            path = row["mask"] if args.condition == "mask" else row["condition"]
            if not path:
                raise ValueError(f"{row['image']}: the manifest gives no {args.condition} file for it.")
            if args.condition == "mask":
                labels = center_crop_or_pad(load_nifti(path).tensor[0], args.volume_size).clamp(
                    min=0
                )  # pad = background
                condition = segmentation_condition(labels[None], args.num_mask_classes)[0]
            else:
                condition = center_crop_or_pad(self.preprocessor(path), args.volume_size)
        return {"target": target, "condition": condition.float(), "class_labels": int(row["class_id"])}


def main(argv=None):
    args = parse_args(argv)
    accelerator = build_accelerator(args)

    base = MedDiffusionPipeline.from_pretrained(args.pretrained_model)
    vqvae, unet = base.vqvae.eval().requires_grad_(False), base.unet.eval().requires_grad_(False)
    if args.resume_controlnet:
        controlnet = ControlNet3DModel.from_pretrained(args.resume_controlnet)
    else:
        controlnet = ControlNet3DModel.from_biflownet(unet, conditioning_channels=vqvae.config.latent_channels)
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    controlnet.train()
    manifest = read_manifest(args.train_data, base.region_registry)
    loader = torch.utils.data.DataLoader(
        ConditionedVolumes(manifest, args), batch_size=args.train_batch_size, shuffle=True
    )
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.learning_rate)
    controlnet, optimizer, loader = accelerator.prepare(controlnet, optimizer, loader)
    vqvae.to(accelerator.device)
    unet.to(accelerator.device)
    alphas = base.scheduler.alphas_cumprod.to(accelerator.device)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_controlnet", config={k: str(v) for k, v in vars(args).items()})

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    global_step = resume_from_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint, logger)
    first_epoch = global_step // steps_per_epoch
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    micro_step = global_step * args.gradient_accumulation_steps
    progress = tqdm(range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch)):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, resume_batches) if epoch == first_epoch else loader
        for batch in epoch_loader:
            with torch.no_grad():
                latents = vqvae.normalize_latents(vqvae.encode(batch["target"]).latents)
                control = vqvae.normalize_latents(vqvae.encode(batch["condition"]).latents)
            with accelerator.accumulate(controlnet):
                noisy, noise, timesteps = diffuse(latents, alphas, args.seed, micro_step, accelerator)
                micro_step += 1
                residuals = controlnet(noisy, timesteps, batch["class_labels"], controlnet_cond=control)
                prediction = unet(
                    noisy,
                    timesteps,
                    batch["class_labels"],
                    down_block_additional_residuals=residuals.down_block_res_samples,
                    mid_block_additional_residual=residuals.mid_block_res_sample,
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
                validate(args, base, accelerator.unwrap_model(controlnet), batch, global_step)
            if global_step >= args.max_train_steps:
                break
        resume_batches = 0
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(controlnet).eval()
        model.save_pretrained(os.path.join(args.output_dir, "controlnet"))
        pipeline = MedDiffusionControlNetPipeline(**base.components, controlnet=model, regions=base.config.regions)
        pipeline.save_pretrained(os.path.join(args.output_dir, "pipeline"))
        logger.info(f"Saved the ControlNet pipeline to {os.path.join(args.output_dir, 'pipeline')}")
        if args.push_to_hub:
            pipeline.push_to_hub(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
    accelerator.end_training()


def validate(args, base, controlnet, batch, step):
    """Generate from the first condition of the batch and save condition, target and sample as NIfTI."""
    from meddiffusers import save_nifti

    pipeline = MedDiffusionControlNetPipeline(
        **base.components, controlnet=controlnet.eval(), regions=base.config.regions
    )
    pipeline.set_progress_bar_config(disable=True)
    region = int(batch["class_labels"][0])
    output = pipeline(
        region,
        condition=batch["condition"][:1],
        num_inference_steps=args.validation_inference_steps,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    )
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    save_nifti(batch["condition"][:1].cpu(), os.path.join(folder, "condition.nii.gz"))
    save_nifti(batch["target"][:1].cpu(), os.path.join(folder, "target.nii.gz"))
    output.save(os.path.join(folder, "sample.nii.gz"))
    controlnet.train()


if __name__ == "__main__":
    main()

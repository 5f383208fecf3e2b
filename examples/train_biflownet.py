"""Train a class-conditional BiFlowNet on cached latents and save a complete MedDiffusionPipeline.

    accelerate launch examples/train_biflownet.py \
        --train_latents outputs/latents --pretrained_vqvae outputs/vqvae --output_dir outputs/meddiffusion \
        --max_train_steps 100000 --train_batch_size 4 --mixed_precision bf16 --use_ema \
        --checkpointing_steps 5000 --validation_steps 5000

Multi-GPU and multi-node come from Accelerate's own configuration (`accelerate config`, DDP / DeepSpeed / FSDP) with
no change here. The recipe follows 3D MedDiffusion: cosine schedule over 1000 steps (exact float64 betas), epsilon
prediction, L1 loss by default, Adam at 1e-4, an EMA of the weights for sampling.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from meddiffusers import (
    BiFlowNet3DModel,
    MedDiffusionDDIMScheduler,
    MedDiffusionPipeline,
    meddiffusion_cosine_betas,
)
from meddiffusers.models.autoencoders import load_vq_model
from meddiffusers.training.latents import LatentDataset
from meddiffusers.training.loop import (
    finish_step,
    model_with_ema_weights,
    optimization_step,
    resumable_batches,
    save_final_pipeline,
    start_run,
)
from meddiffusers.training.setup import add_training_arguments, build_accelerator, build_lr_scheduler, diffuse

logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_latents", required=True, help="Folder written by examples/cache_latents.py.")
    p.add_argument(
        "--pretrained_vqvae",
        required=True,
        help="VQModel3D folder, pipeline folder, original .ckpt or Hub id: the pipeline's autoencoder.",
    )
    p.add_argument("--output_dir", required=True, help="Checkpoints, validation volumes and the final pipeline.")
    p.add_argument("--resume_unet", default=None, help="Start from this BiFlowNet3DModel folder instead of scratch.")
    # architecture (defaults: the released 8x model)
    p.add_argument("--base_channels", type=int, default=72)
    p.add_argument("--channel_mults", type=int, nargs="+", default=[1, 1, 2, 4, 8])
    p.add_argument("--attention_levels", type=int, nargs="+", default=[0, 0, 0, 1, 1])
    p.add_argument("--attention_heads", type=int, default=8)
    p.add_argument("--norm_num_groups", type=int, default=24)
    p.add_argument("--dit_num_heads", type=int, default=8)
    p.add_argument("--dit_patch_size", type=int, default=1, help="1 for 8x latents, 2 for 4x latents.")
    # optimisation, EMA, checkpoints, validation, logging (shared with the other training scripts)
    add_training_arguments(p, learning_rate=1e-4, use_ema=False)
    p.add_argument("--train_batch_size", type=int, default=1, help="Per device; latents in a batch share a shape.")
    p.add_argument("--validation_regions", nargs="+", default=None, help="Regions to sample (default: the first).")
    return p.parse_args(argv)


def collate(items):
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(
            f"Latents of one batch must share a shape, got {sorted(shapes)}; cache them with --volume_size or train "
            "with --train_batch_size 1."
        )
    return {
        "latents": torch.stack([item["latents"] for item in items]),
        "class_labels": torch.tensor([item["class_labels"] for item in items]),
    }


def build_unet(args, in_channels, num_classes):
    if args.resume_unet:
        return BiFlowNet3DModel.from_pretrained(args.resume_unet)
    return BiFlowNet3DModel(
        in_channels=in_channels,
        base_channels=args.base_channels,
        channel_mults=args.channel_mults,
        attention_levels=[bool(a) for a in args.attention_levels],
        num_class_embeds=num_classes,
        attention_heads=args.attention_heads,
        norm_num_groups=args.norm_num_groups,
        dit_num_heads=args.dit_num_heads,
        dit_patch_size=args.dit_patch_size,
    )


def build_pipeline(accelerator, unet, ema, vqvae, regions):
    """A pipeline with the (EMA) weights, for validation and the final save."""
    model = model_with_ema_weights(accelerator, unet, ema)
    return MedDiffusionPipeline(
        vqvae=vqvae, unet=model, scheduler=MedDiffusionDDIMScheduler(), regions=regions.to_config()
    )


def validate(args, accelerator, pipeline, regions, step, latent_shape, first_class):
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    pipeline.set_progress_bar_config(disable=True)
    factor = pipeline.vqvae.downsample_factor
    size = tuple(side * factor for side in latent_shape[1:])
    names = args.validation_regions or [regions.resolve(int(first_class)).name]
    generator = torch.Generator().manual_seed(args.seed)
    output = pipeline(
        names, num_inference_steps=args.validation_inference_steps, volume_size=size, generator=generator
    )
    paths = output.save(folder)
    logger.info(f"step {step}: validation volumes {paths}")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            middle = output.volumes[:, 0, output.volumes.shape[2] // 2]
            tracker.writer.add_images("validation/mid_slice", (middle[:, None] + 1) / 2, step, dataformats="NCHW")


def main(argv=None):
    args = parse_args(argv)
    accelerator = build_accelerator(args)

    dataset = LatentDataset(args.train_latents)
    regions = dataset.regions
    first = dataset[0]["latents"]  # channels of the model and shape of the validation volumes
    unet = build_unet(args, first.shape[0], len(regions))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=BiFlowNet3DModel, model_config=unet.config)
    ema = ema if args.use_ema else None
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        trained_betas=meddiffusion_cosine_betas(args.num_train_timesteps).tolist(),
    )
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.learning_rate)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )
    lr_scheduler = build_lr_scheduler(args, optimizer, accelerator)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    global_step, progress = start_run(accelerator, args, "train_biflownet", ema, logger)
    alphas = noise_scheduler.alphas_cumprod.to(accelerator.device)
    loss_fn = F.l1_loss if args.loss_type == "l1" else F.mse_loss
    batches = resumable_batches(
        accelerator, loader, global_step, args.gradient_accumulation_steps, args.max_train_steps
    )
    for micro_step, batch in batches:
        with accelerator.accumulate(unet):
            latents = batch["latents"]
            noisy, noise, timesteps = diffuse(latents, alphas, args.seed, micro_step, accelerator)
            prediction = unet(noisy, timesteps, batch["class_labels"]).sample
            loss = loss_fn(prediction.float(), noise.float())
            optimization_step(accelerator, unet, loss, optimizer, lr_scheduler, args.max_grad_norm)
        if not accelerator.sync_gradients:
            continue
        global_step = finish_step(accelerator, args, unet, ema, progress, global_step, loss, lr_scheduler)

        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            vqvae = load_vq_model(args.pretrained_vqvae).to(accelerator.device)
            pipeline = build_pipeline(accelerator, unet, ema, vqvae, regions).to(accelerator.device)
            validate(args, accelerator, pipeline, regions, global_step, first.shape, dataset[0]["class_labels"])
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipeline = build_pipeline(accelerator, unet, ema, load_vq_model(args.pretrained_vqvae), regions)
        save_final_pipeline(pipeline, os.path.join(args.output_dir, "pipeline"), args, logger)
    accelerator.end_training()


if __name__ == "__main__":
    main()

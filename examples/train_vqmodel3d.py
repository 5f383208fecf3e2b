"""Train the Patch-Volume autoencoder (VQModel3D) in the two stages of 3D MedDiffusion.

Stage `patch`: encoder, EMA codebook and decoder on random patches (one patch = one encoder input).
Stage `joint`: only the decoder (and post-quantisation conv) on whole volumes or large crops, so that it learns to
decode patch-wise latents without seams.

    accelerate launch examples/train_vqmodel3d.py --stage patch --train_data manifest.json --output_dir ae-s1 \
        --max_train_steps 200000 --perceptual_weights vgg16.pth
    accelerate launch examples/train_vqmodel3d.py --stage joint --pretrained_vqvae ae-s1/vqvae \
        --train_data manifest.json --output_dir ae-s2 --crop_size 192

Losses (reference weights): 4·L1 + 2·tri-plane perceptual (only with local VGG16 weights) + commitment (stage patch)
+ after --disc_start_step: 2·hinge adversarial + 4·feature matching with a 3D PatchGAN discriminator.
"""

import argparse
import math
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger

from meddiffusers import VQModel3D, save_nifti
from meddiffusers.models.autoencoders import load_vq_model
from meddiffusers.training.checkpoints import save_checkpoint
from meddiffusers.training.data import VolumeDataset, VolumePreprocessor, read_manifest
from meddiffusers.training.loop import start_run
from meddiffusers.training.setup import build_accelerator
from meddiffusers.training.vq_losses import (
    PatchDiscriminator3D,
    build_perceptual_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)

logger = get_logger(__name__)
STAGE_DEFAULTS = {
    "patch": {"learning_rate": 3e-4, "disc_start_step": 20000},
    "joint": {"learning_rate": 3e-5, "disc_start_step": 0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["patch", "joint"], required=True)
    p.add_argument("--train_data", required=True, help="Manifest (JSON or CSV) of NIfTI volumes.")
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--pretrained_vqvae",
        default=None,
        help="Start from this VQModel3D folder, pipeline folder, original .ckpt or Hub id (required for joint).",
    )
    # architecture of a new model (defaults: the released 8x autoencoder)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[48, 96, 192])
    p.add_argument("--latent_channels", type=int, default=8)
    p.add_argument("--num_vq_embeddings", type=int, default=8192)
    p.add_argument("--norm_num_groups", type=int, default=24)
    p.add_argument("--patch_size", type=int, default=64)
    p.add_argument("--codebook_decay", type=float, default=0.99, help="EMA decay of the codebook.")
    p.add_argument("--codebook_restart_threshold", type=float, default=1.0, help="Restart codes used less (EMA).")
    # data
    p.add_argument("--intensity", default="percentile", help="percentile, a CT window name, or ct:<min>:<max>.")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="Resample to this (D, H, W) spacing in mm.")
    p.add_argument("--crop_size", type=int, nargs="+", default=None, help="Stage patch: the patch size; joint: whole.")
    p.add_argument("--no_augmentation", action="store_true")
    # optimisation
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=None, help="Default 3e-4 (patch) / 3e-5 (joint).")
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--disc_start_step", type=int, default=None, help="Default 20000 (patch) / 0 (joint).")
    p.add_argument("--l1_weight", type=float, default=4.0)
    p.add_argument("--perceptual_weight", type=float, default=2.0)
    p.add_argument("--perceptual_weights", default=None, help="Local VGG16 weights; without them no perceptual loss.")
    p.add_argument("--gan_weight", type=float, default=2.0)
    p.add_argument("--feature_matching_weight", type=float, default=4.0)
    p.add_argument("--disc_channels", type=int, default=32)
    p.add_argument("--disc_layers", type=int, default=3)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    # checkpoints, validation, logging
    p.add_argument("--checkpointing_steps", type=int, default=1000)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    p.add_argument("--validation_steps", type=int, default=0, help="Save a reconstruction every N steps (0: off).")
    p.add_argument("--report_to", default="tensorboard")
    p.add_argument("--logging_dir", default="logs")
    args = p.parse_args(argv)
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.stage == "joint" and not args.pretrained_vqvae:
        p.error("--stage joint needs --pretrained_vqvae (the stage-patch model).")
    return args


def build_model(args) -> VQModel3D:
    if args.pretrained_vqvae:
        return load_vq_model(args.pretrained_vqvae)
    model = VQModel3D(
        block_out_channels=args.block_out_channels,
        latent_channels=args.latent_channels,
        num_vq_embeddings=args.num_vq_embeddings,
        norm_num_groups=args.norm_num_groups,
        patch_size=args.patch_size,
        codebook_decay=args.codebook_decay,
        codebook_restart_threshold=args.codebook_restart_threshold,
    )
    model.quantize.cluster_size.zero_()  # a fresh codebook is filled from the first batch of encoder outputs
    return model


def main(argv=None):
    args = parse_args(argv)
    accelerator = build_accelerator(args)

    vqvae = build_model(args)
    if args.gradient_checkpointing:
        vqvae.enable_gradient_checkpointing()
    if args.stage == "patch":
        crop = args.crop_size or list(vqvae.patch_size)
        trainable = [p for name, p in vqvae.named_parameters()]
    else:
        crop = args.crop_size
        vqvae.requires_grad_(False)
        for module in (vqvae.decoder, vqvae.post_quant_conv):
            module.requires_grad_(True)
        trainable = [p for p in vqvae.parameters() if p.requires_grad]
    crop = None if crop is None else (crop * 3 if len(crop) == 1 else crop)
    multiple = vqvae.patch_size[0]
    preprocessor = VolumePreprocessor(args.intensity, tuple(args.spacing) if args.spacing else None, multiple)
    dataset = VolumeDataset(
        read_manifest(args.train_data),
        preprocessor,
        crop_size=crop,
        augmentation=not args.no_augmentation,
        seed=args.seed + accelerator.process_index,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=args.dataloader_num_workers
    )
    discriminator = PatchDiscriminator3D(vqvae.config.in_channels, args.disc_channels, args.disc_layers)
    perceptual = build_perceptual_loss(args.perceptual_weights)
    optimizer = torch.optim.Adam(trainable, lr=args.learning_rate, betas=(0.5, 0.9))
    disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=args.learning_rate, betas=(0.5, 0.9))
    vqvae, discriminator, optimizer, disc_optimizer, loader = accelerator.prepare(
        vqvae, discriminator, optimizer, disc_optimizer, loader
    )
    if perceptual is not None:
        perceptual.to(accelerator.device)
    global_step, progress = start_run(accelerator, args, "train_vqmodel3d", logger=logger, desc=None)

    model = accelerator.unwrap_model(vqvae)
    num_epochs = math.ceil(args.max_train_steps / max(len(loader), 1)) + 1
    for _ in range(num_epochs):
        for batch in loader:
            if global_step >= args.max_train_steps:
                break
            volumes = batch["pixel_values"]
            vqvae.train()
            if args.stage == "joint":
                model.encoder.eval(), model.quantize.eval()  # frozen: no EMA updates of the codebook
            output = vqvae(volumes)  # through the (possibly distributed) wrapper, so gradients are synchronised
            recon = output.sample
            commit = output.commit_loss if args.stage == "patch" else torch.zeros((), device=volumes.device)
            adversarial_on = global_step >= args.disc_start_step
            l1 = F.l1_loss(recon, volumes)
            loss = args.l1_weight * l1 + commit
            logs = {"l1": l1.item(), "commitment": commit.item()}
            if perceptual is not None and args.perceptual_weight > 0:
                perceptual_loss = perceptual(volumes, recon)
                loss = loss + args.perceptual_weight * perceptual_loss
                logs["perceptual"] = perceptual_loss.item()
            if adversarial_on:
                fake_logits, fake_features = discriminator(recon)
                with torch.no_grad():
                    _, real_features = discriminator(volumes)
                adversarial = generator_adversarial_loss(fake_logits)
                matching = feature_matching_loss(fake_features, real_features)
                loss = loss + args.gan_weight * adversarial + args.feature_matching_weight * matching
                logs.update(adversarial=adversarial.item(), feature_matching=matching.item())
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()

            if adversarial_on:
                real_logits, _ = discriminator(volumes)
                fake_logits, _ = discriminator(recon.detach())
                disc_loss = args.gan_weight * hinge_discriminator_loss(real_logits, fake_logits)
                disc_optimizer.zero_grad()
                accelerator.backward(disc_loss)
                disc_optimizer.step()
                logs["discriminator"] = disc_loss.item()

            global_step += 1
            progress.update(1)
            progress.set_postfix(l1=logs["l1"])
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                folder = os.path.join(args.output_dir, "validation", f"step-{global_step}")
                save_nifti(volumes[:1].float().cpu(), os.path.join(folder, "input.nii.gz"))
                save_nifti(recon[:1].detach().float().cpu(), os.path.join(folder, "reconstruction.nii.gz"))
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.eval().save_pretrained(os.path.join(args.output_dir, "vqvae"))
        logger.info(f"Saved the autoencoder to {os.path.join(args.output_dir, 'vqvae')}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

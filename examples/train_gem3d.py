"""Train GEM-3D's models with Accelerate and save a GEM3DVolumePipeline folder.

    # stage 1: the 2-D concat model (every slice on its own), EMA on
    accelerate launch examples/train_gem3d.py --stage slice2d --train_data manifest.json \
        --pretrained_vae kl-f8-vae --output_dir outputs/stage1 --max_train_steps 150000 --cache_latents
    # stage 2: the pseudo-3D model initialised from stage 1, only the slice-axis layers train, EMA off
    accelerate launch examples/train_gem3d.py --stage volume3d --train_data manifest.json \
        --pretrained_pipeline outputs/stage1 --output_dir outputs/stage2 --max_train_steps 50000 --cache_latents
    # the informed-slice generator (added to the stage-2 pipeline), EMA on
    accelerate launch examples/train_gem3d.py --stage informed_slice --train_data manifest.json \
        --pretrained_pipeline outputs/stage2 --output_dir outputs/gem3d --max_train_steps 150000 --cache_latents

The manifest is a JSON list of `{"image": image.nii.gz, "label": label.nii.gz}` (paths relative to it). Both files are
brought to `--orientation` (RAS), the image min-max scaled to [-1, 1], the labels mapped to `2 * label / max_label -
1`; slices run along the array's first spatial axis and are resized to `--resolution` (512) before the frozen VAE
(`--pretrained_vae`, an `AutoencoderKL` folder, or the pipeline's). With `--cache_latents` the VAE posterior moments
of every slice are computed once and kept with `datasets` (`--latent_cache`, default `<output_dir>/latent_cache`);
every step still draws its own posterior sample, as the original does.

Recipes of the original (HKU-MedAI/GEM-3D `configs/latent-diffusion/*`): epsilon prediction with the scaled-linear
betas 0.00085-0.012, plain L2 loss, AdamW, base learning rate 5e-6 (5e-7 for the slice generator) scaled by the
number of processes, the batch size and the accumulation steps (`--scale_lr`); samples are random chunks of
`--num_frames` (16) slices with a random slice of the chunk as informed slice. Stage 1 draws one timestep per slice;
stage 2 one per chunk with probability proportional to 2000 - t and optimises only the layers with `temporal` in
their name. The slice generator sees one random slice of a volume with its relative position k / S as one context
token. See docs/source/en/guides/training_gem3d.md.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from einops import rearrange

from meddiffusers.models.embeddings import slice_position_embedding
from meddiffusers.models.unets.unet_gem3d import GEM3DUNetModel
from meddiffusers.pipelines.gem3d import GEM3D_DDIM_CONFIG, GEM3DVolumePipeline, gem3d_ddim_scheduler
from meddiffusers.training.gem3d_data import (
    GEM3DPreprocessor,
    GEM3DVolumes,
    cache_moments,
    check_cache,
    draw_chunk,
    item_moments,
    read_labelled_manifest,
    sample_latents,
    stage2_timestep_weights,
)
from meddiffusers.training.loop import (
    finish_step,
    model_with_ema_weights,
    optimization_step,
    resumable_batches,
    save_final_pipeline,
    start_run,
)
from meddiffusers.training.setup import (
    add_training_arguments,
    build_accelerator,
    build_lr_scheduler,
    diffuse,
    step_generator,
)

logger = get_logger(__name__)
STAGES = ("slice2d", "volume3d", "informed_slice")
# Random streams of a micro-step: 0 the diffusion noise and timesteps, 1 chunk and slice positions, 2 posterior draws.
POSITION_STREAM, POSTERIOR_STREAM = 1, 2
# The original's defaults per stage: base learning rate, EMA, volumes per batch.
STAGE_DEFAULTS = {
    "slice2d": {"learning_rate": 5e-6, "use_ema": True, "train_batch_size": 1},
    "volume3d": {"learning_rate": 5e-6, "use_ema": False, "train_batch_size": 1},
    "informed_slice": {"learning_rate": 5e-7, "use_ema": True, "train_batch_size": 4},
}


def parse_args(argv=None):
    """The command line (see `--help`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--train_data", required=True, help='JSON manifest: [{"image": ..., "label": ...}, ...].')
    p.add_argument("--output_dir", required=True, help="Checkpoints, validation volumes and the final pipeline.")
    # models
    p.add_argument("--pretrained_pipeline", default=None, help="A GEM3DVolumePipeline folder (e.g. a previous stage).")
    p.add_argument("--pretrained_vae", default=None, help="AutoencoderKL folder (default: the pipeline's VAE).")
    p.add_argument("--pretrained_unet", default=None, help="GEM3DUNetModel folder (stage 1 for --stage volume3d).")
    p.add_argument("--pretrained_slice_unet", default=None, help="UNet2DConditionModel folder of a slice generator.")
    p.add_argument(
        "--unet_config", default=None, help="JSON config of a new GEM3DUNetModel (default: the original's)."
    )
    p.add_argument("--slice_unet_config", default=None, help="JSON config of a new slice generator.")
    # data
    p.add_argument("--max_label", type=int, default=3, help="Largest label: 3 (brain), 4 (abdomen).")
    p.add_argument("--intensity", default="minmax", help="minmax (the original), percentile, or a CT window.")
    p.add_argument("--orientation", default="RAS", help="Axis codes both files are brought to (or 'native').")
    p.add_argument("--resolution", type=int, nargs="+", default=[512], help="In-plane size of the VAE input.")
    p.add_argument("--num_frames", type=int, default=16, help="Slices per training chunk (the model's window).")
    p.add_argument("--cache_latents", action="store_true", help="Encode every slice once (datasets cache).")
    p.add_argument("--latent_cache", default=None, help="Cache folder (default: <output_dir>/latent_cache).")
    p.add_argument("--vae_batch_size", type=int, default=16, help="Slices per VAE encoder call.")
    p.add_argument(
        "--timestep_weighting",
        choices=["reference", "uniform"],
        default="reference",
        help="volume3d: timesteps drawn with weights 2000 - t (reference) or uniformly.",
    )
    add_training_arguments(p, learning_rate=None, use_ema=None)
    p.add_argument("--train_batch_size", type=int, default=None, help="Volumes per device and micro-step.")
    p.add_argument(
        "--scale_lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Multiply the learning rate by processes x batch size x accumulation steps (the original).",
    )
    p.add_argument("--validate_at_end", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--validation_index", type=int, default=0, help="Manifest entry whose mask validation uses.")
    p.set_defaults(loss_type="l2", ema_decay=0.9999, max_grad_norm=0.0, validation_inference_steps=20)
    args = p.parse_args(argv)
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.resolution) not in (1, 2):
        p.error("--resolution takes one side or (H, W).")
    args.resolution = tuple(args.resolution * 2 if len(args.resolution) == 1 else args.resolution)
    if args.num_frames < 1:
        p.error("--num_frames must be positive.")
    return args


def _folder(path: str | None, subfolder: str) -> tuple[str, str | None] | None:
    """`(path, subfolder)` for a model folder or a pipeline folder holding it in `subfolder`; `None` without one."""
    if path is None:
        return None
    return (path, subfolder) if os.path.isdir(os.path.join(path, subfolder)) else (path, None)


def _load(cls, args, flag: str, subfolder: str):
    """`cls` from `--pretrained_<flag>`, else from `--pretrained_pipeline` if it has `subfolder`, else `None`."""
    source = _folder(getattr(args, f"pretrained_{flag}"), subfolder)
    if (
        source is None
        and args.pretrained_pipeline
        and os.path.isdir(os.path.join(args.pretrained_pipeline, subfolder))
    ):
        source = (args.pretrained_pipeline, subfolder)
    if source is None:
        return None
    return cls.from_pretrained(source[0], subfolder=source[1])


def _new_model(cls, config_path: str | None, **defaults):
    """A new `cls` from a JSON config file (its entries override `defaults`)."""
    config = dict(defaults)
    if config_path:
        with open(config_path, encoding="utf-8") as handle:
            config.update(json.load(handle))
    return cls.from_config(config)


def original_slice_unet_config() -> dict:
    """The informed-slice generator of the original (`*_slice.yaml`) as a `UNet2DConditionModel` config."""
    return {
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (224, 448, 896, 896),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
        "attention_head_dim": [c // 32 for c in (224, 448, 896, 896)],
        "cross_attention_dim": 128,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,
    }


def load_models(args):
    """`(vae, unet, slice_unet, trained)`: the frozen VAE, the volume U-Net and slice generator (either may be
    `None`), and the model this stage trains (new, or continued from a pretrained one)."""
    vae = _load(AutoencoderKL, args, "vae", "vae")
    if vae is None:
        raise ValueError("No VAE: pass --pretrained_vae (an AutoencoderKL folder) or a --pretrained_pipeline.")
    unet = _load(GEM3DUNetModel, args, "unet", "unet")
    slice_unet = _load(UNet2DConditionModel, args, "slice_unet", "slice_unet")
    if args.stage == "slice2d":
        if unet is None:
            unet = _new_model(GEM3DUNetModel, args.unet_config, temporal_layers=False)
        if unet.config.temporal_layers:
            raise ValueError("--stage slice2d trains the 2-D model; the given U-Net has temporal layers.")
        trained = unet
    elif args.stage == "volume3d":
        if unet is None:
            raise ValueError(
                "--stage volume3d starts from the stage-1 model: pass --pretrained_pipeline or --pretrained_unet."
            )
        if not unet.config.temporal_layers:
            unet = GEM3DUNetModel.from_stage1(unet)  # a pseudo-3D model continues as it is
        trained = unet
    else:
        if slice_unet is None:
            slice_unet = _new_model(UNet2DConditionModel, args.slice_unet_config, **original_slice_unet_config())
        trained = slice_unet
    return vae, unet, slice_unet, trained


def check_shapes(args, vae, trained) -> None:
    """Raise `ValueError` for a resolution the VAE and the trained model cannot take."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = getattr(trained, "size_multiple", 2 ** (len(trained.config.block_out_channels) - 1))
    if any(side % (vae_factor * multiple) for side in args.resolution):
        raise ValueError(
            f"--resolution {args.resolution} must be a multiple of {vae_factor * multiple} (VAE factor {vae_factor} "
            f"x model factor {multiple})."
        )


def trainable_parameters(args, model) -> list:
    """The parameters this stage optimises: all of them, or for `volume3d` only the slice-axis (temporal) layers,
    as the original's stage 2 (names containing `tem`); the others are frozen."""
    if args.stage != "volume3d":
        return list(model.parameters())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("temporal" in name)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def build_dataset(args, accelerator, vae, manifest, preprocessor) -> GEM3DVolumes:
    """The training volumes, or with `--cache_latents` their cached VAE moments (encoded once by the main process)."""
    dataset = GEM3DVolumes(manifest, preprocessor)
    if not args.cache_latents:
        return dataset
    path = args.latent_cache or os.path.join(args.output_dir, "latent_cache")
    if accelerator.is_main_process and not check_cache(path, vae, args.resolution, dataset):
        logger.info(f"Encoding {len(dataset)} volumes into {path}")
        cache_moments(vae, dataset, path, args.resolution, args.vae_batch_size)
    accelerator.wait_for_everyone()
    check_cache(path, vae, args.resolution, dataset)
    return GEM3DVolumes(cache=path)


def _num_slices(item: dict) -> int:
    return item["image_moments"].shape[0] if "image_moments" in item else item["image"].shape[1]


def make_batch(args, items, vae, micro_step, accelerator) -> dict:
    """One micro-step's latents, drawn from its own random streams (so a resumed run draws the same).

    Volume stages: `latents` `(B, 4, F, h, w)` of a random chunk, `condition` `(B, 8, F, h, w)` = `[mask latents |
    informed-slice latent repeated]`. Slice stage: `latents` `(B, 4, h, w)` of one random slice and `context`
    `(B, 1, D)`, the embedding of its relative position.
    """
    positions = step_generator(args.seed, micro_step, accelerator, stream=POSITION_STREAM)
    posterior = step_generator(args.seed, micro_step, accelerator, stream=POSTERIOR_STREAM)
    scaling = vae.config.scaling_factor
    device = accelerator.device
    encode = dict(vae=vae, resolution=args.resolution, chunk=args.vae_batch_size)
    if args.stage == "informed_slice":
        latents, relative = [], []
        for item in items:
            num_slices = _num_slices(item)
            index = int(torch.randint(num_slices, (1,), generator=positions))
            image, _ = item_moments(item, slice(index, index + 1), **encode)
            latents.append(sample_latents(image.to(device), posterior, scaling)[0])
            relative.append(index / num_slices)
        context = slice_position_embedding(torch.tensor(relative), dim=args.context_dim)
        return {"latents": torch.stack(latents), "relative_position": relative, "context": context}
    latents, conditions = [], []
    for item in items:
        start, informed = draw_chunk(_num_slices(item), args.num_frames, positions)
        image, mask = item_moments(item, slice(start, start + args.num_frames), **encode)
        image, mask = image.to(device), mask.to(device)
        x0 = sample_latents(image, posterior, scaling)
        mask_latents = sample_latents(mask, posterior, scaling)
        informed_latent = sample_latents(image[informed - start : informed - start + 1], posterior, scaling)
        latents.append(x0.transpose(0, 1))
        conditions.append(torch.cat([mask_latents, informed_latent.expand_as(mask_latents)], 1).transpose(0, 1))
    return {"latents": torch.stack(latents), "condition": torch.stack(conditions)}


def training_loss(args, model, batch, noise_scheduler, micro_step, accelerator) -> torch.Tensor:
    """The epsilon-prediction L2 (or L1) loss of one micro-step, with the stage's timestep draws (stream 0)."""
    loss_fn = F.mse_loss if args.loss_type == "l2" else F.l1_loss
    alphas = noise_scheduler.alphas_cumprod.to(accelerator.device)
    latents = batch["latents"]
    if args.stage == "informed_slice":
        noisy, noise, timesteps = diffuse(latents, alphas, args.seed, micro_step, accelerator)
        context = batch["context"].to(latents)[:, None]
        prediction = model(noisy, timesteps, encoder_hidden_states=context).sample
        return loss_fn(prediction.float(), noise.float())
    condition = batch["condition"]
    if args.stage == "slice2d":
        # The 2-D model sees every slice of a chunk as its own sample, with its own timestep (as the original).
        latents = rearrange(latents, "b c f h w -> (b f) c 1 h w")
        condition = rearrange(condition, "b c f h w -> (b f) c 1 h w")
    if args.stage == "volume3d" and args.timestep_weighting == "reference":
        generator = step_generator(args.seed, micro_step, accelerator)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        weights = stage2_timestep_weights(noise_scheduler.config.num_train_timesteps)
        timesteps = torch.multinomial(weights, latents.shape[0], replacement=True, generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    else:
        noisy, noise, timesteps = diffuse(latents, alphas, args.seed, micro_step, accelerator)
    prediction = model(torch.cat([noisy, condition], dim=1), timesteps).sample
    return loss_fn(prediction.float(), noise.float())


def build_pipeline(args, accelerator, vae, unet, slice_unet, trained, ema):
    """A pipeline with a copy of the trained model (EMA weights where kept) for validation and the final save; its
    U-Net is `None` for a slice generator trained without a volume model."""
    copy = model_with_ema_weights(accelerator, trained, ema)
    unet, slice_unet = (unet, copy) if args.stage == "informed_slice" else (copy, slice_unet)
    return GEM3DVolumePipeline(
        vae=vae,
        unet=unet,
        scheduler=gem3d_ddim_scheduler(),
        slice_unet=slice_unet,
        max_label=args.max_label,
        resolution=args.resolution[0] if args.resolution[0] == args.resolution[1] else list(args.resolution),
    )


@torch.no_grad()
def validate(args, pipeline, manifest, preprocessor, step: int) -> list[str]:
    """Short samples saved as NIfTI under `output_dir/validation/step-N`.

    Volume stages: the volume of the `--validation_index` entry's mask, with its own middle slice as informed slice
    (the original's `test` mode), and the mask beside it. Slice stage: informed slices generated at four relative
    positions, stacked along the slice axis (and the whole volume too when the pipeline has a volume model).
    """
    import nibabel as nib

    from meddiffusers.io.nifti import tensor_to_nifti_image

    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    os.makedirs(folder, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    row = manifest[args.validation_index]
    image, label = preprocessor.load(row["image"], row["label"])
    num_slices = image.tensor.shape[2]
    generator = torch.Generator().manual_seed(args.seed)
    paths = []
    if args.stage == "informed_slice":
        vae_factor = pipeline.vae_scale_factor
        size = (args.resolution[0] // vae_factor, args.resolution[1] // vae_factor)
        positions = [k / 4 for k in range(4)]
        latents = [
            pipeline.generate_informed_latents(1, p, size, args.validation_inference_steps, generator=generator)
            for p in positions
        ]
        slices = pipeline.decode_latents(torch.stack(latents, dim=2))
        paths.append(os.path.join(folder, "informed_slices.nii.gz"))
        nib.save(tensor_to_nifti_image(slices, torch.eye(4).numpy()), paths[-1])
        logger.info(f"step {step}: informed slices at positions {positions}: {paths[-1]}")
        if pipeline.unet is None:
            return paths
    output = pipeline(
        mask=label,
        informed_slice=(image, num_slices // 2) if args.stage != "informed_slice" else None,
        start_slice=num_slices // 2,
        window_length=args.num_frames,
        num_inference_steps=args.validation_inference_steps,
        generator=generator,
        output_type="nifti",
    )
    paths += [os.path.join(folder, "volume.nii.gz"), os.path.join(folder, "mask.nii.gz")]
    nib.save(output.volumes[0], paths[-2])
    nib.save(output.masks[0], paths[-1])
    logger.info(f"step {step}: validation volume {paths[-2]}")
    return paths


def save_components(pipeline, folder: str) -> None:
    """Save the VAE, slice generator and scheduler of a pipeline without a volume model, in the pipeline layout."""
    pipeline.vae.save_pretrained(os.path.join(folder, "vae"))
    pipeline.slice_unet.save_pretrained(os.path.join(folder, "slice_unet"))
    pipeline.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    logger.warning(
        f"No volume model (--pretrained_pipeline): saved vae/, slice_unet/ and scheduler/ in {folder}. Load them into "
        "a pipeline with GEM3DVolumePipeline.from_pretrained(volume_folder, slice_unet=UNet2DConditionModel."
        f"from_pretrained({folder!r}, subfolder='slice_unet'))."
    )


def main(argv=None):
    """Train one GEM-3D stage, checkpoint, validate and save the pipeline."""
    args = parse_args(argv)
    accelerator = build_accelerator(args)
    manifest = read_labelled_manifest(args.train_data)
    if not 0 <= args.validation_index < len(manifest):
        raise ValueError(f"--validation_index {args.validation_index} is not an entry of the manifest.")
    preprocessor = GEM3DPreprocessor(args.max_label, args.intensity, args.orientation)
    vae, unet, slice_unet, trained = load_models(args)
    check_shapes(args, vae, trained)
    if args.stage == "informed_slice":
        args.context_dim = trained.config.cross_attention_dim
    vae.requires_grad_(False).eval().to(accelerator.device)
    for frozen in (unet, slice_unet):
        if frozen is not None and frozen is not trained:
            frozen.requires_grad_(False).eval()
    dataset = build_dataset(args, accelerator, vae, manifest, preprocessor)

    if args.gradient_checkpointing:
        trained.enable_gradient_checkpointing()
    trained.train()
    parameters = trainable_parameters(args, trained)
    ema = None
    if args.use_ema:
        ema = EMAModel(parameters, decay=args.ema_decay, model_cls=type(trained), model_config=trained.config)
    scale = accelerator.num_processes * args.train_batch_size * args.gradient_accumulation_steps
    learning_rate = args.learning_rate * (scale if args.scale_lr else 1)
    logger.info(f"Stage {args.stage}: {sum(p.numel() for p in parameters)} trained parameters, lr {learning_rate:g}")
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    noise_scheduler = DDPMScheduler.from_config({**GEM3D_DDIM_CONFIG, "clip_sample": False})
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=list,
        num_workers=args.dataloader_num_workers,
    )
    lr_scheduler = build_lr_scheduler(args, optimizer, accelerator)
    trained, optimizer, lr_scheduler = accelerator.prepare(trained, optimizer, lr_scheduler)
    loader = accelerator.prepare_data_loader(loader, device_placement=False)  # volumes are encoded on the device
    global_step, progress = start_run(accelerator, args, "train_gem3d", ema, logger)
    loss = torch.tensor(float("nan"))
    batches = resumable_batches(
        accelerator, loader, global_step, args.gradient_accumulation_steps, args.max_train_steps
    )
    for micro_step, items in batches:
        batch = make_batch(args, items, vae, micro_step, accelerator)
        with accelerator.accumulate(trained):
            loss = training_loss(args, trained, batch, noise_scheduler, micro_step, accelerator)
            optimization_step(accelerator, trained, loss, optimizer, lr_scheduler, args.max_grad_norm)
        if not accelerator.sync_gradients:
            continue
        global_step = finish_step(accelerator, args, trained, ema, progress, global_step, loss, lr_scheduler)
        periodic = args.validation_steps and global_step % args.validation_steps == 0
        if periodic and global_step < args.max_train_steps and accelerator.is_main_process:
            pipeline = build_pipeline(args, accelerator, vae, unet, slice_unet, trained, ema).to(accelerator.device)
            validate(args, pipeline, manifest, preprocessor, global_step)
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info(f"Finished at step {global_step}; last loss {loss.detach().item():.6f}")
        pipeline = build_pipeline(args, accelerator, vae, unet, slice_unet, trained, ema)
        if args.validate_at_end or args.validation_steps:
            validate(args, pipeline.to(accelerator.device), manifest, preprocessor, global_step)
        if pipeline.unet is None:
            save_components(pipeline, args.output_dir)
        else:
            save_final_pipeline(pipeline.to("cpu"), args.output_dir, args, logger)
        if ema is not None:
            # The original samples with, and starts stage 2 from, the raw (non-EMA) weights: keep them too.
            name = "slice_unet_raw" if args.stage == "informed_slice" else "unet_raw"
            accelerator.unwrap_model(trained).save_pretrained(os.path.join(args.output_dir, name))
    accelerator.end_training()


if __name__ == "__main__":
    main()

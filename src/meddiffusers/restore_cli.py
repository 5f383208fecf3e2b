"""`meddiffusers restore`: restore a NIfTI volume with a diffusion prior (DiffPIR, or RePaint for inpainting).

Tasks and what `--input` holds (in its own intensity units: HU for CT, scanner values for MRI):

- `denoise`: the noisy volume; `--noise-level` is the noise standard deviation in those units (required).
- `zsr`: the thick-slice volume; the output has `--factor` times more voxels along `--axes` (file axes x, y, z;
  default z), and the affine's spacing along them divided by the factor, centred on the thick voxels.
- `sparse-ct`: a fully sampled image (HU), from which the command simulates a `--views`-view parallel-beam sinogram
  (slice by slice) and reconstructs the image from that sinogram alone; `--baseline-output` writes the FBP.
- `mri`: a fully sampled magnitude image, from which the command simulates Cartesian k-space undersampled by
  `--acceleration` (lines along the file's y axis, every slice) and reconstructs the image from it;
  `--baseline-output` writes the zero-filled inverse FFT.
- `inpaint`: the volume and `--mask`, a binary volume of the same grid with 1 where the content is replaced (e.g. a
  lesion label) and 0 where it is kept. RePaint by default (`--method diffpir` for DiffPIR's inpainting); with
  either, the kept voxels of the output are the input's exactly.

`--anatomy` (patch priors built with an `anatomy_encoding`): integer labels on the restored grid, handed to every
window as its crop.

Intensities go to the prior's `[-1, 1]` through the region's HU window (CT regions of MedDiff-FM patch priors), else
the input's 0.5 / 99.5 percentiles (`--intensity-range LOW HIGH` overrides both), and back: the output is in the
input's units, clipped to that range. Sides the prior cannot take are padded by replicating the border, and the
padding is cropped from the result. Nothing is written unless the run succeeds (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import math
import os
import time

from .cli import (
    check_device,
    check_nifti_output,
    read_model_index,
    regions_from_index,
    resolve_model,
)

TASKS = ("denoise", "zsr", "sparse-ct", "mri", "inpaint")
METHODS = ("repaint", "diffpir")
_PIPELINES = ("PatchSlidingWindowPipeline", "MedDiffusionPipeline")
# DiffPIR's (lambda, zeta, noise level on [0, 1]) per task: the restoration guide's recipes.
DIFFPIR_DEFAULTS = {
    "denoise": (10.0, 0.3, None),
    "zsr": (7.0, 0.3, 0.01),
    "sparse-ct": (7.0, 0.3, 0.01),
    "mri": (7.0, 0.3, 0.01),
    "inpaint": (1.0, 1.0, 0.0),
}
_FILE_AXES = {"z": 0, "x": 1, "y": 2}  # file axis -> tensor spatial axis (tensors are (D, H, W) = (z, x, y))


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `meddiffusers restore` (task and method are checked by [`restore`], for one-line errors)."""
    parser.add_argument(
        "--model",
        default=None,
        help="Pipeline folder, Hub repo id or bundled name: `meddiff-fm-demo` (pixel-space patch prior, CT chest, the "
        "default) or `meddiffusion-demo` (latent MedDiffusion prior).",
    )
    parser.add_argument("--task", required=True, help="denoise, zsr, sparse-ct, mri or inpaint.")
    parser.add_argument("--input", required=True, help="Input .nii/.nii.gz volume (see the task for what it holds).")
    parser.add_argument("--mask", default=None, help="inpaint: binary volume, 1 = replace, 0 = keep.")
    parser.add_argument(
        "--anatomy",
        default=None,
        help="Integer anatomy labels (0 background) on the restored grid, for patch priors built with an "
        "anatomy_encoding: every window gets its crop.",
    )
    parser.add_argument("--output", required=True, help="Restored .nii or .nii.gz volume (the input's units).")
    parser.add_argument(
        "--baseline-output",
        default=None,
        help="Also write the usual baseline: the input (denoise, inpaint), its trilinear upsampling (zsr), the FBP "
        "(sparse-ct) or the zero-filled inverse FFT (mri).",
    )
    parser.add_argument("--method", default=None, help="inpaint: repaint (default) or diffpir; other tasks: diffpir.")
    parser.add_argument("--region", default=None, help="Region name, alias or id (default: the model's only one).")
    parser.add_argument("--steps", type=int, default=50, help="DiffPIR timesteps / RePaint respaced steps (50).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps, where available.")
    task = parser.add_argument_group("task options")
    task.add_argument(
        "--noise-level",
        type=float,
        default=None,
        help="Noise std of the measurement in the input's units (denoise: required; other tasks: 1%% of the "
        "intensity range; inpaint with diffpir: 0).",
    )
    task.add_argument("--factor", type=int, default=4, help="zsr: slices averaged into one thick slice (4).")
    task.add_argument("--axes", default="z", help="zsr: thick file axes, any of x, y, z (default z).")
    task.add_argument("--views", type=int, default=24, help="sparse-ct: projection angles over 360 degrees (24).")
    task.add_argument("--cg-iterations", type=int, default=10, help="sparse-ct: CG steps per data step (10).")
    task.add_argument("--acceleration", type=float, default=4.0, help="mri: undersampling factor (4).")
    task.add_argument(
        "--center-fraction", type=float, default=None, help="mri: fully sampled centre (default 0.32 / acceleration)."
    )
    diffpir = parser.add_argument_group("DiffPIR")
    diffpir.add_argument("--lambda", dest="lambda_", type=float, default=None, help="Prior weight (task default).")
    diffpir.add_argument("--zeta", type=float, default=None, help="Fresh-noise fraction (task default).")
    repaint = parser.add_argument_group("RePaint")
    repaint.add_argument("--jump-length", type=int, default=5, help="Steps per jump back up (5; the paper: 10).")
    repaint.add_argument("--jump-n-sample", type=int, default=3, help="Passes per segment (3; the paper: 10).")
    scaling = parser.add_argument_group("intensities")
    scaling.add_argument(
        "--intensity-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="Input values mapped to the prior's -1 and 1 (default: the region's HU window, else percentiles).",
    )
    windows = parser.add_argument_group("sliding windows (patch priors)")
    windows.add_argument("--window-size", type=int, nargs=3, metavar=("D", "H", "W"), help="Default: the model's.")
    windows.add_argument("--overlap", type=float, default=0.5, help="Fraction shared by neighbouring windows (0.5).")
    windows.add_argument("--window-batch-size", type=int, default=1, help="Windows per denoiser call (speed only).")


# ---------------------------------------------------------------------------------------------------- checks


def check_restore_arguments(args: argparse.Namespace) -> None:
    """`ValueError`s for options that cannot work, before any file is read."""
    if args.task not in TASKS:
        raise ValueError(f"Unknown --task {args.task!r}; choose one of {', '.join(TASKS)}.")
    method = args.method or ("repaint" if args.task == "inpaint" else "diffpir")
    if method not in METHODS:
        raise ValueError(f"Unknown --method {method!r}; choose repaint or diffpir.")
    if method == "repaint" and args.task != "inpaint":
        raise ValueError(f"--method repaint inpaints only; --task {args.task} runs diffpir.")
    args.method = method
    if args.task == "inpaint" and args.mask is None:
        raise ValueError("--task inpaint needs --mask (1 = replace, 0 = keep).")
    if args.task != "inpaint" and args.mask is not None:
        raise ValueError(f"--mask applies to --task inpaint only, not {args.task}.")
    if args.task == "denoise" and args.noise_level is None:
        raise ValueError("--task denoise needs --noise-level (the noise std in the input's units, e.g. 60 for HU).")
    if args.noise_level is not None and not args.noise_level >= 0:
        raise ValueError(f"--noise-level must be >= 0, got {args.noise_level}.")
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2, got {args.steps}.")
    for name in ("factor", "views", "cg_iterations", "jump_length", "jump_n_sample", "window_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.task == "zsr" and args.factor < 2:
        raise ValueError(f"--factor must be at least 2 for zsr, got {args.factor}.")
    axes = [axis.strip() for axis in args.axes.replace(",", " ").split()] or [""]
    if any(axis not in _FILE_AXES for axis in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"--axes must list distinct file axes among x, y, z (e.g. z or x,y), got {args.axes!r}.")
    args.axes = axes
    if not args.acceleration >= 1:
        raise ValueError(f"--acceleration must be >= 1, got {args.acceleration}.")
    if args.center_fraction is not None and not 0 <= args.center_fraction < 1:
        raise ValueError(f"--center-fraction must be in [0, 1), got {args.center_fraction}.")
    if args.lambda_ is not None and not args.lambda_ > 0:
        raise ValueError(f"--lambda must be positive, got {args.lambda_}.")
    if args.zeta is not None and not 0 <= args.zeta <= 1:
        raise ValueError(f"--zeta must be in [0, 1], got {args.zeta}.")
    if args.intensity_range is not None and not args.intensity_range[1] > args.intensity_range[0]:
        raise ValueError(f"--intensity-range HIGH must exceed LOW, got {args.intensity_range}.")
    if not 0 <= args.overlap < 1:
        raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}.")
    if args.window_size and min(args.window_size) < 1:
        raise ValueError(f"--window-size must be positive, got {' '.join(map(str, args.window_size))}.")
    check_device(args.device)
    check_nifti_output(args.output)
    files = {"--input": args.input, "--mask": args.mask, "--anatomy": args.anatomy}
    if args.baseline_output:
        check_nifti_output(args.baseline_output, "--baseline-output")
        if os.path.abspath(args.baseline_output) == os.path.abspath(args.output):
            raise ValueError("--output and --baseline-output name the same file.")
    for written in filter(None, (args.output, args.baseline_output)):
        for option, path in files.items():
            if path is not None and os.path.abspath(written) == os.path.abspath(path):
                raise ValueError(f"{written!r} would overwrite {option}; choose another output name.")
    for option, path in files.items():
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{option} {path!r}: no such file.")


def load_single_volume(path: str, option: str):
    """A NIfTI file as a one-channel [`NiftiVolume`] with finite values, or a `ValueError` naming the option."""
    import torch

    from .io import load_nifti

    volume = load_nifti(path)
    if volume.tensor.shape[1] != 1:
        raise ValueError(f"{option} {path!r} has {volume.tensor.shape[1]} channels (a 4D series); pass one 3D volume.")
    if min(volume.tensor.shape[2:]) < 2:
        raise ValueError(f"{option} {path!r} is not a 3D volume (shape {tuple(volume.tensor.shape[2:])}).")
    if not bool(torch.isfinite(volume.tensor).all()):
        raise ValueError(f"{option} {path!r} contains NaN or infinite values.")
    return volume


def load_inpainting_mask(path: str, volume):
    """The `--mask` as a `(1, 1, D, H, W)` float tensor (1 = replace), checked against the input volume."""
    import numpy as np
    import torch

    mask = load_single_volume(path, "--mask")
    if mask.tensor.shape != volume.tensor.shape:
        raise ValueError(
            f"--mask {path!r} has shape {_file_shape(mask.tensor)} but --input {_file_shape(volume.tensor)}."
        )
    if not np.allclose(mask.affine, volume.affine, atol=1e-3):
        raise ValueError(f"--mask {path!r} lies on another grid than --input (different affine); resample it first.")
    values = mask.tensor
    if not bool(((values == 0) | (values == 1)).all()):
        found = torch.unique(values)[:6].tolist()
        raise ValueError(
            f"--mask {path!r} must hold only 0 (keep) and 1 (replace); found values such as {found}. Binarise it "
            "(e.g. one label of a segmentation)."
        )
    if not bool(values.any()):
        raise ValueError(f"--mask {path!r} marks no voxel to replace (all 0).")
    return values


def load_anatomy(path: str, volume, tensor_axes, factor: int, task: str):
    """The `--anatomy` labels as a `(1, 1, D, H, W)` float tensor on the restored grid (the input's, or the thin grid
    of `zsr`), checked: same shape and affine as that grid, integer values >= 0."""
    import numpy as np
    import torch

    labels = load_single_volume(path, "--anatomy")
    shape = list(volume.tensor.shape)
    affine = volume.affine
    if task == "zsr":
        shape = [side * factor if axis - 2 in tensor_axes else side for axis, side in enumerate(shape)]
        file_axis = {0: 2, 1: 0, 2: 1}
        affine = thin_slice_affine(affine, {file_axis[axis]: factor for axis in tensor_axes})
    if list(labels.tensor.shape) != shape:
        raise ValueError(
            f"--anatomy {path!r} has shape {_file_shape(labels.tensor)} but the restored volume "
            f"{_file_shape(torch.empty(shape))}."
        )
    if not np.allclose(labels.affine, affine, atol=1e-3):
        raise ValueError(f"--anatomy {path!r} lies on another grid than the restored volume (different affine).")
    values = labels.tensor
    if not bool((values == values.round()).all()) or bool((values < 0).any()):
        raise ValueError(f"--anatomy {path!r} must hold integer labels >= 0 (0 background).")
    return values


def _file_shape(tensor) -> tuple[int, ...]:
    depth, height, width = tensor.shape[2:]
    return (height, width, depth)  # NIfTI (x, y, z)


# ---------------------------------------------------------------------------------------------------- geometry


def thin_slice_affine(affine, factors: dict[int, int]):
    """The affine of the finer grid whose `factors[axis]` voxels make one voxel of `affine` along file axis `axis`
    (0 = x, 1 = y, 2 = z): spacing divided by the factor, the fine voxels centred within each coarse voxel."""
    import numpy as np

    scale = np.eye(4)
    for axis, factor in factors.items():
        scale[axis, axis] = 1.0 / factor
        scale[axis, 3] = 0.5 / factor - 0.5  # fine voxel 0's centre, in coarse voxel coordinates
    return np.asarray(affine, dtype=np.float64) @ scale


def pad_to_multiple(tensor, multiples, mode: str = "replicate", value: float = 0.0):
    """Pad the end of each spatial axis of a `(B, C, D, H, W)` tensor to a multiple of `multiples[axis]`."""
    import torch.nn.functional as F

    extra = [(-side) % multiple for side, multiple in zip(tensor.shape[2:], multiples)]
    if not any(extra):
        return tensor
    pad = (0, extra[2], 0, extra[1], 0, extra[0])
    return F.pad(tensor, pad, mode="constant", value=value) if mode == "constant" else F.pad(tensor, pad, mode=mode)


def prior_multiple(pipe) -> int:
    """The side every volume must be a multiple of for this pipeline's prior (windows, autoencoder patches)."""
    from .models import PatchUNet3DModel

    if isinstance(pipe.unet, PatchUNet3DModel):
        return pipe.unet.size_multiple
    if getattr(pipe, "vqvae", None) is None:
        return 1
    multiple = pipe.vqvae.downsample_factor * getattr(pipe.unet, "latent_size_multiple", 1)
    for side in pipe.vqvae.patch_size:
        multiple = multiple * side // math.gcd(multiple, side)
    return multiple


# ---------------------------------------------------------------------------------------------------- writing


def write_atomically(tensor, path: str, affine, header) -> None:
    """Save a NIfTI file through a temporary name in the same folder, renamed at the end, so that a failed or
    interrupted run never leaves a partial `path`."""
    from .io import save_nifti

    folder, name = os.path.split(os.path.abspath(path))
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name[: -len(suffix)]}.partial-{os.getpid()}{suffix}")
    try:
        save_nifti(tensor, temporary, affine=affine, header=header)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# ---------------------------------------------------------------------------------------------------- run


def _load_pipeline(kind: str, model: str, method: str):
    from .pipelines import DiffPIRPipeline, MedDiffusionPipeline, PatchSlidingWindowPipeline, RePaint3DPipeline
    from .schedulers import RePaintDDPMScheduler

    patch = kind == "PatchSlidingWindowPipeline"
    source = (PatchSlidingWindowPipeline if patch else MedDiffusionPipeline).from_pretrained(model)
    if method == "diffpir":
        return DiffPIRPipeline.from_pipe(source)
    # RePaint's respacing is guided-diffusion's (linspace); its clipping is a plain clip, not thresholding.
    scheduler = RePaintDDPMScheduler.from_config(
        source.scheduler.config, timestep_spacing="linspace", thresholding=False
    )
    return RePaint3DPipeline.from_pipe(source, scheduler=scheduler)


def restore(args: argparse.Namespace) -> int:
    """Restore `--input` with a diffusion prior and write `--output` (see the module docstring for each task)."""
    import torch
    import torch.nn.functional as F

    from .operators import (
        AveragePoolOperator,
        IdentityOperator,
        MaskOperator,
        RayTransform,
        UndersampledMRI,
        cartesian_mask,
    )
    from .pipelines.diffpir import IntensityMap

    # 1. Every option, the model's index and the input files are checked before any model is loaded.
    check_restore_arguments(args)
    model, demo = resolve_model(args.model or "meddiff-fm-demo")
    index, index_path = read_model_index(model)
    kind = index.get("_class_name")
    if kind not in _PIPELINES:
        runs = " and ".join(_PIPELINES)
        raise ValueError(f"--model {model!r} holds a {kind!r}; `meddiffusers restore` runs {runs} folders.")
    patch = kind == "PatchSlidingWindowPipeline"
    if args.window_size and not patch:
        raise ValueError("--window-size applies to PatchSlidingWindowPipeline models only.")
    if args.anatomy and not patch:
        raise ValueError("--anatomy applies to PatchSlidingWindowPipeline models (anatomy-conditioned) only.")
    registry = regions_from_index(index, index_path)
    if args.region is None and len(registry) != 1:
        names = ", ".join(region.name for region in registry.regions)
        raise ValueError(f"--model {model!r} has {len(registry)} regions; pass --region (one of {names}).")
    region = registry.resolve(args.region if args.region is not None else registry.regions[0].name)
    volume = load_single_volume(args.input, "--input")
    mask = load_inpainting_mask(args.mask, volume) if args.task == "inpaint" else None
    image = volume.tensor.float()
    tensor_axes = sorted(_FILE_AXES[axis] for axis in args.axes)
    anatomy = load_anatomy(args.anatomy, volume, tensor_axes, args.factor, args.task) if args.anatomy else None
    if args.task == "mri" and not args.acceleration * 2 <= image.shape[-1]:
        raise ValueError(f"--acceleration {args.acceleration} leaves fewer than 2 of the {image.shape[-1]} lines.")

    # 2. Intensities: model space [-1, 1] <-> the input's units.
    hu_window = region.intensity_window if patch else None
    if args.intensity_range is not None:
        low, high = args.intensity_range
    elif hu_window is not None:
        low, high = hu_window
    else:
        from .io import PercentileScaling

        low, high = (float(value) for value in PercentileScaling().compute_range(image))
        if not high > low:
            raise ValueError(f"--input {args.input!r} is constant; pass --intensity-range LOW HIGH.")
    intensity_map = IntensityMap(float(low), float(high))
    lambda_, zeta, noise_level = DIFFPIR_DEFAULTS[args.task]
    lambda_ = args.lambda_ if args.lambda_ is not None else lambda_
    zeta = args.zeta if args.zeta is not None else zeta
    if args.noise_level is not None:
        noise_level = args.noise_level / (high - low)
    if args.task == "zsr":
        grid_spacing = tuple(s / args.factor if a in tensor_axes else s for a, s in enumerate(volume.spacing))
    else:
        grid_spacing = volume.spacing
    if any(abs(a - b) > 0.1 * b for a, b in zip(grid_spacing, region.spacing)):
        print(
            f"note: the {'restored' if args.task == 'zsr' else 'input'} grid has {_spacing(grid_spacing)} mm voxels; "
            f"the prior's {region.name} region was trained at {_spacing(region.spacing)} mm"
        )
    if demo:
        print(f"using the bundled demo model ({model}): a demonstration, not a clinical model")

    # 3. The prior, and the measurement on a grid it can take.
    pipe = _load_pipeline(kind, model, args.method)
    if args.device != "cpu":
        pipe = pipe.to(args.device)
    multiple = prior_multiple(pipe)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    spatial = tuple(image.shape[2:])
    if args.task == "zsr":
        spatial = tuple(side * args.factor if axis in tensor_axes else side for axis, side in enumerate(spatial))
        # Pad the thick volume so that the fine grid is a multiple of the prior's side.
        thick_multiples = [multiple // math.gcd(multiple, args.factor) if axis in tensor_axes else multiple
                           for axis in range(3)]  # fmt: skip
        padded = pad_to_multiple(image, thick_multiples)
    else:
        padded = pad_to_multiple(image, [multiple] * 3)
    baseline = None
    if args.task == "denoise":
        operator, measurement, baseline = IdentityOperator(), padded, image
    elif args.task == "zsr":
        operator, measurement = AveragePoolOperator(args.factor, axes=tuple(tensor_axes)), padded
        baseline = F.interpolate(image, size=spatial, mode="trilinear", align_corners=False)
    elif args.task == "sparse-ct":
        # For a CT, attenuation relative to water (air 0), so that the air around the body projects to nothing.
        offset, scale = (1.0, 1e-3) if hu_window is not None else (0.0, 1.0)
        intensity_map = IntensityMap(low * scale + offset, high * scale + offset)
        operator = RayTransform(tuple(padded.shape[3:]), num_views=args.views, cg_iterations=args.cg_iterations)
        measurement = operator(padded * scale + offset)
        baseline = (operator.fbp(measurement) - offset) / scale
    elif args.task == "mri":
        fraction = args.center_fraction if args.center_fraction is not None else 0.32 / args.acceleration
        lines = cartesian_mask(padded.shape[-1], args.acceleration, center_fraction=fraction, seed=args.seed)
        operator = UndersampledMRI(lines)
        measurement = operator(padded)
        baseline = operator.zero_filled(measurement).real
    else:
        keep = pad_to_multiple(1 - mask, [multiple] * 3, mode="constant", value=1.0)
        operator, measurement, baseline = MaskOperator(keep), padded * keep, image
    if args.noise_level is not None and args.task not in ("denoise", "inpaint") and args.noise_level > 0:
        print(f"note: the simulated measurement is noiseless; --noise-level {args.noise_level:g} sets rho_t only")

    # 4. Restore.
    patch_options = {}
    if patch:
        patch_options = dict(region=region.name, overlap=args.overlap, window_batch_size=args.window_batch_size)
        if anatomy is not None:  # padded like the volume, by repeating the border labels
            patch_options["anatomy"] = pad_to_multiple(anatomy, [multiple] * 3).round().long()
        if args.window_size:
            patch_options["window_size"] = tuple(args.window_size)
    else:
        patch_options = dict(region=region.name)
    print(
        f"{args.task} with {args.method} ({args.steps} steps) on {args.input}: {_file_shape(image)} voxels of "
        f"{_spacing(volume.spacing)} mm; intensities [{low:g}, {high:g}] -> [-1, 1]"
    )
    start = time.perf_counter()
    if args.method == "repaint":
        restored = pipe(
            intensity_map.to_model(padded).clamp(-1, 1),
            keep,
            num_inference_steps=args.steps,
            jump_length=args.jump_length,
            jump_n_sample=args.jump_n_sample,
            generator=generator,
            output_type="pt",
            **patch_options,
        ).volumes
        # Outside the mask the input itself, in its own units (not clipped to the window).
        restored = torch.where(keep.bool(), padded, intensity_map.to_data(restored))
    else:
        restored = pipe(
            measurement,
            operator,
            noise_level=noise_level,
            lambda_=lambda_,
            zeta=zeta,
            num_inference_steps=args.steps,
            intensity_map=intensity_map,
            generator=generator,
            output_type="pt",
            **patch_options,
        ).volumes
        restored = intensity_map.to_data(restored)
        if args.task == "sparse-ct":
            restored = (restored - offset) / scale
        elif args.task == "inpaint":  # the kept voxels are the input's, as with RePaint
            restored = torch.where(keep.bool(), padded, restored)
    elapsed = time.perf_counter() - start
    restored = restored[:, :, : spatial[0], : spatial[1], : spatial[2]].float().cpu()

    # 5. Write: the input's affine (refined along the thick axes for zsr) and header.
    affine = volume.affine
    if args.task == "zsr":
        file_axis = {0: 2, 1: 0, 2: 1}  # tensor spatial axis -> file axis
        affine = thin_slice_affine(affine, {file_axis[axis]: args.factor for axis in tensor_axes})
    write_atomically(restored, args.output, affine, volume.header)
    print(f"wrote {args.output} ({_file_shape(restored)} voxels, {elapsed:.1f} s)")
    if args.baseline_output:
        baseline = baseline[:, :, : spatial[0], : spatial[1], : spatial[2]]
        write_atomically(baseline.float(), args.baseline_output, affine, volume.header)
        print(f"wrote {args.baseline_output} (baseline)")
    return 0


def _spacing(spacing) -> str:
    depth, height, width = spacing
    return " x ".join(f"{value:g}" for value in (height, width, depth))  # file order x, y, z

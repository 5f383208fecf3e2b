"""The `meddiffusers` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _intensity_transform(name: str):
    from .io import HUWindow, PercentileScaling

    if name == "percentile":
        return PercentileScaling()
    if name.startswith("ct-"):
        return HUWindow.preset(name[3:].replace("-", "_"))
    raise ValueError(
        f"Unknown --intensity {name!r}; use 'percentile' or 'ct-<window>' (e.g. ct-wide, ct-soft-tissue)."
    )


NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Pipeline classes whose regions default to the released model's seven classes when model_index.json saves none.
_DEFAULT_REGION_PIPELINES = ("MedDiffusionPipeline", "MedDiffusionControlNetPipeline", "PatchSlidingWindowPipeline")
_GENERATE_PIPELINES = ("MedDiffusionPipeline", "PatchSlidingWindowPipeline")


def available_devices() -> list[str]:
    """The devices this machine's PyTorch can run on: `cpu`, then `cuda`, `cuda:0`, ... and `mps` where present."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(name: str, option: str = "--device") -> str:
    """Return `name` if PyTorch can run on it here (`cpu`, `cuda[:N]`, `mps`); a `ValueError` saying what is available
    otherwise, so that a bad device fails before any model is loaded."""
    import torch

    available = ", ".join(available_devices())
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message for an unknown device string lists its internal backends, not ours
        raise ValueError(f"{option} {name!r} is not a device name; available here: {available}.") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None and torch.version.hip is None:
                reason = "this PyTorch build is CPU-only; install a CUDA build from pytorch.org"
            else:
                reason = "no GPU is visible to this PyTorch build"
            raise ValueError(f"{option} {name!r}: CUDA is not available ({reason}); available here: {available}.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{option} {name!r}: this machine has {count} CUDA device(s); available here: {available}."
            )
        return name
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {name!r}: Apple MPS is not available; available here: {available}.")
        return name
    raise ValueError(f"{option} {name!r} is not supported (use cpu, cuda[:N] or mps); available here: {available}.")


def _check_writable_parent(path: str, option: str) -> None:
    """Fail now if `path`'s folder cannot be created or written, rather than after the model has run."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path!r}: {parent!r} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path!r}: no permission to write in {parent!r}.")


def _nifti_name_for(path: str) -> str:
    """A NIfTI file name close to `path`, for error messages: `brain` -> `brain.nii.gz`, `a.txt` -> `a.nii.gz`."""
    base = path.rstrip("./" + os.sep) or "volume"
    if os.path.splitext(base)[1]:
        base = os.path.splitext(base)[0]
    return base if base.endswith(NIFTI_SUFFIXES) else f"{base}.nii.gz"


def check_nifti_output(path: str, option: str = "--output") -> str:
    """Return `path` if it names a NIfTI file that can be written (`.nii` or `.nii.gz`); a `ValueError` otherwise."""
    if not path.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{option} must be a .nii or .nii.gz file name (e.g. {_nifti_name_for(path)}), got {path!r}.")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is an existing folder, not a file name.")
    _check_writable_parent(path, option)
    return path


def check_generate_output(path: str) -> str:
    """Return `generate --output` if it is a NIfTI file name, an existing folder or a path ending in `/`.

    Any other name (e.g. `brain` or `brain.nii.gz.tmp`) is refused, so that a forgotten extension does not silently
    become a folder.
    """
    if path.endswith(NIFTI_SUFFIXES) and not os.path.isdir(path):
        return check_nifti_output(path)
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        _check_writable_parent(os.path.join(path, "volume.nii.gz"), "--output")
        return path
    raise ValueError(
        f"--output {path!r} is neither a NIfTI file name nor a folder: use {_nifti_name_for(path)} for a file, or "
        f"{path}/ (or an existing folder) for a folder."
    )


_WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def _check_source(source: str, option: str) -> None:
    """A model given by path must exist; anything else must at least be a well-formed Hub repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.exists(source):
        return
    if source.endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"{option} {source!r}: no such file.")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise FileNotFoundError(f"{option} {source!r}: no such file or folder (and not a Hub repo id).") from None


def read_model_index(model: str) -> tuple[dict, str]:
    """Read a pipeline's `model_index.json` (a local folder, or a Hub repo id through the Hub cache) without weights.

    Returns:
        The parsed configuration and the path it was read from.
    """
    import json

    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--model {model!r} has no model_index.json: pass a pipeline folder (not one of its subfolders)."
            )
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        _check_source(model, "--model")
        try:
            path = hf_hub_download(model, "model_index.json")
        except LocalEntryNotFoundError:
            raise FileNotFoundError(
                f"--model {model!r} is not a local folder, and the Hub repo {model!r} could not be reached and is not "
                "in the local Hub cache (offline?)."
            ) from None
        except EntryNotFoundError:
            raise FileNotFoundError(f"The Hub repo {model!r} has no model_index.json: it is not a pipeline.") from None
        except HfHubHTTPError as error:
            message = " ".join(str(error).split())
            raise FileNotFoundError(f"Could not get model_index.json of the Hub repo {model!r}: {message}") from None
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path!r} is not valid JSON ({error}).") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path!r} is not a pipeline configuration (expected a JSON object).")
    return index, path


def regions_from_index(index: dict, path: str):
    """The `RegionRegistry` saved in a `model_index.json` (the pipeline's default regions if it saves none)."""
    from .io import RegionRegistry, meddiff_fm_regions, meddiffusion_regions

    regions = index.get("regions")
    if regions is None:
        if index.get("_class_name") == "PatchSlidingWindowPipeline":
            return meddiff_fm_regions()
        if index.get("_class_name") in _DEFAULT_REGION_PIPELINES:
            return meddiffusion_regions()
        raise ValueError(f"{path!r} ({index.get('_class_name', 'no pipeline class')}) defines no regions.")
    try:
        return RegionRegistry(regions)
    except (KeyError, TypeError, ValueError) as error:  # a region entry without "name"/"class_id", or a bad value
        raise ValueError(f"{path!r} has an invalid 'regions' entry ({type(error).__name__}: {error}).") from None


def _format_triple(values) -> str:
    return " x ".join(f"{float(value):g}" if isinstance(value, float) else str(value) for value in values)


def resolve_model(model: str | None) -> tuple[str, bool]:
    """The folder or repo id behind `--model` (none: the bundled MedDiffusion demo; a bundled demo's name where no
    local folder has it), and whether it is a bundled demo."""
    from .demo import BUNDLED_MODELS, demo_model_path

    if model is None:
        return demo_model_path(), True
    if model in BUNDLED_MODELS and not os.path.exists(model):
        path = BUNDLED_MODELS[model]
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"The bundled model {model!r} is missing from {path}; reinstall meddiffusers.")
        return path, True
    return model, False


def regions(args: argparse.Namespace) -> int:
    """Print the regions (classes) of a pipeline, read from its `model_index.json` alone."""
    model, _ = resolve_model(args.model)
    index, path = read_model_index(model)
    registry = regions_from_index(index, path)
    saved = "regions" in index and index["regions"] is not None
    rows = [("class id", "name", "aliases", "size (D x H x W)", "spacing mm (D x H x W)", "description")]
    for region in sorted(registry.regions, key=lambda r: r.class_id):
        sizes = [region.volume_size, *(size for size, _ in region.other_sizes)] if region.volume_size else []
        spacings = [region.spacing, *(spacing for _, spacing in region.other_sizes)]
        rows.append(
            (
                str(region.class_id),
                region.name,
                ", ".join(region.aliases) or "-",
                "; ".join(_format_triple(size) for size in sizes) or "-",
                "; ".join(_format_triple(spacing) for spacing in spacings[: max(len(sizes), 1)]),
                region.description or "-",
            )
        )
    print(f"{len(registry)} region(s) of {model}{'' if saved else ' (none saved: the pipeline defaults)'}:")
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("Pass a name, an alias or a class id to `meddiffusers generate --region`.")
    return 0


def autoencode(args: argparse.Namespace) -> int:
    """Encode a NIfTI volume with a `VQModel3D` and write the reconstruction (and optionally the latent)."""
    import torch

    from .io import HUWindow, affine_from_tensor_spacing, load_nifti, save_nifti
    from .models.autoencoders.loading import load_vq_model
    from .pipelines.pipeline_utils_3d import decode_large_latents_in_slabs, planned_decode

    # Every argument is checked, and the input read, before the model is loaded.
    check_device(args.device)
    check_nifti_output(args.output)
    if args.latent_output:
        check_nifti_output(args.latent_output, "--latent-output")
        if os.path.abspath(args.latent_output) == os.path.abspath(args.output):
            raise ValueError("--output and --latent-output name the same file.")
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise ValueError(f"--output {args.output!r} would overwrite the input; choose another file name.")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise ValueError(f"--memory-budget must be a positive number of GiB, got {args.memory_budget}.")
    transform = _intensity_transform(args.intensity)
    _check_source(args.vqvae, "--vqvae")
    volume = load_nifti(args.input)
    vqvae = load_vq_model(args.vqvae, subfolder=args.subfolder).to(args.device).eval()
    if args.tile:
        vqvae.enable_tiling()
    elif args.memory_budget is not None:
        vqvae.enable_slab_decoding(memory_budget=args.memory_budget)
    if isinstance(transform, HUWindow):
        scaled, value_range = transform(volume.tensor), None
    else:
        scaled, value_range = transform(volume.tensor, return_range=True)
    print(f"input {args.input}: tensor {tuple(volume.tensor.shape)}, spacing (D, H, W) {volume.spacing} mm")
    start = time.perf_counter()
    with torch.no_grad():
        encoded = vqvae.encode(scaled.to(args.device))
        recon = decode_large_latents_in_slabs(vqvae, encoded.latents, output_size=encoded.input_size).cpu()
    elapsed = time.perf_counter() - start
    restored = transform.inverse(recon) if value_range is None else transform.inverse(recon, value_range)
    save_nifti(restored, args.output, affine=volume.affine, header=volume.header)
    error = (recon - scaled).abs().mean().item()
    print(
        f"latent {tuple(encoded.latents.shape)}, {planned_decode(vqvae, encoded.latents)} decode; "
        f"mean |reconstruction - input| in [-1, 1] space: {error:.4f}"
    )
    print(f"wrote {args.output} ({elapsed:.1f} s)")
    if args.latent_output:
        factor = vqvae.downsample_factor
        latent_spacing = tuple(s * factor for s in volume.spacing)
        save_nifti(
            vqvae.normalize_latents(encoded.latents).cpu(),
            args.latent_output,
            affine=affine_from_tensor_spacing(latent_spacing),
        )
        print(f"wrote {args.latent_output}")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Generate volumes with a `MedDiffusionPipeline` or a `PatchSlidingWindowPipeline` and write them as NIfTI."""

    from .generation import (
        indices_of_this_process,
        process_description,
        process_device,
        volume_generator,
        volume_seeds,
        wait_for_all_processes,
    )
    from .pipelines import MedDiffusionPipeline, PatchSlidingWindowPipeline
    from .schedulers import SCHEDULERS, scheduler_from_name

    # Every argument is checked, reading only model_index.json, before the model is loaded.
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown --scheduler {args.scheduler!r}; choose one of {', '.join(sorted(SCHEDULERS))}.")
    if args.num_volumes < 1 or args.steps < 1:
        raise ValueError("--num-volumes and --steps must be at least 1.")
    if args.volume_size and min(args.volume_size) < 1:
        raise ValueError(f"--volume-size must be positive, got {' '.join(map(str, args.volume_size))}.")
    if args.window_size and min(args.window_size) < 1:
        raise ValueError(f"--window-size must be positive, got {' '.join(map(str, args.window_size))}.")
    if not 0 <= args.overlap < 1:
        raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}.")
    if args.window_batch_size < 1:
        raise ValueError(f"--window-batch-size must be at least 1, got {args.window_batch_size}.")
    check_generate_output(args.output)
    check_device(args.device)
    args.model, demo = resolve_model(args.model)
    index, index_path = read_model_index(args.model)
    kind = index.get("_class_name")
    if kind not in _GENERATE_PIPELINES:
        raise ValueError(
            f"--model {args.model!r} holds a {kind!r}; `meddiffusers generate` runs "
            f"{' and '.join(_GENERATE_PIPELINES)} folders."
        )
    windowed = kind == "PatchSlidingWindowPipeline"
    if not windowed and args.window_size:
        raise ValueError("--window-size applies to PatchSlidingWindowPipeline models only.")
    region = regions_from_index(index, index_path).resolve(args.region)  # unknown regions list the valid ones
    if demo:
        print(f"using the bundled demo model ({args.model}): a demonstration, not a clinical model")
    pipe = (PatchSlidingWindowPipeline if windowed else MedDiffusionPipeline).from_pretrained(args.model)
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe = pipe.to(process_device(args.device))
    size = tuple(args.volume_size) if args.volume_size else None
    window = tuple(args.window_size) if args.window_size else None
    seeds = volume_seeds(args.seed, args.num_volumes)
    indices = indices_of_this_process(args.num_volumes)  # all of them, or this process's share under accelerate
    start = time.perf_counter()
    paths, shape = [], None
    for index in indices:  # one volume per call: each from its own seed, whatever the number of processes
        generator = volume_generator(seeds[index])
        if windowed:  # CT in HU, windowed over volumes of any size
            output = pipe(
                region=region.name,
                volume_size=size,
                window_size=window,
                overlap=args.overlap,
                blend=args.blend,
                window_batch_size=args.window_batch_size,
                num_inference_steps=args.steps,
                generator=generator,
                eta=args.eta,
                output_type="nifti",
            )
            height, width, depth = output.volumes[0].shape  # NIfTI (x, y, z) = tensor (H, W, D)
            shape = (depth, height, width)
        else:
            output = pipe(
                region=region.name,
                num_inference_steps=args.steps,
                generator=generator,
                volume_size=size,
                eta=args.eta,
                output_type="pt",
            )
            shape = tuple(output.volumes.shape[2:])
        paths += output.save(args.output, indices=[index], total=args.num_volumes)
    where = process_description()
    print(
        f"{where + ': ' if where else ''}generated {len(paths)} x {region.name} volume(s) of {shape} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    for path in paths:
        print(f"wrote {path}")
    wait_for_all_processes()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `meddiffusers` command."""
    parser = argparse.ArgumentParser(prog="meddiffusers", description="3D medical diffusion models.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="Generate CT/MRI volumes with a MedDiffusionPipeline or a PatchSlidingWindowPipeline.",
        description="Generate volumes of one region and save them as NIfTI with the region's spacing (model-space "
        "intensities for MedDiffusion models, HU for MedDiff-FM patch models, which also take any --volume-size).",
    )
    gen.add_argument(
        "--model",
        default=None,
        help="Pipeline folder or Hub repo id (default: the bundled MedDiffusion demo; `meddiff-fm-demo` is the "
        "bundled MedDiff-FM patch demo).",
    )
    gen.add_argument(
        "--region",
        required=True,
        help="Region name, alias or class id of the model, e.g. MRBrain, CTChest or 0 for the bundled demo "
        "(`meddiffusers regions --model ...` lists them).",
    )
    gen.add_argument(
        "--output",
        required=True,
        help="A .nii or .nii.gz file (with --num-volumes > 1, _0, _1, ... is added before the extension), or a "
        "folder: an existing one or a path ending in '/', which receives <region>_<index>.nii.gz files. Any other "
        "name is refused.",
    )
    gen.add_argument("--steps", type=int, default=100, help="Denoising steps (default 100).")
    gen.add_argument(
        "--scheduler",
        default=None,
        help="Sampler: ddim (the original, default for the released and demo models), ddpm, diffusers-ddim, dpm++, "
        "dpm++-singlestep, unipc, deis, pndm, euler, euler-ancestral, heun or kdpm2 (the fast solvers need about "
        "25 --steps).",
    )
    gen.add_argument(
        "--eta",
        type=float,
        default=0.0,
        help="DDIM stochasticity (0 deterministic, 1 the original stochastic sampler).",
    )
    gen.add_argument(
        "--seed", type=int, default=None, help="Random seed for reproducible volumes (volume i uses seed + i)."
    )
    gen.add_argument(
        "--num-volumes",
        type=int,
        default=1,
        help="Volumes to generate; under `accelerate launch -m meddiffusers generate ...` they are split between the "
        "processes, with the same volumes and file names as on one process.",
    )
    gen.add_argument("--volume-size", type=int, nargs=3, metavar=("D", "H", "W"), help="Override the region's size.")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps, where available.")
    windows = gen.add_argument_group("sliding windows (PatchSlidingWindowPipeline models)")
    windows.add_argument(
        "--window-size", type=int, nargs=3, metavar=("D", "H", "W"), help="Window (default: the model's patch size)."
    )
    windows.add_argument("--overlap", type=float, default=0.5, help="Fraction shared by neighbouring windows (0.5).")
    windows.add_argument("--blend", choices=("constant", "gaussian"), default="constant", help="Window weights.")
    windows.add_argument("--window-batch-size", type=int, default=1, help="Windows per denoiser call (speed only).")
    gen.set_defaults(handler=generate)

    reg = commands.add_parser(
        "regions",
        help="List the regions (classes) a pipeline can generate.",
        description="Print each region's class id, name, aliases, default size and spacing, read from the "
        "pipeline's model_index.json alone (no weights are loaded).",
    )
    reg.add_argument("--model", default=None, help="Pipeline folder or Hub repo id (default: the bundled demo model).")
    reg.set_defaults(handler=regions)

    from .conversion import build_argument_parser, run_from_args

    conv = commands.add_parser(
        "convert",
        help="Convert released 3D MedDiffusion or GEM-3D checkpoints into a meddiffusers (safetensors) folder.",
        description="Convert original .ckpt/.pt files (read without executing pickled code) into a pipeline folder.",
    )
    build_argument_parser(conv)
    conv.set_defaults(handler=run_from_args)

    auto = commands.add_parser(
        "autoencode",
        help="Encode and decode a NIfTI volume with a VQModel3D (Patch-Volume autoencoder).",
        description="Encode a NIfTI volume patch-wise, quantise, decode jointly and save the reconstruction.",
    )
    auto.add_argument("--vqvae", required=True, help="Original .ckpt file, a saved VQModel3D folder or a Hub repo id.")
    auto.add_argument("--subfolder", default=None, help="Subfolder of the model inside a pipeline folder or repo.")
    auto.add_argument("--input", required=True, help="Input .nii/.nii.gz volume.")
    auto.add_argument(
        "--output", required=True, help="Reconstruction .nii or .nii.gz file (input intensity units and affine)."
    )
    auto.add_argument("--latent-output", default=None, help="Also save the normalised latent (.nii or .nii.gz).")
    auto.add_argument(
        "--intensity", default="percentile", help="'percentile' (0.5/99.5, any modality) or 'ct-<window>' (ct-wide)."
    )
    decode = auto.add_mutually_exclusive_group()
    decode.add_argument(
        "--tile",
        action="store_true",
        help="Decode in overlapping blended tiles: faster on large volumes, approximate. By default latents above "
        "16³ voxels are decoded exactly slab by slab in bounded memory.",
    )
    decode.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GIB",
        help="Decode exactly slab by slab with the decoder's activations held to about this many GiB (any size).",
    )
    auto.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps, where available.")
    auto.set_defaults(handler=autoencode)

    from .restore_cli import add_restore_arguments, restore

    rest = commands.add_parser(
        "restore",
        help="Restore a NIfTI volume with a diffusion prior: denoise, zsr, sparse-ct, mri (DiffPIR) or inpaint "
        "(RePaint).",
        description="Denoising, z-super-resolution, sparse-view CT, accelerated MRI or inpainting of a NIfTI volume "
        "with a MedDiff-FM patch prior or a MedDiffusion latent prior; the output keeps the input's units and affine.",
    )
    add_restore_arguments(rest)
    rest.set_defaults(handler=restore)

    from .evaluation.cli import add_evaluate_arguments, evaluate

    ev = commands.add_parser(
        "evaluate",
        help="Score generated volumes against real ones (FID, KID, MMD, MS-SSIM) or restorations (PSNR, SSIM).",
        description="Features from a local extractor (MedicalNet 3D ResNet, MAISI 2.5D, or random for smoke tests), "
        "metrics written as JSON plus a Markdown table with the extractor, its weights' sha256 and the intensity "
        "convention. Nothing is downloaded.",
    )
    add_evaluate_arguments(ev)
    ev.set_defaults(handler=evaluate)
    return parser


_OUT_OF_MEMORY_HINTS = {
    "autoencode": "; try --tile or --device cpu",
    "generate": "; try a smaller --volume-size, fewer --num-volumes or --device cpu",
}


def _version() -> str:
    import diffusers
    import torch

    from . import __version__

    return f"meddiffusers {__version__} (torch {torch.__version__}, diffusers {diffusers.__version__})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `meddiffusers` console script.

    Bad input (arguments, files, regions, devices) is reported as one line on stderr with exit code 2.
    """
    import torch

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except torch.OutOfMemoryError:
        hint = _OUT_OF_MEMORY_HINTS.get(args.command, "")
        message = f"out of memory on {getattr(args, 'device', 'the device')}{hint}."
        print(f"meddiffusers {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # OSError covers FileNotFoundError
        message = " ".join(str(error).split())  # one line, whatever the source of the message
        print(f"meddiffusers {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`meddiffusers evaluate`: generative metrics (FID, KID, MMD, MS-SSIM diversity) between two sets of NIfTI volumes,
or restoration metrics (PSNR, SSIM) between paired volumes, written as JSON plus a Markdown table.

Every argument, every file and the feature extractor's weight file are checked before features are computed; bad
input ends with one line on stderr and exit code 2 (through `meddiffusers.cli.main`), and nothing is written: the
results go to temporary files that are renamed into place only at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

import torch

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GENERATIVE_METRICS = ("fid", "kid", "mmd", "mmd-linear", "msssim")
RESTORATION_METRICS = ("psnr", "ssim", "msssim")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `meddiffusers evaluate` to `parser` (a sub-command parser) and return it."""
    parser.add_argument(
        "--real",
        required=True,
        help="Reference volumes: a folder of .nii/.nii.gz files, a manifest (.txt: one path per line; .json: a list "
        "of paths or of {'image': path}; relative paths from the manifest's folder) or one NIfTI file.",
    )
    parser.add_argument(
        "--fake", required=True, help="Generated (or, with --restoration, restored) volumes; as --real."
    )
    parser.add_argument(
        "--features",
        default="random",
        help="Feature extractor: medicalnet<10|18|34|50>:PATH (a local MedicalNet weight file, fed [-1, 1] as "
        "HA-GAN does; medicalnet50-zscore:PATH z-scores each volume first), "
        "maisi25d:<torchvision backbone>:PATH (MAISI's 2.5D protocol) or random[:SEED] (smoke tests only, not "
        "comparable). Default: random. Nothing is downloaded.",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help=f"Comma-separated metrics. Generation: {','.join(GENERATIVE_METRICS)} (default fid,kid,mmd,msssim; "
        f"mmd is Gaussian with the median bandwidth); --restoration: {','.join(RESTORATION_METRICS)} "
        "(default psnr,ssim).",
    )
    parser.add_argument(
        "--intensity",
        default="model",
        help="How file intensities map to [-1, 1]: model (already in [-1, 1], default), hu:MIN:MAX or ct-<window> "
        "(e.g. ct-wide = [-1000, 1000] HU), percentile[:LOW:HIGH] (per volume, default 0.5:99.5).",
    )
    parser.add_argument(
        "--real-intensity",
        default=None,
        help="Convention of the --real files when it differs from --intensity (e.g. real CT in HU with "
        "--real-intensity ct-wide, generated volumes in model space with --intensity model).",
    )
    parser.add_argument(
        "--input-size", type=int, nargs=3, metavar=("D", "H", "W"), help="Centre crop / pad every volume to this."
    )
    parser.add_argument(
        "--spacing", type=float, nargs=3, metavar=("D", "H", "W"), help="Resample every volume to this spacing (mm)."
    )
    parser.add_argument("--restoration", action="store_true", help="Compare volumes paired by file name (PSNR, SSIM).")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets (100).")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID: rows per subset (1000, capped).")
    parser.add_argument("--ssim-kernel", type=int, default=11, help="(MS-)SSIM Gaussian window side, odd (11).")
    parser.add_argument("--msssim-scales", type=int, default=5, help="MS-SSIM scales (5; sides >= kernel * 2^(s-1)).")
    parser.add_argument("--msssim-pairs", type=int, default=100, help="MS-SSIM diversity: pairs of volumes (100).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of KID subsets and MS-SSIM pairs (0).")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps, where available.")
    parser.add_argument(
        "--output", required=True, help="Results .json file; a Markdown table is written next to it (.md)."
    )
    return parser


def _nifti_files(source: str, option: str) -> list[str]:
    """The NIfTI files a folder, a manifest or a single file names, in a stable (sorted or listed) order."""
    if os.path.isdir(source):
        files = sorted(os.path.join(source, name) for name in os.listdir(source) if name.endswith(NIFTI_SUFFIXES))
    elif source.endswith(NIFTI_SUFFIXES):
        files = [source]
    elif source.endswith((".txt", ".json")):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{option} {source!r}: no such manifest.")
        base = os.path.dirname(os.path.abspath(source))
        with open(source, encoding="utf-8") as handle:
            if source.endswith(".json"):
                try:
                    entries = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{option} {source!r} is not valid JSON ({error}).") from None
                if not isinstance(entries, list):
                    raise ValueError(f"{option} {source!r} must hold a JSON list of paths or of {{'image': path}}.")
                entries = [entry.get("image") if isinstance(entry, dict) else entry for entry in entries]
                if not all(isinstance(entry, str) for entry in entries):
                    raise ValueError(f"{option} {source!r}: every entry must be a path or have an 'image' path.")
            else:
                entries = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        files = [entry if os.path.isabs(entry) else os.path.join(base, entry) for entry in entries]
    elif not os.path.exists(source):
        raise FileNotFoundError(f"{option} {source!r}: no such folder or file.")
    else:
        raise ValueError(f"{option} {source!r} is neither a folder, a .nii/.nii.gz file nor a .txt/.json manifest.")
    if not files:
        raise ValueError(f"{option} {source!r} holds no .nii/.nii.gz volumes: the set is empty.")
    return files


def _check_headers(files: list[str]) -> None:
    """Open every file's header (cheap) and list all the ones that are missing or not NIfTI in one error."""
    import nibabel as nib

    bad = []
    for path in files:
        try:
            image = nib.load(path)
            if len(image.shape) not in (3, 4) or (len(image.shape) == 4 and image.shape[3] != 1):
                bad.append(f"{os.path.basename(path)} (shape {image.shape}: not one 3D volume)")
        except FileNotFoundError:
            bad.append(f"{path} (missing)")
        except Exception as error:  # nibabel raises many kinds for non-NIfTI input
            bad.append(f"{os.path.basename(path)} ({type(error).__name__})")
    if bad:
        raise ValueError(f"{len(bad)} unreadable volume(s), nothing was written: {'; '.join(bad)}.")


def _load(path: str, convention) -> tuple[torch.Tensor, tuple[float, float, float]]:
    from ..io import load_nifti

    volume = load_nifti(path, canonical=True)  # RAS+, as generated volumes and MAISI's protocol use
    return convention.to_model_space(volume.tensor), volume.spacing


def _metrics(text: str | None, restoration: bool) -> list[str]:
    known = RESTORATION_METRICS if restoration else GENERATIVE_METRICS
    default = "psnr,ssim" if restoration else "fid,kid,mmd,msssim"
    names = [name.strip().lower() for name in (text or default).split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        mode = "--restoration" if restoration else "generation"
        raise ValueError(f"--metrics: unknown {unknown or 'none given'} for {mode}; choose from {', '.join(known)}.")
    return list(dict.fromkeys(names))


def _check_output(path: str) -> str:
    if not path.endswith(".json"):
        raise ValueError(f"--output must be a .json file name, got {path!r}.")
    if os.path.isdir(path):
        raise ValueError(f"--output {path!r} is an existing folder, not a file name.")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path!r}: cannot write in {probe!r}.")
    return os.path.splitext(path)[0] + ".md"


def _write_atomically(contents: dict[str, str]) -> None:
    """Write every `path: text` to a temporary file in the same folder, then rename them all into place."""
    staged = []
    try:
        for path, text in contents.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            handle = tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8")
            with handle:
                handle.write(text)
            staged.append((handle.name, path))
        for temporary, path in staged:
            os.replace(temporary, path)
    finally:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)


def _pairs(count: int, limit: int, seed: int) -> list[tuple[int, int]]:
    """All `i < j` pairs when there are at most `limit`, else `limit` distinct pairs drawn with `seed`."""
    every = [(i, j) for i in range(count) for j in range(i + 1, count)]
    if len(every) <= limit:
        return every
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:limit]
    return [every[index] for index in sorted(order.tolist())]


def _ms_ssim_settings(args) -> dict:
    from .ssim import MS_SSIM_WEIGHTS

    if not 1 <= args.msssim_scales <= len(MS_SSIM_WEIGHTS):
        raise ValueError(f"--msssim-scales must be in 1..{len(MS_SSIM_WEIGHTS)}, got {args.msssim_scales}.")
    return {"weights": MS_SSIM_WEIGHTS[: args.msssim_scales], "kernel_size": args.ssim_kernel}


def _check_sizes_for_ms_ssim(shape, settings) -> None:
    from .ssim import ms_ssim_min_size

    minimum = ms_ssim_min_size(settings["kernel_size"], len(settings["weights"]))
    if min(shape) < minimum:
        raise ValueError(
            f"msssim: volumes of size {tuple(shape)} are smaller than the {minimum} voxels that "
            f"{len(settings['weights'])} scales with a {settings['kernel_size']}-voxel window need; pass fewer "
            "--msssim-scales, a smaller odd --ssim-kernel, or leave msssim out of --metrics."
        )


def _progress(items, description: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="volume", leave=False)


def _extract(files, convention, extractor, device, description, keep_volumes: bool, check=None):
    from .planes import PLANES, Planes25DFeatureExtractor

    features, volumes, failures = [], [], []
    planes = {plane: [] for plane in PLANES} if isinstance(extractor, Planes25DFeatureExtractor) else None
    for path in _progress(files, description):
        try:
            tensor, spacing = _load(path, convention)
        except (ValueError, OSError) as error:
            failures.append(f"{os.path.basename(path)} ({' '.join(str(error).split())[:120]})")
            continue
        if tensor.shape[1] != 1:
            failures.append(f"{os.path.basename(path)} ({tensor.shape[1]} channels, expected 1)")
            continue
        prepared = extractor.prepare(tensor, spacing).to(device)
        if check is not None:
            check(prepared.shape[2:])  # e.g. MS-SSIM's minimum size, before any feature is computed
        if planes is not None:
            per_plane = extractor.plane_features(prepared)
            for plane in PLANES:
                planes[plane] += [f.cpu() for f in per_plane[plane]]
            features.append(torch.stack([torch.cat([per_plane[p][0].mean(0) for p in PLANES])]).cpu())
        else:
            features.append(extractor(prepared).cpu())
        if keep_volumes:
            volumes.append(prepared.cpu())
    return (torch.cat(features) if features else None), planes, volumes, failures


def _diversity(volumes, settings, limit, seed) -> dict:
    from .ssim import ms_ssim_3d

    shapes = {tuple(v.shape[2:]) for v in volumes}
    if len(shapes) > 1:
        raise ValueError(
            f"msssim: the volumes have different sizes {sorted(shapes)}; pass --input-size so they share one."
        )
    _check_sizes_for_ms_ssim(next(iter(shapes)), settings)
    values = [
        float(ms_ssim_3d(volumes[i], volumes[j], data_range=2.0, **settings))
        for i, j in _pairs(len(volumes), limit, seed)
    ]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return {"mean": mean, "std": std, "pairs": len(values)}


def _evaluate_generation(args, metrics, convention, real_convention) -> dict:
    from ..cli import check_device
    from .features import build_feature_extractor
    from .metrics import frechet_distance, kernel_inception_distance, maximum_mean_discrepancy
    from .planes import maisi_frechet_distance

    check_device(args.device)
    real_files, fake_files = _nifti_files(args.real, "--real"), _nifti_files(args.fake, "--fake")
    needs_two = [m for m in metrics if m in ("fid", "kid", "mmd", "mmd-linear", "msssim")]
    for option, files in (("--real", real_files), ("--fake", fake_files)):
        if needs_two and len(files) < 2:
            raise ValueError(f"{option} has {len(files)} volume; {', '.join(needs_two)} need at least 2 per set.")
    ms_settings = _ms_ssim_settings(args) if "msssim" in metrics else None
    _check_headers(real_files + fake_files)
    extractor = build_feature_extractor(args.features, args.input_size, args.spacing).to(args.device)
    if extractor.weights_sha256:
        print(f"{extractor.name}: weights {extractor.weights_path}, sha256 {extractor.weights_sha256}")
    keep = ms_settings is not None

    def check(shape):
        if keep:
            _check_sizes_for_ms_ssim(shape, ms_settings)

    real, real_planes, real_volumes, bad_real = _extract(
        real_files, real_convention, extractor, args.device, "real", keep, check
    )
    fake, fake_planes, fake_volumes, bad_fake = _extract(
        fake_files, convention, extractor, args.device, "fake", keep, check
    )
    if bad_real or bad_fake:
        bad = bad_real + bad_fake
        raise ValueError(f"{len(bad)} unreadable volume(s), nothing was written: {'; '.join(bad)}.")
    values = {}
    if "fid" in metrics:
        if real_planes is not None:
            values.update(maisi_frechet_distance(real_planes, fake_planes))
        else:
            values["fid"] = frechet_distance(real, fake)
    if "kid" in metrics:
        mean, std = kernel_inception_distance(
            real, fake, num_subsets=args.kid_subsets, subset_size=args.kid_subset_size, seed=args.seed
        )
        values["kid"], values["kid_std"] = mean, std
    if "mmd" in metrics:
        values["mmd"] = maximum_mean_discrepancy(real, fake, kernel="gaussian")
    if "mmd-linear" in metrics:
        values["mmd_linear"] = maximum_mean_discrepancy(real, fake, kernel="linear")
    settings = None
    if ms_settings is not None:
        fake_div = _diversity(fake_volumes, ms_settings, args.msssim_pairs, args.seed)
        real_div = _diversity(real_volumes, ms_settings, args.msssim_pairs, args.seed)
        values["msssim_fake"], values["msssim_fake_std"] = fake_div["mean"], fake_div["std"]
        values["msssim_real"], values["msssim_real_std"] = real_div["mean"], real_div["std"]
        settings = {
            "weights": list(ms_settings["weights"]),
            "kernel_size": ms_settings["kernel_size"],
            "sigma": 1.5,
            "data_range": 2.0,
            "pairs_fake": fake_div["pairs"],
            "pairs_real": real_div["pairs"],
        }
    return {
        "mode": "generation",
        "extractor": extractor.describe(),
        "counts": {"real": len(real_files), "fake": len(fake_files)},
        "metrics": values,
        "settings": {
            "kid": {
                "subsets": args.kid_subsets,
                "subset_size": min(args.kid_subset_size, len(real_files), len(fake_files)),
                "kernel": "(x.y / F + 1)^3",
            },
            "mmd": "Gaussian kernel, median-heuristic bandwidth, unbiased MMD^2",
            "msssim": settings,
            "fid": "per-plane slice features, mean of xy / yz / zx (MAISI)"
            if real_planes is not None
            else "volume features",
        },
    }


def _name(path: str) -> str:
    return os.path.basename(path)


def _evaluate_restoration(args, metrics, convention, real_convention) -> dict:
    from .metrics import psnr
    from .ssim import ms_ssim_3d, ssim_3d

    real = {_name(p): p for p in _nifti_files(args.real, "--real")}
    fake = {_name(p): p for p in _nifti_files(args.fake, "--fake")}
    only_real, only_fake = sorted(set(real) - set(fake)), sorted(set(fake) - set(real))
    if only_real or only_fake:
        parts = []
        if only_real:
            parts.append(f"only in --real: {', '.join(only_real)}")
        if only_fake:
            parts.append(f"only in --fake: {', '.join(only_fake)}")
        raise ValueError(
            f"--restoration pairs volumes by file name, and {len(only_real) + len(only_fake)} have no pair "
            f"({'; '.join(parts)})."
        )
    names = sorted(real)
    ms_settings = _ms_ssim_settings(args) if "msssim" in metrics else None
    _check_headers([real[n] for n in names] + [fake[n] for n in names])
    rows, mismatched, failures = [], [], []
    for name in _progress(names, "pairs"):
        try:
            reference, _ = _load(real[name], real_convention)
            restored, _ = _load(fake[name], convention)
        except (ValueError, OSError) as error:
            failures.append(f"{name} ({' '.join(str(error).split())[:120]})")
            continue
        if reference.shape != restored.shape:
            mismatched.append(f"{name} ({tuple(reference.shape[2:])} vs {tuple(restored.shape[2:])})")
            continue
        if args.input_size:
            from ..utils import center_crop_or_pad

            reference = center_crop_or_pad(reference, tuple(args.input_size))
            restored = center_crop_or_pad(restored, tuple(args.input_size))
        row = {"name": name}
        if "psnr" in metrics:
            row["psnr"] = float(psnr(restored, reference, data_range=2.0))
        if "ssim" in metrics:
            if min(reference.shape[2:]) < args.ssim_kernel:
                raise ValueError(
                    f"ssim: {name} ({tuple(reference.shape[2:])}) is smaller than --ssim-kernel {args.ssim_kernel}."
                )
            row["ssim"] = float(ssim_3d(restored, reference, data_range=2.0, kernel_size=args.ssim_kernel))
        if ms_settings is not None:
            _check_sizes_for_ms_ssim(reference.shape[2:], ms_settings)
            row["msssim"] = float(ms_ssim_3d(restored, reference, data_range=2.0, **ms_settings))
        rows.append(row)
    if failures or mismatched:
        parts = ([f"unreadable: {'; '.join(failures)}"] if failures else []) + (
            [f"mismatched shapes: {'; '.join(mismatched)}"] if mismatched else []
        )
        raise ValueError(
            f"{len(failures) + len(mismatched)} pair(s) could not be compared, nothing was written: "
            f"{' | '.join(parts)}."
        )
    summary = {}
    for metric in metrics:
        values = torch.tensor([row[metric] for row in rows], dtype=torch.float64)
        summary[metric] = float(values.mean())
        summary[f"{metric}_std"] = float(values.std(correction=0))
    return {
        "mode": "restoration",
        "extractor": None,
        "counts": {"pairs": len(rows)},
        "metrics": summary,
        "pairs": rows,
        "settings": {
            "data_range": "2 in [-1, 1] (the intensity window's width in its own units)",
            "ssim_kernel": args.ssim_kernel,
            "sigma": 1.5,
        },
    }


def _markdown(result: dict) -> str:
    metrics = result["metrics"]
    intensity = result["intensity"]["description"]
    if result["real_intensity"] != result["intensity"]:
        intensity = f"real: {result['real_intensity']['description']}; fake: {intensity}"
    if result["mode"] == "restoration":
        names = [m for m in metrics if not m.endswith("_std")]
        lines = [
            "| intensity | pairs | " + " | ".join(names) + " |",
            "| --- | --- | " + " | ".join("---" for _ in names) + " |",
            f"| {intensity} | {result['counts']['pairs']} | "
            + " | ".join(f"{metrics[m]:.4f} ± {metrics[m + '_std']:.4f}" for m in names)
            + " |",
            "",
            "| volume | " + " | ".join(names) + " |",
            "| --- | " + " | ".join("---" for _ in names) + " |",
        ]
        lines += [f"| {row['name']} | " + " | ".join(f"{row[m]:.4f}" for m in names) + " |" for row in result["pairs"]]
        return "\n".join(lines) + "\n"
    extractor = result["extractor"]
    sha = extractor["weights_sha256"] or "- (random weights)"
    label = extractor["name"] + ("" if extractor["comparable"] else " (not comparable)")
    names = list(metrics)
    lines = [
        "| extractor | weights sha256 | intensity | real | fake | " + " | ".join(names) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
        f"| {label} | {sha} | {intensity} | {result['counts']['real']} | {result['counts']['fake']} | "
        + " | ".join(f"{metrics[m]:.6g}" for m in names)
        + " |",
    ]
    return "\n".join(lines) + "\n"


def evaluate(args: argparse.Namespace) -> int:
    """Run `meddiffusers evaluate` with parsed `args`; returns the exit code (0). Bad input raises `ValueError` /
    `OSError`, which `meddiffusers.cli.main` reports as one line with exit code 2."""
    from .. import __version__
    from .intensity import IntensityConvention

    markdown_path = _check_output(args.output)
    metrics = _metrics(args.metrics, args.restoration)
    convention = IntensityConvention.parse(args.intensity)
    real_convention = IntensityConvention.parse(args.real_intensity) if args.real_intensity else convention
    for option, value, low in (
        ("--kid-subsets", args.kid_subsets, 1),
        ("--kid-subset-size", args.kid_subset_size, 2),
        ("--msssim-pairs", args.msssim_pairs, 1),
    ):
        if value < low:
            raise ValueError(f"{option} must be at least {low}, got {value}.")
    if args.ssim_kernel < 1 or args.ssim_kernel % 2 == 0:
        raise ValueError(f"--ssim-kernel must be a positive odd number, got {args.ssim_kernel}.")
    if args.input_size and min(args.input_size) < 1:
        raise ValueError(f"--input-size must be positive, got {args.input_size}.")
    if args.spacing and min(args.spacing) <= 0:
        raise ValueError(f"--spacing must be positive, got {args.spacing}.")
    run = _evaluate_restoration if args.restoration else _evaluate_generation
    result = run(args, metrics, convention, real_convention)
    result = {
        "meddiffusers": __version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "real": args.real,
        "fake": args.fake,
        "intensity": convention.to_dict(),
        "real_intensity": real_convention.to_dict(),
        **result,
    }
    table = _markdown(result)
    _write_atomically({args.output: json.dumps(result, indent=2) + "\n", markdown_path: table})
    print(table, end="")
    print(f"wrote {args.output} and {markdown_path}")
    return 0

"""Convert released checkpoints into a meddiffusers folder (safetensors, configs, model card).

3D MedDiffusion (Patch-Volume autoencoder, BiFlowNet, ControlNet) and GEM-3D (volume model + informed-slice
generator, [`convert_gem3d`]). Used by `meddiffusers convert` and
`scripts/convert_checkpoints/convert_meddiffusion_to_diffusers.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The released pairs: the 8x autoencoder goes with the patch-1 BiFlowNet, the 4x one with the patch-2 BiFlowNet.
RELEASED_PAIRS = {8: 1, 4: 2}


@dataclass
class ConversionReport:
    """What a conversion wrote and, per component, which source weights it mapped or dropped.

    `mapped[name]` and `dropped[name]` are the `mapped` and `dropped` lists of the component's
    [`~loaders.single_file.KeyReport`].
    """

    output_dir: str
    components: list[str] = field(default_factory=list)
    mapped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, key_report) -> None:
        """Record the key report of component `name`."""
        self.mapped[name] = list(key_report.mapped)
        self.dropped[name] = list(key_report.dropped)


def _cast(model, dtype: torch.dtype):
    return model if dtype == torch.float32 else model.to(dtype)


def _split_original_config(path: str | None) -> tuple[dict | None, dict | None]:
    """A JSON with `vqvae` (the autoencoder's `cfg`) and/or `unet` (BiFlowNet keyword arguments) sections."""
    if path is None:
        return None, None
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if "vqvae" in config or "unet" in config:
        return config.get("vqvae"), config.get("unet")
    if "cfg" in config or "model" in config:
        return config, None
    return None, config


def _front_matter(tags: list[str], pipeline_tag: str | None = None) -> str:
    """The YAML header of a converted model card: license, library, `medical-imaging`/`3d` then `tags`, then
    `diffusion`/`meddiffusers`, and the Hub pipeline tag where given."""
    lines = ["---", "license: other", "library_name: meddiffusers", "tags:"]
    lines += [f"- {tag}" for tag in ("medical-imaging", "3d", *tags, "diffusion", "meddiffusers")]
    lines += [f"pipeline_tag: {pipeline_tag}"] if pipeline_tag else []
    return "\n".join([*lines, "---", ""])


def _model_card(components: list[str], dtype: str, sources: dict[str, str]) -> str:
    usage = (
        "```python\nimport torch\nfrom meddiffusers import MedDiffusionPipeline\n\n"
        'pipe = MedDiffusionPipeline.from_pretrained("REPO_OR_FOLDER")\n'
        'output = pipe(region="MRBrain", num_inference_steps=100, generator=torch.Generator().manual_seed(0))\n'
        'output.save("brain.nii.gz")\n```\n'
        if "unet" in components and "vqvae" in components
        else "```python\nfrom meddiffusers import VQModel3D, BiFlowNet3DModel\n\n"
        'vqvae = VQModel3D.from_pretrained("REPO_OR_FOLDER", subfolder="vqvae")\n```\n'
    )
    source_lines = "\n".join(
        f"- `{name}/`: converted from `{os.path.basename(path)}`" for name, path in sources.items()
    )
    front_matter = _front_matter(["ct", "mri"], "unconditional-image-generation")
    return f"""{front_matter}
# 3D MedDiffusion (converted for meddiffusers)

Weights of [3D MedDiffusion](https://arxiv.org/abs/2412.13059) (Wang et al., *A 3D Medical Latent Diffusion Model for
Controllable and High-quality Medical Image Generation*, IEEE Transactions on Medical Imaging, 2025), converted from
the authors' released checkpoints to safetensors for the meddiffusers library. The numbers are unchanged: the
converted models reproduce the original code's outputs. Weights are stored as {dtype}.

{source_lines}

Research use only; not a medical device. The licence is that of the original release: check the authors'
repository (ShanghaiTech-IMPACT/3D-MedDiffusion) before redistributing.

## Usage

{usage}
Regions (anatomy / modality classes) and their default sizes and spacings are stored in `model_index.json`.

## Citation

```bibtex
@article{{wang2025meddiffusion,
  title   = {{A 3D Medical Latent Diffusion Model for Controllable and High-quality Medical Image Generation}},
  author  = {{Wang, Haoshen and Liu, Zhentao and Sun, Kaicong and Wang, Xiaodong and Shen, Dinggang and Cui, Zhiming}},
  journal = {{IEEE Transactions on Medical Imaging}},
  year    = {{2025}},
  doi     = {{10.1109/TMI.2025.3585372}}
}}
```
"""


def _check_output_dir(output_dir: str) -> None:
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"Output folder {output_dir!r} exists and is not empty; choose a new one.")


def _write_atomically(output_dir: str, write) -> None:
    """Run `write(staging)` in a private folder next to `output_dir`, then move it into place (all or nothing)."""
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".meddiffusers-convert-", dir=parent)
    try:
        write(staging)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates it private
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert(
    output_dir: str,
    vqvae_checkpoint: str | None = None,
    unet_checkpoint: str | None = None,
    controlnet_checkpoint: str | None = None,
    dtype: str = "fp32",
    use_ema: bool = True,
    original_config: str | None = None,
    allow_unreleased_pair: bool = False,
) -> ConversionReport:
    """Convert original checkpoints into `output_dir` (written atomically: nothing is left behind on failure).

    Args:
        output_dir: Destination folder (must not exist or be empty).
        vqvae_checkpoint: Original Patch-Volume `.ckpt` (written to `vqvae/`).
        unet_checkpoint: Original BiFlowNet `.pt` (written to `unet/`).
        controlnet_checkpoint: The authors' ControlNet `.pt` (written to `controlnet/`; with both other checkpoints
            the folder is a `MedDiffusionControlNetPipeline`).
        dtype: `fp32`, `fp16` or `bf16` for the saved weights.
        use_ema: Take the BiFlowNet's EMA weights (what the original sampler uses).
        original_config: JSON with original configurations (`{"vqvae": cfg, "unet": kwargs}` or either alone).
        allow_unreleased_pair: Accept an autoencoder/BiFlowNet pair the authors did not release together
            (e.g. a 4x autoencoder with a patch-1 BiFlowNet).

    Returns:
        A [`ConversionReport`].
    """
    from .io.regions import RegionRegistry, meddiffusion_regions
    from .loaders.single_file import load_original_model
    from .models import BiFlowNet3DModel, ControlNet3DModel, VQModel3D
    from .pipelines import MedDiffusionControlNetPipeline, MedDiffusionPipeline
    from .schedulers import MedDiffusionDDIMScheduler

    if not (vqvae_checkpoint or unet_checkpoint or controlnet_checkpoint):
        raise ValueError(
            "Nothing to convert: pass --vqvae_checkpoint, --unet_checkpoint or both "
            "(GEM-3D: --gem3d_volume_checkpoint)."
        )
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    for path in (vqvae_checkpoint, unet_checkpoint, controlnet_checkpoint):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint not found: {path!r}.")
    _check_output_dir(output_dir)

    vqvae_cfg, unet_kwargs = _split_original_config(original_config)
    report = ConversionReport(output_dir=os.path.abspath(output_dir))
    vqvae = unet = controlnet = None
    if vqvae_checkpoint:
        vqvae, key_report = load_original_model(VQModel3D, vqvae_checkpoint, original_config=vqvae_cfg)
        report.add("vqvae", key_report)
    if unet_checkpoint:
        unet, key_report = load_original_model(
            BiFlowNet3DModel, unet_checkpoint, original_config=unet_kwargs, use_ema=use_ema
        )
        report.add("unet", key_report)
    if controlnet_checkpoint:
        controlnet, key_report = load_original_model(
            ControlNet3DModel, controlnet_checkpoint, original_config=unet_kwargs
        )
        report.add("controlnet", key_report)
        if unet is not None:
            shared = ("in_channels", "base_channels", "channel_mults", "attention_levels", "dit_patch_size")
            different = [
                k for k in shared if list(np.atleast_1d(controlnet.config[k])) != list(np.atleast_1d(unet.config[k]))
            ]
            if different:
                raise ValueError(f"The ControlNet does not match the BiFlowNet (different {different}).")
    if vqvae is not None and unet is not None:
        if vqvae.config.latent_channels != unet.config.in_channels:
            raise ValueError(
                f"The autoencoder's latents have {vqvae.config.latent_channels} channels but the BiFlowNet expects "
                f"{unet.config.in_channels}: these checkpoints do not belong together."
            )
        expected_patch = RELEASED_PAIRS.get(vqvae.downsample_factor)
        if not allow_unreleased_pair and expected_patch not in (None, unet.config.dit_patch_size):
            raise ValueError(
                f"A {vqvae.downsample_factor}x autoencoder was released with a patch-{expected_patch} BiFlowNet, but "
                f"this BiFlowNet uses patch {unet.config.dit_patch_size} (8x pairs with BiFlowNet_0453500.pt, 4x with "
                "BiFlowNet_4x.pt). Pass --allow_unreleased_pair if the pairing is intended."
            )

    torch_dtype = DTYPES[dtype]

    def write(staging: str) -> None:
        if vqvae is not None and unet is not None:
            classes = unet.config.num_class_embeds or 0
            if classes == len(meddiffusion_regions()):
                regions = meddiffusion_regions()
            else:
                regions = RegionRegistry([{"name": f"class_{i}", "class_id": i} for i in range(classes)])
            components = dict(vqvae=_cast(vqvae, torch_dtype), unet=_cast(unet, torch_dtype))
            pipeline_class = MedDiffusionPipeline
            if controlnet is not None:
                components["controlnet"] = _cast(controlnet, torch_dtype)
                pipeline_class = MedDiffusionControlNetPipeline
            pipe = pipeline_class(**components, scheduler=MedDiffusionDDIMScheduler(), regions=regions.to_config())
            pipe.save_pretrained(staging)
            report.components = [*components, "scheduler"]
        else:
            for name, model in (("vqvae", vqvae), ("unet", unet), ("controlnet", controlnet)):
                if model is not None:
                    _cast(model, torch_dtype).save_pretrained(os.path.join(staging, name))
                    report.components.append(name)
        sources = {"vqvae": vqvae_checkpoint, "unet": unet_checkpoint, "controlnet": controlnet_checkpoint}
        sources = {name: path for name, path in sources.items() if path}
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(_model_card(report.components, dtype, sources))

    _write_atomically(output_dir, write)
    return report


def _gem3d_model_card(components: list[str], dtype: str, sources: dict[str, str], max_label: int) -> str:
    source_lines = "\n".join(
        f"- `{name}`: converted from `{os.path.basename(path)}`" for name, path in sources.items()
    )
    informed = (
        "mask=mask, start_slice=40, num_inference_steps=200"
        if "slice_unet" in components
        else "mask=mask, informed_slice=(reference, 40), start_slice=40"
    )
    front_matter = _front_matter(["mri", "ct", "segmentation-to-image"])
    return f"""{front_matter}
# GEM-3D (converted for meddiffusers)

Weights of [GEM-3D](https://arxiv.org/abs/2403.12852) (Zhu et al., *Generative Enhancement for 3D Medical Images*):
a latent diffusion model that generates a whole 3D volume matching a segmentation mask, window by window, from one
"informed slice" that sets the appearance. Converted from the authors' PyTorch-Lightning checkpoints to safetensors
for the meddiffusers library; the numbers are unchanged. Weights are stored as {dtype}. Masks hold labels
0..{max_label}.

{source_lines}

Research use only; not a medical device. The original code (HKU-MedAI/GEM-3D) is GPL-3.0; check the authors'
release of the weights for their terms before redistributing.

## Usage

```python
import torch
from meddiffusers import GEM3DVolumePipeline, load_nifti

pipe = GEM3DVolumePipeline.from_pretrained("REPO_OR_FOLDER")
mask = load_nifti("labels.nii.gz")
reference = load_nifti("another_patient.nii.gz")
output = pipe({informed}, generator=torch.Generator().manual_seed(0))
output.save("synthetic.nii.gz")
```

## Citation

```bibtex
@article{{zhu2024gem3d,
  title   = {{Generative Enhancement for 3D Medical Images}},
  author  = {{Zhu, Lingting and Codella, Noel and Chen, Dongdong and Jin, Zhenchao and Yuan, Lu and Yu, Lequan}},
  journal = {{arXiv preprint arXiv:2403.12852}},
  year    = {{2024}}
}}
```
"""


def convert_gem3d(
    output_dir: str,
    volume_checkpoint: str,
    slice_checkpoint: str | None = None,
    original_config: str | dict | None = None,
    slice_original_config: str | dict | None = None,
    dtype: str = "fp32",
    use_ema: bool = False,
    slice_use_ema: bool = False,
    max_label: int = 3,
    resolution: int | None = None,
) -> ConversionReport:
    """Convert the original GEM-3D checkpoints into a [`GEM3DVolumePipeline`] folder (written atomically).

    The folder holds `model_index.json`, `vae/`, `unet/`, `scheduler/` (GEM-3D's DDIM with the checkpoint's schedule),
    `slice_unet/` when a slice checkpoint is given, and a model card. Checkpoints are read once each and never
    execute pickled code.

    Args:
        output_dir: Destination folder (must not exist or be empty).
        volume_checkpoint: The stage-2 (pseudo-3D) `.ckpt` (`last.ckpt` of the original training).
        slice_checkpoint: The informed-slice generator `.ckpt`.
        original_config: The volume model's original YAML (path) or `{"model": ...}` dict; `None` infers it.
        slice_original_config: The same for the slice generator.
        dtype: `fp32`, `fp16` or `bf16` for the saved weights.
        use_ema: Take the volume model's EMA weights (the original inference uses the raw ones).
        slice_use_ema: Take the slice generator's EMA weights.
        max_label: Largest mask label the model was trained with (3 brain, 4 abdomen), saved in the pipeline config.
        resolution: Model input size; default the original config's `image_size` times the VAE factor (512).

    Returns:
        A [`ConversionReport`] with the key reports of `unet`, `vae` and `slice_unet`.
    """
    from .loaders.original_gem3d_checkpoint import load_gem3d_components
    from .pipelines.gem3d import GEM3DVolumePipeline, gem3d_ddim_scheduler
    from .pipelines.gem3d.pipeline_gem3d_volume import original_resolution

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    for path in (volume_checkpoint, slice_checkpoint):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint not found: {path!r}.")
    for config in (original_config, slice_original_config):
        if isinstance(config, str | os.PathLike) and not os.path.isfile(config):
            raise FileNotFoundError(f"Original config not found: {config!r}.")
    _check_output_dir(output_dir)

    parts = load_gem3d_components(
        volume_checkpoint,
        slice_checkpoint=slice_checkpoint,
        original_config=original_config,
        slice_original_config=slice_original_config,
        use_ema=use_ema,
        slice_use_ema=slice_use_ema,
    )
    if parts["slice_unet"] is not None and parts["slice_unet"].config.in_channels != parts["unet"].config.out_channels:
        raise ValueError(
            "The slice generator's latents do not match the volume model's: these files do not belong together."
        )
    report = ConversionReport(output_dir=os.path.abspath(output_dir))
    for name, key_report in parts["report"].items():
        if key_report is not None:
            report.add(name, key_report)
    if resolution is None:
        resolution = original_resolution(original_config, parts["vae"])
    torch_dtype = DTYPES[dtype]
    pipe = GEM3DVolumePipeline(
        vae=_cast(parts["vae"], torch_dtype),
        unet=_cast(parts["unet"], torch_dtype),
        scheduler=gem3d_ddim_scheduler(**parts["scheduler_config"]),
        slice_unet=None if parts["slice_unet"] is None else _cast(parts["slice_unet"], torch_dtype),
        max_label=max_label,
        resolution=resolution,
    )
    report.components = ["vae", "unet", "scheduler"] + (["slice_unet"] if parts["slice_unet"] is not None else [])
    sources = {"unet, vae": volume_checkpoint, "slice_unet": slice_checkpoint}
    sources = {name: os.fspath(path) for name, path in sources.items() if path}

    def write(staging: str) -> None:
        pipe.save_pretrained(staging)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(_gem3d_model_card(report.components, dtype, sources, max_label))

    _write_atomically(output_dir, write)
    return report


def build_argument_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of the converter (shared by the script and `meddiffusers convert`)."""
    parser = parser or argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vqvae_checkpoint", help="Original Patch-Volume autoencoder .ckpt (e.g. PatchVolume_8x_s2).")
    parser.add_argument("--unet_checkpoint", help="Original BiFlowNet .pt (e.g. BiFlowNet_0453500.pt).")
    parser.add_argument("--controlnet_checkpoint", help="The authors' ControlNet .pt (writes controlnet/).")
    parser.add_argument("--output_dir", required=True, help="New folder to write (nothing is written on failure).")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="Precision of the saved weights.")
    parser.add_argument("--no_ema", action="store_true", help="Use the BiFlowNet's raw weights instead of its EMA.")
    parser.add_argument("--original_config", help="JSON with original configs: {'vqvae': cfg, 'unet': kwargs}.")
    parser.add_argument(
        "--allow_unreleased_pair", action="store_true", help="Accept a non-released AE/BiFlowNet pair."
    )
    gem3d = parser.add_argument_group("GEM-3D (instead of the 3D MedDiffusion checkpoints)")
    gem3d.add_argument("--gem3d_volume_checkpoint", help="Original GEM-3D stage-2 .ckpt (the volume model).")
    gem3d.add_argument("--gem3d_slice_checkpoint", help="Original GEM-3D informed-slice generator .ckpt.")
    gem3d.add_argument("--gem3d_original_config", help="Original YAML of the volume model (else inferred).")
    gem3d.add_argument("--gem3d_slice_original_config", help="Original YAML of the slice generator.")
    gem3d.add_argument("--gem3d_ema", action="store_true", help="Use the EMA weights (the original uses raw ones).")
    gem3d.add_argument("--max_label", type=int, default=3, help="Largest mask label: 3 brain, 4 abdomen.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the folder to the Hub after converting.")
    parser.add_argument("--repo_id", help="Hub repository for --push_to_hub, e.g. user/meddiffusion-8x.")
    parser.add_argument("--verbose", action="store_true", help="List every mapped and dropped source key.")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments and print what was done."""
    if args.push_to_hub and not args.repo_id:
        raise ValueError("--push_to_hub needs --repo_id.")
    gem3d = getattr(args, "gem3d_volume_checkpoint", None)
    if getattr(args, "gem3d_slice_checkpoint", None) and not gem3d:
        raise ValueError("--gem3d_slice_checkpoint needs --gem3d_volume_checkpoint.")
    if gem3d and (args.vqvae_checkpoint or args.unet_checkpoint or args.controlnet_checkpoint):
        raise ValueError("Convert GEM-3D and 3D MedDiffusion checkpoints in separate runs.")
    if gem3d:
        report = convert_gem3d(
            output_dir=args.output_dir,
            volume_checkpoint=gem3d,
            slice_checkpoint=args.gem3d_slice_checkpoint,
            original_config=args.gem3d_original_config,
            slice_original_config=args.gem3d_slice_original_config,
            dtype=args.dtype,
            use_ema=args.gem3d_ema,
            slice_use_ema=args.gem3d_ema,
            max_label=args.max_label,
        )
    else:
        report = _convert_meddiffusion(args)
    return _print_report(args, report)


def _convert_meddiffusion(args: argparse.Namespace) -> ConversionReport:
    return convert(
        output_dir=args.output_dir,
        vqvae_checkpoint=args.vqvae_checkpoint,
        unet_checkpoint=args.unet_checkpoint,
        controlnet_checkpoint=args.controlnet_checkpoint,
        dtype=args.dtype,
        use_ema=not args.no_ema,
        original_config=args.original_config,
        allow_unreleased_pair=args.allow_unreleased_pair,
    )


def _print_report(args: argparse.Namespace, report: ConversionReport) -> int:
    for name in report.mapped:
        print(
            f"{name}: {len(report.mapped[name])} weights mapped, {len(report.dropped.get(name, []))} entries dropped"
        )
        if args.verbose:
            for source, target in report.mapped[name]:
                print(f"  {source} -> {target}")
            for source in report.dropped.get(name, []):
                print(f"  dropped: {source}")
    print(f"wrote {report.output_dir} ({', '.join(report.components)})")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.repo_id, exist_ok=True)
        api.upload_folder(folder_path=args.output_dir, repo_id=args.repo_id)
        print(f"pushed to {args.repo_id}")
    return 0

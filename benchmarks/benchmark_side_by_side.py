"""meddiffusers against the original 3D MedDiffusion code, side by side on the same inputs and the same weights (CPU).

Needs a local checkout of the original code (ShanghaiTech-IMPACT/3D-MedDiffusion, tested at commit d1beb8f); nothing
is downloaded. Packages the original imports but never uses for inference (torchio, torchvision, timm,
pytorch_lightning, einops_exts) are replaced by small stand-ins when they are not installed; installed packages are
used as they are.

For each case the original model is built with the released 8x configuration and a fixed seed, every weight is
perturbed (so the zero-initialised adaLN branches compute), and `BiFlowNet3DModel` / `VQModel3D` are loaded from its
state dict through the project's converters. One process checks that both give the same output; then the original
and meddiffusers are timed in alternating fresh processes (`--rounds` each): `torch.set_num_threads(--threads)`,
fp32, one warm-up call and the median of `--calls` calls, wall clock and process CPU time per call, and peak memory
as `VmHWM` after resetting it (`/proc/self/clear_refs`) once the model is built, and that peak less the resident size
of the built model (interpreter, libraries and weights), i.e. what the calls add. Ratios are meddiffusers / original.

    python benchmarks/benchmark_side_by_side.py --original /path/to/3D-MedDiffusion
    python benchmarks/benchmark_side_by_side.py --original /path/to/3D-MedDiffusion --cases biflownet-16 --rounds 5
    python benchmarks/benchmark_side_by_side.py --original ... --cases biflownet-16 --threads 1  # less contention
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

CASES = {
    "biflownet-16": ("biflownet", 16),
    "biflownet-32": ("biflownet", 32),
    "ae-encode-128": ("encode", 128),
    "ae-decode-128": ("decode", 128),
}
# Released 8x BiFlowNet (evaluation/class_conditional_generation.py defaults).
BIFLOWNET_KWARGS = dict(
    dim=72,
    dim_mults=(1, 1, 2, 4, 8),
    channels=8,
    cond_classes=7,
    patch_size=1,
    sub_volume_size=(8, 8, 8),
    use_sparse_linear_attn=[0, 0, 0, 1, 1],
    attn_heads=8,
    resnet_groups=24,
    DiT_num_heads=8,
    mlp_ratio=4,
    vq_size=64,
    num_mid_DiT=1,
)
# Released config/PatchVolume_8x_s2.yaml, inference-relevant fields (the loss fields only build training modules).
AE_CFG = {
    "model": {
        "embedding_dim": 8,
        "n_codes": 8192,
        "n_hiddens": 48,
        "downsample": [8, 8, 8],
        "disc_channels": 32,
        "disc_layers": 3,
        "discriminator_iter_start": 0,
        "disc_loss_type": "hinge",
        "volume_gan_weight": 2,
        "l1_weight": 4.0,
        "gan_feat_weight": 4,
        "perceptual_weight": 2,
        "perceptual_3d": False,
        "restart_thres": 1.0,
        "no_random_restart": False,
        "norm_type": "group",
        "num_groups": 24,
        "stage": 2,
        "lr": 3e-5,
    },
    "dataset": {"image_channels": 1, "patch_size": 64},
}
TOLERANCE = {"biflownet": 1e-4, "encode": 1e-4, "decode": 1e-4}


# --------------------------------------------------------------------------------------- the original's imports


def _stand_in(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__path__ = []  # importable as a package
    sys.modules[name] = module
    return module


class _Anything:
    """Stands for an attribute the original only touches at import time (e.g. `torchvision.transforms`)."""

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *args, **kwargs):
        raise RuntimeError("This stand-in of an optional package cannot be called.")


def _install_stand_ins() -> list[str]:
    """Provide the packages the original imports but that are not installed; returns the names replaced."""
    import torch
    from einops import rearrange
    from torch import nn

    replaced = []
    if importlib.util.find_spec("einops_exts") is None:

        def rearrange_many(tensors, pattern, **lengths):
            return [rearrange(tensor, pattern, **lengths) for tensor in tensors]

        _stand_in("einops_exts", rearrange_many=rearrange_many, check_shape=lambda tensor, pattern, **lengths: None)
        replaced.append("einops_exts")
    if importlib.util.find_spec("timm") is None:

        class Attention(nn.Module):
            """timm's ViT attention as the original DiT blocks use it: fused `qkv`, SDPA, `proj`."""

            def __init__(self, dim, num_heads=8, qkv_bias=False, **unused):
                super().__init__()
                self.num_heads = num_heads
                self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
                self.proj = nn.Linear(dim, dim)

            def forward(self, x):
                batch, length, dim = x.shape
                qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
                query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
                return self.proj(out.transpose(1, 2).reshape(batch, length, dim))

        def to_2tuple(value):
            return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

        _stand_in("timm")
        _stand_in("timm.models")
        _stand_in("timm.models.vision_transformer", Attention=Attention)
        _stand_in("timm.models.layers", to_2tuple=to_2tuple)
        replaced.append("timm")
    if importlib.util.find_spec("torchvision") is None:
        _stand_in("torchvision", transforms=_Anything(), utils=_Anything(), models=_Anything())
        _stand_in("torchvision.models", vgg16=_Anything())
        replaced.append("torchvision")
    if importlib.util.find_spec("torchio") is None:
        _stand_in("torchio")
        replaced.append("torchio")
    if importlib.util.find_spec("pytorch_lightning") is None:

        class LightningModule(nn.Module):
            def save_hyperparameters(self, *args, **kwargs):
                pass

        _stand_in("pytorch_lightning", LightningModule=LightningModule)
        _stand_in("pytorch_lightning.callbacks", BaseFinetuning=object)
        replaced.append("pytorch_lightning")
    return replaced


class _Config(dict):
    """Attribute access to a nested dict (what the original reads from its OmegaConf config)."""

    def __getattr__(self, name):
        value = self[name]
        return _Config(value) if isinstance(value, dict) else value


def _perturb(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and "pos_embed" not in name:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)


def build_original(kind: str, original: str):
    """The original model with perturbed seeded weights, in eval mode, and the stand-ins used."""
    import torch

    sys.path.insert(0, original)
    before = set(sys.modules)
    replaced = _install_stand_ins()
    try:
        if kind == "biflownet":
            from ddpm.BiFlowNet import BiFlowNet
        else:
            from AutoEncoder.model import PatchVolume
    finally:
        # The original's modules keep their references; other libraries must not find the stand-ins later.
        for name in set(sys.modules) - before:
            if name.split(".")[0] in replaced:
                del sys.modules[name]
    torch.manual_seed(0)
    if kind == "biflownet":
        model = BiFlowNet(**BIFLOWNET_KWARGS)
    else:
        # Only the inference parts are built: the perceptual loss would fetch pretrained VGG weights.
        PatchVolume.Perceptual_Loss = lambda **kwargs: torch.nn.Identity()
        model = PatchVolume.patchvolumeAE(_Config(AE_CFG))
        del model.volume_discriminator, model.perceptual_loss
    _perturb(model, seed=1)
    return model.eval(), replaced


def build_meddiffusers(kind: str, state_dict: dict):
    """`BiFlowNet3DModel` / `VQModel3D` holding the converted original `state_dict`."""
    if kind == "biflownet":
        from meddiffusers import BiFlowNet3DModel
        from meddiffusers.loaders.original_biflownet_checkpoint import (
            config_from_constructor_kwargs,
            convert_biflownet_state_dict,
        )

        model = BiFlowNet3DModel(**config_from_constructor_kwargs(BIFLOWNET_KWARGS))
        model.load_state_dict(convert_biflownet_state_dict(state_dict), strict=True)
    else:
        from meddiffusers import VQModel3D
        from meddiffusers.loaders.original_patch_volume import config_from_original, convert_patch_volume_state_dict

        model = VQModel3D(**config_from_original(AE_CFG))
        converted, _ = convert_patch_volume_state_dict(state_dict)
        model.load_state_dict(converted, strict=True)
    return model.eval()


def make_inputs(kind: str, size: int):
    """Seeded inputs: a noisy latent, timestep and label (BiFlowNet), a volume (encode) or a latent (decode)."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    if kind == "biflownet":
        return torch.randn((1, 8, size, size, size), generator=generator)
    if kind == "encode":
        return torch.rand((1, 1, size, size, size), generator=generator) * 2 - 1
    return torch.randn((1, 8, size // 8, size // 8, size // 8), generator=generator)


def make_call(kind: str, implementation: str, model, inputs):
    """A no-argument callable running one forward / encode / decode."""
    import torch

    if kind == "biflownet":
        timestep, label = torch.tensor([500]), torch.tensor([3])
        if implementation == "original":
            resolution = torch.tensor(inputs.shape[2:], dtype=torch.float32) / 64.0
            return lambda: model(inputs, timestep, y=label, res=resolution)
        return lambda: model(inputs, timestep, class_labels=label).sample
    if kind == "encode":
        if implementation == "original":
            return lambda: model.patch_encode(inputs, quantize=False, patch_size=64)
        return lambda: model.encode(inputs).latents
    if implementation == "original":
        return lambda: model.decode(inputs, quantize=True)
    return lambda: model.decode(inputs).sample


# --------------------------------------------------------------------------------------------------- workers


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident size (Linux `clear_refs` value 5)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def worker_parity(case: str, original: str, weights_path: str) -> dict:
    """Run both implementations once on the same inputs; save the converted weights for the timing workers."""
    import torch
    from safetensors.torch import save_file

    kind, size = CASES[case]
    reference, replaced = build_original(kind, original)
    state_dict = {key: value.contiguous() for key, value in reference.state_dict().items()}
    save_file(state_dict, weights_path)
    ours = build_meddiffusers(kind, state_dict)
    inputs = make_inputs(kind, size)
    with torch.no_grad():
        expected = make_call(kind, "original", reference, inputs)()
        actual = make_call(kind, "meddiffusers", ours, inputs)()
    difference = (expected - actual).abs()
    return {
        "case": case,
        "max_abs_diff": difference.max().item(),
        "mean_abs_diff": difference.mean().item(),
        "output_scale": expected.abs().max().item(),
        "stand_ins": replaced,
    }


def worker_time(case: str, implementation: str, original: str, weights_path: str, calls: int, threads: int) -> dict:
    """Build one implementation, reset the peak, warm up once and time `calls` calls."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    kind, size = CASES[case]
    if implementation == "original":
        model, _ = build_original(kind, original)
        model.load_state_dict(load_file(weights_path), strict=True)
    else:
        model = build_meddiffusers(kind, load_file(weights_path))
    call = make_call(kind, implementation, model, make_inputs(kind, size))
    reset_peak_rss()
    built_kib = _status_kib("VmRSS")
    with torch.no_grad():
        call()
        wall, cpu = [], []
        for _ in range(calls):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            call()
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
    return {
        "wall_s": statistics.median(wall),
        "cpu_s": statistics.median(cpu),
        "peak_gib": _status_kib("VmHWM") / 2**20,
        "above_built_gib": (_status_kib("VmHWM") - built_kib) / 2**20,
        "walls": wall,
    }


def run_worker(arguments: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise RuntimeError(f"worker {arguments[:2]} failed: {message}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_average() -> str:
    with open("/proc/loadavg", encoding="ascii") as handle:
        return " ".join(handle.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="Local checkout of ShanghaiTech-IMPACT/3D-MedDiffusion.")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=3, help="Alternating process pairs per case.")
    parser.add_argument("--calls", type=int, default=5, help="Timed calls per process (after one warm-up).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    original = os.path.abspath(args.original)
    if args.worker:
        mode, case, weights_path = args.worker[:3]
        if mode == "parity":
            row = worker_parity(case, original, weights_path)
        else:
            row = worker_time(case, args.worker[3], original, weights_path, args.calls, args.threads)
        print(json.dumps(row))
        return
    if not os.path.isfile(os.path.join(original, "ddpm", "BiFlowNet.py")):
        parser.exit(2, f"error: {original} does not look like a 3D-MedDiffusion checkout (no ddpm/BiFlowNet.py).\n")

    import platform

    import torch

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads, fp32, {args.rounds} rounds x {args.calls} calls; load average {load_average()}"
    )
    columns = [
        "case",
        "max abs diff",
        "original (s)",
        "meddiffusers (s)",
        "ratio",
        "CPU-time ratio",
        "peak GiB, original → ours",
        "peak above the built model, GiB",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases:
            weights = os.path.join(folder, f"{case}.safetensors")
            parity = run_worker(["parity", case, weights, "--original", original])
            if parity["max_abs_diff"] > TOLERANCE[CASES[case][0]] * max(1.0, parity["output_scale"]):
                print(f"| {case} | {parity['max_abs_diff']:.2e} | outputs differ: not timed | | | | | |", flush=True)
                continue
            rows = {"original": [], "meddiffusers": []}
            for _ in range(args.rounds):
                for implementation in rows:
                    extra = ["--original", original, "--calls", str(args.calls), "--threads", str(args.threads)]
                    rows[implementation].append(run_worker(["time", case, weights, implementation, *extra]))
            keys = ("wall_s", "cpu_s", "peak_gib", "above_built_gib")
            summary = {
                name: {key: statistics.median(row[key] for row in found) for key in keys}
                for name, found in rows.items()
            }
            theirs, ours = summary["original"], summary["meddiffusers"]
            print(
                f"| {case} | {parity['max_abs_diff']:.1e} | {theirs['wall_s']:.3f} | {ours['wall_s']:.3f} | "
                f"{ours['wall_s'] / theirs['wall_s']:.2f} | {ours['cpu_s'] / theirs['cpu_s']:.2f} | "
                f"{theirs['peak_gib']:.2f} → {ours['peak_gib']:.2f} | "
                f"{theirs['above_built_gib']:.2f} → {ours['above_built_gib']:.2f} |",
                flush=True,
            )
            spread = {name: [round(row["wall_s"], 3) for row in found] for name, found in rows.items()}
            print(f"<!-- {case}: per-process medians {json.dumps(spread)}; load average {load_average()} -->")


if __name__ == "__main__":
    main()

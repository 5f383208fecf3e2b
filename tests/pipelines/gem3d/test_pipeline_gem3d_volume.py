"""`GEM3DVolumePipeline`: the original's recorded sampler runs replayed, whole-volume parity, inputs and outputs."""

import nibabel as nib
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from meddiffusers import NiftiVolume
from meddiffusers.pipelines.gem3d import (
    GEM3DVolumePipeline,
    gem3d_ddim_scheduler,
    never_written_slices,
    plan_windows,
    resize_slices,
)
from tests.pipelines.gem3d.conftest import (
    CONFIG,
    OracleUNet,
    RecordedSliceUNet,
    RecordedUNet,
    frames_last,
    recover_eps,
)

LATENT_TOL = dict(atol=1e-3, rtol=1e-4)  # the fixture's tolerance for replayed DDIM latents
WINDOW_DRAW = (1, 16, 4, 8, 8)  # one window's x_T / step noise, frame-major as the original draws it
ANCHOR_DRAW = (1, 1, 4, 8, 8)


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    )


def standin_pipeline(unet=None, scheduler=None, slice_unet=None):
    pipe = GEM3DVolumePipeline(
        vae=tiny_vae(),
        unet=unet or RecordedUNet(),
        scheduler=scheduler or gem3d_ddim_scheduler(),
        slice_unet=slice_unet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def anchored_run(reference, prefix):
    """The recorded anchored window `prefix` (`anch_fwd` / `anch_rev`): eps per step, draws, condition, anchor."""
    r = {key[len(prefix) + 1 :]: value for key, value in reference.items() if key.startswith(prefix + "_")}
    eps = recover_eps(r["steps_x_before"], r["steps_pred_x0"], r["a_t"])
    draws = [r["x_T"], r["anchor_init_noise"]]
    for noise, anchor_noise in zip(r["steps_noise"], r["steps_anchor_noise"]):
        draws += [noise, anchor_noise]
    return r, eps, draws


# ------------------------------------------------------------------------------------- (e), (f), (c2) with stand-ins


def test_plain_ddim_window_replays_the_original_10_step_run(reference, replay):
    r = reference
    unet = RecordedUNet()
    unet.outputs = [frames_last(eps) for eps in r["ddim_steps_eps"]]
    pipe = standin_pipeline(unet)
    recorder = replay([r["ddim_x_T"], *r["ddim_steps_noise"]], shapes=[WINDOW_DRAW] * 11)
    condition = frames_last(r["ddim_cond"])
    out = pipe(
        mask_latents=condition[:, :4],
        informed_latents=condition[:, 4:, 0],
        start_slice=0,
        num_inference_steps=10,
        output_type="latent",
    ).volumes
    assert len(recorder.calls) == 11
    assert unet.timesteps == r["ddim_timesteps_visited"].tolist()
    for i, sample in enumerate(unet.inputs):
        torch.testing.assert_close(sample[:, :4], frames_last(r["ddim_steps_x_before"][i]), **LATENT_TOL)
        torch.testing.assert_close(sample[:, 4:], condition, atol=0, rtol=0)
    torch.testing.assert_close(out, frames_last(r["ddim_steps_x_after"][-1]), **LATENT_TOL)


@pytest.mark.parametrize("prefix, frame", [("anch_fwd", 0), ("anch_rev", 15)])
def test_anchored_window_replays_the_original_in_both_directions(reference, replay, prefix, frame):
    r, eps, draws = anchored_run(reference, prefix)
    unet = RecordedUNet()
    unet.outputs = [frames_last(e) for e in eps]
    pipe = standin_pipeline(unet)
    replay(draws, shapes=[WINDOW_DRAW, ANCHOR_DRAW] + [WINDOW_DRAW, ANCHOR_DRAW] * 5)
    condition = frames_last(r["cond"])
    anchor = r["previous"].permute(0, 2, 1, 3, 4)  # (B, h, 4, H, W) -> (B, 4, h, H, W)
    out = pipe.sample_window(
        condition, anchor=anchor, anchor_frames=(frame, frame + 1), num_inference_steps=5, anchor_noise="reference"
    )
    assert unet.timesteps == r["timesteps_visited"].tolist()
    for i, sample in enumerate(unet.inputs):
        torch.testing.assert_close(sample[:, :4], frames_last(r["steps_x_before"][i]), **LATENT_TOL)
    # The anchor frame after each step is the re-noised anchor of the DDIM-index quirk.
    for i in range(4):
        torch.testing.assert_close(unet.inputs[i + 1][:, :4, frame], r["steps_anchor_value"][i, :, 0], **LATENT_TOL)
    torch.testing.assert_close(out, frames_last(r["steps_x_after"][-1]), **LATENT_TOL)
    torch.testing.assert_close(out[:, :, frame], r["steps_anchor_value"][-1, :, 0], **LATENT_TOL)


def test_slice_generator_ddim_replays_the_original(reference, replay):
    r = reference
    slice_unet = RecordedSliceUNet()
    slice_unet.outputs = list(recover_eps(r["sddim_steps_x_before"], r["sddim_steps_pred_x0"], r["sddim_a_t"]))
    pipe = standin_pipeline(slice_unet=slice_unet)
    replay([r["sddim_x_T"], *r["sddim_steps_noise"]], shapes=[(1, 4, 8, 8)] * 6)
    latents = pipe.generate_informed_latents(1, 3 / 20, (8, 8), num_inference_steps=5)
    assert slice_unet.timesteps == r["sddim_timesteps_visited"].tolist()
    for context in slice_unet.contexts:  # one context token: the original's PositionalEmbedder of k / S
        torch.testing.assert_close(context[:, 0], r["sddim_cond"], atol=1e-6, rtol=0)
    for i, sample in enumerate(slice_unet.inputs):
        torch.testing.assert_close(sample, r["sddim_steps_x_before"][i], **LATENT_TOL)
    torch.testing.assert_close(latents, r["sddim_steps_x_after"][-1], **LATENT_TOL)


# ------------------------------------------------------------------------------------- (h), (e), (f) with real weights


def test_whole_volume_propagation_reproduces_the_original(stage2_pipeline, reference, replay):
    r, table = reference, CONFIG["h_draw_table"]
    flat = r["h_all_draws_flat"]
    draws = [flat[d["offset_in_flat"] : d["offset_in_flat"] + d["numel"]] for d in table]
    shapes = [(1, 16, 4, 8, 8) if d["kind"] in ("x_T", "step_noise") else (1, 1, 4, 8, 8) for d in table]
    recorder = replay(draws, shapes)
    S, p, steps = CONFIG["h_S_p_ddim_steps"]
    out = stage2_pipeline(
        mask_latents=r["h_mask_latents"].permute(0, 2, 1, 3, 4),
        informed_latents=r["h_informed_latent"],
        start_slice=p,
        num_inference_steps=steps,
        geometry="reference",
        anchor_noise="reference",
        output_type="latent",
    )
    assert len(recorder.calls) == len(table)
    assert out.volumes.shape == (1, 4, S, 8, 8) and out.start_slice == p
    torch.testing.assert_close(out.volumes.permute(0, 2, 1, 3, 4), r["h_R"], **LATENT_TOL)
    assert never_written_slices(plan_windows(S, p, geometry="reference"), S) == []


def test_real_stage2_model_replays_plain_and_anchored_windows(stage2_pipeline, reference, replay):
    r = reference
    replay([r["ddim_x_T"], *r["ddim_steps_noise"]])
    condition = frames_last(r["ddim_cond"])
    out = stage2_pipeline.sample_window(condition, num_inference_steps=10)
    torch.testing.assert_close(out, frames_last(r["ddim_steps_x_after"][-1]), **LATENT_TOL)
    for prefix, frame in (("anch_fwd", 0), ("anch_rev", 15)):
        run, _, draws = anchored_run(reference, prefix)
        replay(draws)
        out = stage2_pipeline.sample_window(
            frames_last(run["cond"]),
            anchor=run["previous"].permute(0, 2, 1, 3, 4),
            anchor_frames=(frame, frame + 1),
            num_inference_steps=5,
            anchor_noise="reference",
        )
        torch.testing.assert_close(out, frames_last(run["steps_x_after"][-1]), **LATENT_TOL)


# ------------------------------------------------------------------------------------- other schedulers, anchors


def oracle_pipeline(scheduler, num_slices=37, seed=0):
    """A pipeline whose U-Net predicts the exact noise of one known latent volume (the denoising target)."""
    unet = OracleUNet()
    target = torch.randn((1, 4, num_slices, 8, 8), generator=torch.Generator().manual_seed(seed))
    unet.target, unet.alphas_cumprod = target, scheduler.alphas_cumprod.double().float()
    pipe = standin_pipeline(unet, scheduler=scheduler)
    # The mask channels carry each slice's index, so the oracle knows where a window lies.
    mask_latents = torch.arange(num_slices).float().view(1, 1, -1, 1, 1).expand(1, 4, -1, 8, 8).clone()
    return pipe, target, mask_latents


# GEM-3D's DDIM ends at alphas_cumprod[0] (noise std 0.029 left); with alpha 1 at the end the oracle is recovered.
CLEAN_DDIM = dict(set_alpha_to_one=True)


@pytest.mark.parametrize(
    "scheduler",
    [
        gem3d_ddim_scheduler(**CLEAN_DDIM),
        DPMSolverMultistepScheduler.from_config(gem3d_ddim_scheduler().config),
        UniPCMultistepScheduler.from_config(gem3d_ddim_scheduler().config),
    ],
    ids=["ddim", "dpmsolver", "unipc"],
)
def test_any_scheduler_with_matched_anchors_recovers_the_oracle_volume(scheduler):
    pipe, target, mask_latents = oracle_pipeline(scheduler)
    out = pipe(
        mask_latents=mask_latents,
        informed_latents=torch.zeros(1, 4, 8, 8),
        start_slice=10,
        num_inference_steps=20,
        eta=1.0 if isinstance(scheduler, DDIMScheduler) else 0.0,
        anchor_noise="matched",
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
    ).volumes
    # Every slice is generated once (exact geometry) and the anchors end clean: the whole volume is the target.
    torch.testing.assert_close(out, target, atol=2e-3, rtol=0)


def test_step_callback_sees_every_step_of_every_window_and_can_replace_the_latents():
    pipe, target, mask_latents = oracle_pipeline(gem3d_ddim_scheduler(**CLEAN_DDIM), num_slices=20)
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append((step, int(timestep), tuple(kwargs["latents"].shape)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 4 else {}  # the first window's last step

    arguments = dict(mask_latents=mask_latents, informed_latents=torch.zeros(1, 4, 8, 8), start_slice=10)
    out = pipe(**arguments, num_inference_steps=5, generator=torch.Generator().manual_seed(1), output_type="latent")
    hooked = pipe(
        **arguments,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        callback_on_step_end=callback,
    )
    windows = plan_windows(20, 10, 16, 1, "exact")
    assert [step for step, _, _ in seen] == list(range(5 * len(windows)))
    assert [t for _, t, _ in seen[:5]] == [int(t) for t in pipe.scheduler.timesteps]
    assert {shape for _, _, shape in seen} == {(1, 4, 16, 8, 8)}
    first = windows[0]
    start, stop, _ = first.writes
    assert hooked.volumes[:, :, start:stop].abs().max() == 0  # the replaced window was written back as zeros
    assert not torch.equal(hooked.volumes, out.volumes)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(**arguments, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_reference_anchor_noise_leaves_the_original_residual_noise_on_the_anchor():
    scheduler = gem3d_ddim_scheduler(**CLEAN_DDIM)
    pipe, target, mask_latents = oracle_pipeline(scheduler, num_slices=31)
    generator = torch.Generator().manual_seed(3)
    out = pipe(
        mask_latents=mask_latents,
        informed_latents=torch.zeros(1, 4, 8, 8),
        start_slice=0,
        num_inference_steps=10,
        eta=1.0,
        geometry="reference",
        generator=generator,
        output_type="latent",
    ).volumes
    # S = 31, p = 0: windows [0, 16) and [15, 31); slice 15 is written by window 0, and window 1's anchor frame
    # (on slice 15, not written back) keeps the original's sqrt(1 - alphas_cumprod[0]) of noise.
    torch.testing.assert_close(out, target, atol=2e-3, rtol=0)
    samples = []
    original = pipe.sample_window

    def keep(*args, **kwargs):
        samples.append(original(*args, **kwargs))
        return samples[-1]

    pipe.sample_window = keep
    pipe(
        mask_latents=mask_latents,
        informed_latents=torch.zeros(1, 4, 8, 8),
        start_slice=0,
        num_inference_steps=10,
        geometry="reference",
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    )
    residual = (samples[1][:, :, 0] - target[:, :, 15]).std().item()
    expected = (1 - scheduler.alphas_cumprod[0]).sqrt().item()
    assert abs(residual - expected) < 0.2 * expected


def test_reference_geometry_leaves_never_written_slices_at_zero():
    pipe, target, mask_latents = oracle_pipeline(gem3d_ddim_scheduler(**CLEAN_DDIM), num_slices=17)
    out = pipe(
        mask_latents=mask_latents,
        informed_latents=torch.zeros(1, 4, 8, 8),
        start_slice=1,
        num_inference_steps=4,
        eta=0.0,
        geometry="reference",
        output_type="latent",
    ).volumes
    assert never_written_slices(plan_windows(17, 1, geometry="reference"), 17) == [0, 1]
    assert out[:, :, :2].abs().max() == 0
    torch.testing.assert_close(out[:, :, 2:], target[:, :, 2:], atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------------- images in, NIfTI out


def labelled_mask(num_slices=20, size=12):
    labels = torch.zeros(num_slices, size, size)
    labels[:, 3:9, 3:9] = 1
    labels[5:15, 5:7, 5:7] = 3
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    affine[:3, 3] = [-10, 4, 7]
    return NiftiVolume(tensor=labels[None, None], affine=affine)


def test_informed_slice_from_a_volume_draws_in_the_original_order(stage2_pipeline, tmp_path):
    mask = labelled_mask()
    image = torch.rand(1, 1, 9, 12, 12, generator=torch.Generator().manual_seed(0))
    calls = []
    import meddiffusers.pipelines.gem3d.pipeline_gem3d_volume as module

    def recording(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(tuple(shape))
        return torch.randn(shape, generator=generator, dtype=dtype)

    original = module.randn_tensor
    module.randn_tensor = recording
    try:
        out = stage2_pipeline(
            mask=mask,
            informed_slice=(image, 4),
            start_slice=3,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="nifti",
        )
    finally:
        module.randn_tensor = original
    # Informed-slice posterior; then per window: mask posterior, x_T, [anchor init], per step (noise, [anchor]).
    windows = plan_windows(20, 3)
    expected = [(1, 4, 8, 8)]
    for window in windows:
        expected += [(1, 16, 4, 8, 8), (1, 16, 4, 8, 8)]
        if window.anchor_frames is None:
            expected += [(1, 16, 4, 8, 8)] * 2
        else:
            n = window.anchor_frames[1] - window.anchor_frames[0]
            expected += [(1, n, 4, 8, 8), (1, 16, 4, 8, 8), (1, n, 4, 8, 8), (1, 16, 4, 8, 8)]
    assert calls == expected
    volume, paired = out.volumes[0], out.masks[0]
    assert isinstance(volume, nib.Nifti1Image) and volume.shape == (12, 12, 20)
    np.testing.assert_array_equal(volume.affine, mask.affine)
    np.testing.assert_array_equal(paired.affine, mask.affine)
    np.testing.assert_array_equal(np.asarray(paired.dataobj), mask.tensor[0, 0].permute(1, 2, 0).numpy())
    data = np.asarray(volume.dataobj)
    assert data.min() >= -1 and data.max() <= 1 and data.std() > 0
    # A paired image / label volume on disk, both with the mask's affine.
    assert out.save(tmp_path / "pair.nii.gz") == [str(tmp_path / "pair.nii.gz"), str(tmp_path / "pair_mask.nii.gz")]
    saved_mask = nib.load(tmp_path / "pair_mask.nii.gz")
    np.testing.assert_array_equal(saved_mask.affine, mask.affine)
    np.testing.assert_array_equal(saved_mask.get_fdata(), mask.tensor[0, 0].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(nib.load(tmp_path / "pair.nii.gz").get_fdata(), data, atol=1e-6)


def test_same_generator_same_volume_and_decoding_matches_the_vae(stage2_pipeline):
    kwargs = dict(mask=labelled_mask(), informed_latents=torch.zeros(1, 4, 8, 8), start_slice=2, num_inference_steps=2)
    first = stage2_pipeline(**kwargs, generator=torch.Generator().manual_seed(5), output_type="latent").volumes
    again = stage2_pipeline(**kwargs, generator=torch.Generator().manual_seed(5), output_type="latent").volumes
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    images = stage2_pipeline(
        **kwargs, generator=torch.Generator().manual_seed(5), output_type="pt", output_resolution="model"
    )
    vae = stage2_pipeline.vae
    with torch.no_grad():
        slice_7 = vae.decode(first[:, :, 7] / vae.config.scaling_factor).sample.clamp(-1, 1)[:, :1]
    torch.testing.assert_close(images.volumes[:, :, 7], slice_7, atol=1e-5, rtol=0)
    # The model grid is 16 x 16 here: the affine's in-plane spacing shrinks by 12 / 16.
    np.testing.assert_allclose(np.diag(images.affines[0])[:3], [1.5 * 12 / 16, 1.5 * 12 / 16, 2.5])


def test_generated_informed_slice_mode_runs_the_slice_generator_first(stage2_pipeline, monkeypatch):
    positions = []
    original = stage2_pipeline.generate_informed_latents

    def spy(batch, position, *args, **kwargs):
        positions.append(position)
        return original(batch, position, *args, **kwargs)

    monkeypatch.setattr(stage2_pipeline, "generate_informed_latents", spy)
    out = stage2_pipeline(
        mask=labelled_mask(),
        start_slice=5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert positions == [5 / 20]
    assert out.volumes.shape == (1, 1, 20, 12, 12) and out.masks.shape == (1, 1, 20, 12, 12)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.zeros(10, 12, 12), "fewer than one window"),
        (torch.zeros(1, 20, 12, 12), "volume"),
        (torch.full((20, 12, 12), float("nan")), "NaN"),
        (torch.full((20, 12, 12), 4.0), r"\[0, 3\]"),
        (torch.full((20, 12, 12), 0.5), "integer"),
    ],
    ids=["too-short", "wrong-rank", "nan", "label-out-of-range", "fractional"],
)
def test_bad_masks_are_rejected_before_any_work(mask, message, monkeypatch):
    unet = RecordedUNet()
    pipe = standin_pipeline(unet)
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("encoded before checking"))
    with pytest.raises(ValueError, match=message):
        pipe(mask=mask, informed_latents=torch.zeros(1, 4, 8, 8), start_slice=0, num_inference_steps=2)
    assert unet.inputs == []


def test_missing_informed_slice_without_a_slice_generator_is_a_clear_error():
    with pytest.raises(ValueError, match="slice_unet"):
        standin_pipeline()(mask=labelled_mask(), num_inference_steps=2)
    with pytest.raises(ValueError, match="anchor_noise"):
        standin_pipeline()(mask=labelled_mask(), informed_latents=torch.zeros(1, 4, 8, 8), anchor_noise="clean")


def test_round_trip_through_save_pretrained(stage2_pipeline, tmp_path):
    stage2_pipeline.save_pretrained(tmp_path / "pipe")
    loaded = GEM3DVolumePipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.resolution == 16 and type(loaded.unet) is type(stage2_pipeline.unet)
    assert loaded.slice_unet is not None
    for name in ("unet", "vae", "slice_unet"):
        theirs, ours = getattr(loaded, name).state_dict(), getattr(stage2_pipeline, name).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_a_batch_with_one_generator_per_mask_equals_the_single_runs(stage2_pipeline):
    labels = labelled_mask().tensor
    batch = torch.cat([labels, labels.flip(-1)])
    kwargs = dict(informed_latents=torch.zeros(2, 4, 8, 8), start_slice=4, num_inference_steps=2, output_type="latent")
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    together = stage2_pipeline(mask=batch, generator=generators, **kwargs).volumes
    for index, seed in enumerate((0, 1)):
        single = dict(kwargs, informed_latents=torch.zeros(1, 4, 8, 8))
        alone = stage2_pipeline(mask=batch[index : index + 1], generator=torch.Generator().manual_seed(seed), **single)
        torch.testing.assert_close(together[index : index + 1], alone.volumes, atol=1e-5, rtol=0)


def test_real_slice_generator_replays_the_original_ddim(stage2_pipeline, reference, replay):
    r = reference
    replay([r["sddim_x_T"], *r["sddim_steps_noise"]])
    latents = stage2_pipeline.generate_informed_latents(1, 3 / 20, (8, 8), num_inference_steps=5)
    torch.testing.assert_close(latents, r["sddim_steps_x_after"][-1], **LATENT_TOL)


def test_non_square_slices(stage2_pipeline):
    labels = torch.zeros(1, 1, 20, 12, 18)
    labels[..., 2:8, 3:15] = 2
    kwargs = dict(
        mask=labels,
        informed_latents=torch.zeros(1, 4, 8, 12),
        start_slice=0,
        num_inference_steps=2,
        resolution=(16, 24),
    )
    latents = stage2_pipeline(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").volumes
    assert latents.shape == (1, 4, 20, 8, 12)
    images = stage2_pipeline(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").volumes
    assert images.shape == (1, 1, 20, 12, 18)
    model_grid = stage2_pipeline.decode_latents(latents)
    assert model_grid.shape == (1, 1, 20, 16, 24)
    torch.testing.assert_close(images, resize_slices(model_grid, (12, 18), mode="bilinear").clamp(-1, 1))


def test_random_start_slice_comes_from_the_generator():
    pipe, _, mask_latents = oracle_pipeline(gem3d_ddim_scheduler(), num_slices=20)
    out = pipe(
        mask_latents=mask_latents,
        informed_latents=torch.zeros(1, 4, 8, 8),
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    )
    assert out.start_slice == int(torch.randint(20, (1,), generator=torch.Generator().manual_seed(7)))

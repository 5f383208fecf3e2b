"""Shared pipeline mechanics."""

import logging

from meddiffusers import DiffPIRPipeline, PatchSlidingWindowPipeline
from meddiffusers.demo import patch_demo_model_path


def test_from_pipe_reuses_the_components_without_the_spurious_cast_warning():
    source = PatchSlidingWindowPipeline.from_pretrained(patch_demo_model_path())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        pipe = DiffPIRPipeline.from_pipe(source)
    finally:
        diffusers_logger.removeHandler(handler)
    assert pipe.unet is source.unet  # the same modules, nothing copied or cast
    assert not [r for r in records if "should be kept in float32" in r.getMessage()]
    model_logger = logging.getLogger("diffusers.models.modeling_utils")
    filters_before = list(model_logger.filters)
    DiffPIRPipeline.from_pipe(source)
    assert model_logger.filters == filters_before  # ours is removed again: other warnings of that logger still show

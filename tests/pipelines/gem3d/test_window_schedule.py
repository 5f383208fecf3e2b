"""GEM-3D window geometry: the original schedule case by case, and the exact geometry's guarantees."""

import json

import pytest

from meddiffusers.pipelines.gem3d.window_schedule import (
    anchor_content_slices,
    final_provenance,
    never_written_slices,
    plan_windows,
    write_history,
)
from tests.conftest import FIXTURES

GEOMETRY = json.loads((FIXTURES / "gem3d_tiny" / "window_geometry.json").read_text())
CASES = GEOMETRY["cases"]


def describe_window(window, windows):
    """The JSON record of one window (schema of `window_geometry.json`, overlap 1)."""
    if window.informed_from is None:
        informed = "z_ref_0"
    else:
        source, frame = window.informed_from
        informed = {"from_window": source, "frame": frame, "slice": windows[source].start + frame}
    anchor = None
    if window.anchor_frames is not None:
        source, frame = window.anchor_source
        target = window.start + window.anchor_frames[0]
        content = windows[source].start + frame
        anchor = {
            "previous_reverse": window.anchor_reverse,
            "frame_in_window": window.anchor_frames[0],
            "target_slice": target,
            "content_from_window": source,
            "content_frame": frame,
            "content_slice": content,
            "target_equals_content": target == content,
        }
    slice_start, slice_stop, frame_start = window.writes
    frames = [frame_start, frame_start + slice_stop - slice_start]
    anchor_written = (
        window.anchor_frames is not None
        and frames[0] < window.anchor_frames[1]
        and (frames[1] > window.anchor_frames[0])
    )
    later = [w for w in windows if w.direction == window.direction and w.step == window.step + 1]
    next_read = [] if not later else [windows[later[0].informed_from[0]].start + later[0].informed_from[1]]
    in_direction = [w for w in windows if w.direction == window.direction]
    return {
        "window": window.index,
        "direction": window.direction,
        "i": window.step,
        "n_iters_in_direction": len(in_direction),
        "is_last_in_direction": window.step == len(in_direction) - 1,
        "slices": [window.start, window.stop],
        "informed_slice_condition": informed,
        "anchor": anchor,
        "writes": [
            {
                "result_slices": [slice_start, slice_stop],
                "window_frames": frames,
                "anchor_frame_written": anchor_written,
            }
        ],
        "next_informed_slice_read": next_read,
    }


@pytest.mark.parametrize("case", CASES, ids=[f"S{c['S']}-p{c['p']}" for c in CASES])
def test_reference_geometry_reproduces_every_case_of_the_original(case):
    S, p = case["S"], case["p"]
    windows = plan_windows(S, p, window_length=16, overlap=1, geometry="reference")
    assert sum(w.direction == "up" for w in windows) == case["upper_iters"]
    assert sum(w.direction == "down" for w in windows) == case["lower_iters"]
    assert [describe_window(w, windows) for w in windows] == case["windows"]
    provenance = [list(source) if source else None for source in final_provenance(windows, S)]
    assert provenance == case["final_provenance_window_frame"]
    assert never_written_slices(windows, S) == case["never_written_slices"]
    history = {str(k): [list(x) for x in v] for k, v in write_history(windows, S).items()}
    assert history == case["write_history_window_frame"]
    mismatched = [
        i
        for i, content in anchor_content_slices(windows).items()
        if content[0] != windows[i].anchor_target_slices()[0]
    ]
    assert mismatched == case["anchor_mismatch_windows"]
    surviving = {source[0] for source in final_provenance(windows, S) if source}
    assert [w.index for w in windows if w.index not in surviving] == case["windows_without_surviving_output"]


def test_reference_closed_form_last_upward_anchor_sits_on_the_wrong_slice():
    # From the fixture README: the last upward window's anchor is misplaced unless (S - p - 1) % 15 == 0.
    for S in range(16, 61):
        for p in range(S - 1):
            windows = plan_windows(S, p, geometry="reference")
            upward = [w for w in windows if w.direction == "up"]
            if not upward or upward[-1].anchor_frames is None:
                continue
            last = upward[-1]
            content = anchor_content_slices(windows)[last.index]
            assert (content[0] == last.start) == ((S - p - 1) % 15 == 0), (S, p)


@pytest.mark.parametrize("window_length, overlap", [(16, 1), (16, 0), (16, 4), (8, 3), (5, 1), (16, 15)])
def test_exact_geometry_generates_every_slice_once_with_anchors_in_place(window_length, overlap):
    for S in range(max(16, window_length), 61):
        for p in range(S):
            windows = plan_windows(S, p, window_length, overlap, geometry="exact")
            counts = [0] * S
            for window in windows:
                assert 0 <= window.start and window.stop <= S and window.stop - window.start == window_length
                slice_start, slice_stop, frame_start = window.writes
                # A window writes exactly the frames it did not anchor.
                assert slice_start == window.start + frame_start and slice_stop > slice_start
                anchored = set(window.anchor_target_slices())
                assert anchored.isdisjoint(range(slice_start, slice_stop))
                assert anchored | set(range(slice_start, slice_stop)) == set(range(window.start, window.stop))
                if window.index:
                    assert len(anchored) >= overlap
                for index in range(slice_start, slice_stop):
                    counts[index] += 1
            assert counts == [1] * S, (S, p)
            for index, content in anchor_content_slices(windows).items():
                assert list(content) == list(windows[index].anchor_target_slices())
            # The first window holds the start slice; later ones are informed by a slice they anchor (or a neighbour).
            assert windows[0].start <= p < windows[0].stop
            for window in windows[1:]:
                source, frame = window.informed_from
                informed = windows[source].start + frame
                if window.anchor_frames is not None:
                    assert informed in window.anchor_target_slices()
                else:  # overlap 0: the neighbouring slice
                    assert informed in (window.start - 1, window.stop)


def test_exact_geometry_example():
    windows = plan_windows(37, 10, geometry="exact")
    assert [(w.direction, w.start, w.stop, w.anchor_frames, w.writes) for w in windows] == [
        ("up", 10, 26, None, (10, 26, 0)),
        ("up", 21, 37, (0, 5), (26, 37, 5)),
        ("down", 0, 16, (10, 16), (0, 10, 0)),
    ]


@pytest.mark.parametrize("geometry", ["exact", "reference"])
def test_volumes_shorter_than_one_window_are_rejected(geometry):
    with pytest.raises(ValueError, match="fewer than one window"):
        plan_windows(15, 3, geometry=geometry)
    with pytest.raises(ValueError, match="start_slice"):
        plan_windows(20, 20, geometry=geometry)
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(20, 3, overlap=16, geometry=geometry)
    with pytest.raises(ValueError, match="geometry"):
        plan_windows(20, 3, geometry="nearest")

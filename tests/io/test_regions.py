"""Region lookup by name, alias and class id, including class ids typed as text (the command line's `--region 1`)."""

import pytest

from meddiffusers.io import RegionRegistry, meddiffusion_regions

DEMO_LIKE = RegionRegistry(
    [
        {"name": "MRBrainT1", "class_id": 0, "aliases": ["MRBrain", "BrainT1"], "volume_size": [32, 64, 64]},
        {"name": "CTChestAbdomen", "class_id": 1, "aliases": ["CTChest"], "volume_size": [32, 64, 64]},
    ]
)


@pytest.mark.parametrize("query", [1, "1", " 1 ", "CTChest", "ct-chest", "CTChestAbdomen"])
def test_names_aliases_and_class_ids_as_int_or_text_resolve(query):
    assert DEMO_LIKE.resolve(query).name == "CTChestAbdomen"


def test_digit_strings_are_class_ids_of_the_released_classes():
    registry = meddiffusion_regions()
    assert registry.resolve("3").name == "MRBrainT1" and registry.resolve("2").name == "CTLowerLimb"


def test_a_region_named_by_digits_wins_over_the_class_id():
    registry = RegionRegistry([{"name": "A", "class_id": 0, "aliases": ["1"]}, {"name": "B", "class_id": 1}])
    assert registry.resolve("1").name == "A" and registry.resolve(1).name == "B"


@pytest.mark.parametrize("query", ["2", "-1", "1.0", 2, True, "Liver"])
def test_unknown_regions_list_the_valid_ones(query):
    with pytest.raises(
        ValueError, match=r"Unknown region .*Valid regions are 0: MRBrainT1 \(also: MRBrain, BrainT1\)"
    ):
        DEMO_LIKE.resolve(query)

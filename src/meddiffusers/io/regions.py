"""Anatomy / modality classes ("regions") of class-conditional models, kept as data in saved configurations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .intensity import HUWindow


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


@dataclass(frozen=True)
class Region:
    """One class of a class-conditional volume model.

    Args:
        name: Canonical name (e.g. `"MRBrainT1"`).
        class_id: Index the model was trained with.
        aliases: Other accepted names; matching ignores case, spaces and punctuation.
        volume_size: Default generated volume size `(D, H, W)` in voxels (tensor order: z, x, y of the NIfTI).
        spacing: Voxel spacing in millimetres for `volume_size`, tensor order `(D, H, W)`.
        other_sizes: Further `(volume_size, spacing)` pairs the model was trained at.
        description: Human-readable description.
        intensity_window: `(low, high)` scanner values (HU for CT) mapped to the model's `[-1, 1]`, for models
            trained on a fixed window (MedDiff-FM); `None` where intensities were scaled per volume.
    """

    name: str
    class_id: int
    aliases: tuple[str, ...] = ()
    volume_size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    other_sizes: tuple = field(default=())
    description: str = ""
    intensity_window: tuple[float, float] | None = None

    def spacing_for(self, volume_size) -> tuple[float, float, float]:
        """Spacing recorded for `volume_size` (the default spacing for sizes the model was not trained at)."""
        for size, spacing in self.other_sizes:
            if tuple(size) == tuple(volume_size):
                return tuple(spacing)
        return self.spacing

    def hu_window(self) -> HUWindow:
        """The region's HU window (HU ↔ `[-1, 1]`); a `ValueError` when it has none."""
        if self.intensity_window is None:
            raise ValueError(f"Region {self.name!r} has no `intensity_window`; add one to the pipeline's regions.")
        return HUWindow(*self.intensity_window)

    def to_dict(self) -> dict:
        """JSON-ready form, as saved in `model_index.json`."""
        data = {
            "name": self.name,
            "class_id": self.class_id,
            "aliases": list(self.aliases),
            "volume_size": list(self.volume_size) if self.volume_size else None,
            "spacing": list(self.spacing),
            "other_sizes": [[list(size), list(spacing)] for size, spacing in self.other_sizes],
            "description": self.description,
        }
        if self.intensity_window is not None:  # only where set, so configs of other models keep their keys
            data["intensity_window"] = list(self.intensity_window)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Region:
        """Inverse of [`~Region.to_dict`]."""
        return cls(
            name=data["name"],
            class_id=int(data["class_id"]),
            aliases=tuple(data.get("aliases") or ()),
            volume_size=tuple(data["volume_size"]) if data.get("volume_size") else None,
            spacing=tuple(data.get("spacing") or (1.0, 1.0, 1.0)),
            other_sizes=tuple((tuple(s), tuple(p)) for s, p in data.get("other_sizes") or ()),
            description=data.get("description", ""),
            intensity_window=tuple(data["intensity_window"]) if data.get("intensity_window") else None,
        )


class RegionRegistry:
    """Name → class lookup for a class-conditional model.

    Args:
        regions: `Region`s or their dict form.
    """

    def __init__(self, regions):
        self.regions = [r if isinstance(r, Region) else Region.from_dict(r) for r in regions]
        self._lookup: dict[str, Region] = {}
        for region in self.regions:
            for name in (region.name, *region.aliases):
                key = _normalise(name)
                if key in self._lookup and self._lookup[key] is not region:
                    raise ValueError(f"Region name {name!r} is used by two classes.")
                self._lookup[key] = region

    @property
    def names(self) -> list[str]:
        """Canonical names in class-id order."""
        return [region.name for region in sorted(self.regions, key=lambda r: r.class_id)]

    def describe(self) -> str:
        """One line per region with its aliases, for error messages and `--help`."""
        lines = []
        for region in sorted(self.regions, key=lambda r: r.class_id):
            aliases = f" (also: {', '.join(region.aliases)})" if region.aliases else ""
            lines.append(f"{region.class_id}: {region.name}{aliases}")
        return "; ".join(lines)

    def resolve(self, region: str | int | Region) -> Region:
        """The region for a name, alias or class id; a `ValueError` lists the valid names otherwise.

        A string of digits that is not a region's name (e.g. `"1"` from a command line) is read as a class id.
        """
        if isinstance(region, Region):
            return region
        if isinstance(region, str) and _normalise(region) in self._lookup:
            return self._lookup[_normalise(region)]
        class_id = region.strip() if isinstance(region, str) else region
        if isinstance(class_id, str) and class_id.isdecimal():
            class_id = int(class_id)
        if isinstance(class_id, int) and not isinstance(class_id, bool):
            for candidate in self.regions:
                if candidate.class_id == class_id:
                    return candidate
        raise ValueError(f"Unknown region {region!r}. Valid regions are {self.describe()}.")

    def to_config(self) -> list[dict]:
        """List of region dicts to save with a pipeline."""
        return [region.to_dict() for region in sorted(self.regions, key=lambda r: r.class_id)]

    def __len__(self) -> int:
        return len(self.regions)


def meddiffusion_regions() -> RegionRegistry:
    """The seven classes of the released 3D MedDiffusion models, answering to the paper's and the code's names.

    Sizes and spacings are those of the original generation scripts (the first listed is the default).
    """
    return RegionRegistry(
        [
            Region(
                "CTHeadNeck",
                0,
                ("CTHeadAndNeck", "HeadNeckCT", "CTHead"),
                (256, 256, 256),
                (1.0, 1.0, 1.0),
                (((128, 256, 256), (1.0, 1.0, 1.0)),),
                "CT of the head and neck",
            ),
            Region(
                "CTChestAbdomen",
                1,
                ("CTChestAndAbdomen", "CTChest", "CTAbdomen", "CTThoraxAbdomen"),
                (256, 256, 256),
                (1.25, 1.25, 1.25),
                (((512, 512, 512), (1.0, 0.7, 0.7)),),
                "CT of the chest and abdomen",
            ),
            Region(
                "CTLowerLimb",
                2,
                ("CTLegs", "CTLowerLimbs", "CTLeg"),
                (256, 256, 256),
                (1.25, 1.25, 1.25),
                (((512, 256, 256), (1.25, 1.25, 1.25)),),
                "CT of the lower limbs",
            ),
            Region(
                "MRBrainT1",
                3,
                ("MRBrain", "MRTIBrain", "MRT1Brain", "MRIBrainT1", "BrainT1"),
                (192, 192, 192),
                (1.0, 1.0, 1.0),
                (),
                "T1-weighted brain MRI",
            ),
            Region(
                "MRBrainT2",
                4,
                ("MRT2Brain", "MRIBrainT2", "BrainT2"),
                (192, 192, 192),
                (1.0, 1.0, 1.0),
                (),
                "T2-weighted brain MRI",
            ),
            Region("MRAbdomen", 5, ("MRBody", "MRIAbdomen"), (128, 256, 256), (2.0, 1.2, 1.2), (), "abdominal MRI"),
            Region("MRKnee", 6, ("MRIKnee",), (64, 320, 320), (1.0, 1.0, 1.0), (), "knee MRI"),
        ]
    )


def meddiff_fm_regions() -> RegionRegistry:
    """MedDiff-FM's three CT regions, 1 mm voxels, with the paper's HU windows (level / width 50 / 400 head and
    neck, -500 / 1800 chest, 60 / 360 abdomen). The default size is one 128³ window."""
    window = (128, 128, 128)
    return RegionRegistry(
        [
            Region(
                "HeadNeck",
                0,
                ("HaN", "HeadAndNeck", "CTHeadNeck"),
                window,
                (1.0, 1.0, 1.0),
                (),
                "CT of the head and neck",
                (-150.0, 250.0),
            ),  # fmt: skip
            Region(
                "Chest", 1, ("CTChest", "Thorax"), window, (1.0, 1.0, 1.0), (), "CT of the chest", (-1400.0, 400.0)
            ),  # fmt: skip
            Region(
                "Abdomen", 2, ("CTAbdomen",), window, (1.0, 1.0, 1.0), (), "CT of the abdomen", (-120.0, 240.0)
            ),  # fmt: skip
        ]
    )

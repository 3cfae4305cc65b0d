"""The run report: what was done, how fast, on what (``report.json`` and one summary line)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Report:
    """Figures of one refocusing run."""

    input_path: str
    """The slide."""
    output_path: str
    """The OME-Zarr store."""
    shape_cyx: tuple[int, int, int]
    """Slide size: channels, height, width in pixels."""
    mpp: float
    """Pixel size of level 0 in micrometres."""
    area_mm2: float
    """Area of the whole slide level 0."""
    tissue_mm2: float
    """Area of the tiles that touch tissue (what the model processed), without overlaps."""
    tiles_run: int
    """Tiles that went through the model."""
    tiles_skipped: int
    """Background tiles passed through unchanged."""
    seconds: float
    """Wall time of the run, from opening the slide to the completion record."""
    model_seconds: float
    """Wall time of level 0 (reading, inference, blending, writing)."""
    pyramid_seconds: float
    """Wall time of the downsampled levels."""
    device: str
    """``--device`` as asked."""
    provider: str
    """ONNX Runtime execution provider used."""
    model_name: str
    """Model name from its card."""
    model_sha256: str
    """SHA-256 of the ONNX file."""
    tile_px: int
    """Tile edge."""
    overlap_px: int
    """Tile overlap."""
    workers: int
    """Dask worker threads (local scheduler) or cluster threads."""
    ort_threads: int
    """ONNX Runtime intra-op threads per session."""
    scheduler: str
    """``"threads"`` or the address of a distributed scheduler."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (levels, chunk size)."""

    @property
    def s_per_mm2(self) -> float:
        """Seconds per square millimetre of the whole slide."""
        return self.seconds / self.area_mm2 if self.area_mm2 > 0 else float("nan")

    @property
    def s_per_mm2_tissue(self) -> float:
        """Seconds per square millimetre of tissue."""
        return self.seconds / self.tissue_mm2 if self.tissue_mm2 > 0 else float("nan")

    @property
    def tiles_per_s(self) -> float:
        """Model tiles per second over the whole run."""
        return self.tiles_run / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, derived figures included."""
        values = asdict(self)
        values["shape_cyx"] = list(self.shape_cyx)
        values["s_per_mm2"] = _finite(self.s_per_mm2)
        values["s_per_mm2_tissue"] = _finite(self.s_per_mm2_tissue)
        values["tiles_per_s"] = _finite(self.tiles_per_s)
        return values

    @classmethod
    def read(cls, path: str | Path) -> Report:
        """Load a report written by :meth:`write` (derived figures are recomputed).

        Raises
        ------
        OutputError
            The file is missing or is not a report.
        """
        from wsi_deepr.errors import OutputError

        names = {f.name for f in fields(cls)}
        try:
            values = json.loads(Path(path).read_text())
            kept = {k: v for k, v in values.items() if k in names}
            kept["shape_cyx"] = tuple(kept["shape_cyx"])
            return cls(**kept)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OutputError(path, f"is not a readable run report: {exc}") from exc

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON and return the path."""
        target = Path(path)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return target

    def summary(self) -> str:
        """One line for the terminal."""
        _, h, w = self.shape_cyx
        tissue_rate = (
            f"{self.s_per_mm2_tissue:.2f} s/mm2 of tissue" if self.tissue_mm2 > 0 else "no tissue"
        )
        return (
            f"refocused {w}x{h} px ({self.area_mm2:.2f} mm2, tissue {self.tissue_mm2:.2f} mm2) "
            f"in {self.seconds:.1f} s: {self.s_per_mm2:.2f} s/mm2 ({tissue_rate}), "
            f"{self.tiles_run} tiles run, "
            f"{self.tiles_skipped} skipped, {self.tiles_per_s:.2f} tiles/s, "
            f"{self.provider.removesuffix('ExecutionProvider')}, model {self.model_name} "
            f"-> {self.output_path}"
        )


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None

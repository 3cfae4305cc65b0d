"""Where in-focus tissue and uniform defocus fall on the focus score (the default threshold).

For each real in-focus H&E image (CMU-1-Small-Region and the OpenSlide OME-TIFF crops in
``../shared/data``, each at its own pixel size), the whole image is blurred at uniform
defocus ``z`` with :func:`wsi_deepr.physics.defocus_image` (NA 0.75, Köhler illumination
with a condenser at 2/3 of it, in linear light), and every tissue
cell is scored against the *sharp* image's reference (as on a slide where that tissue is
the in-focus majority). Prints, per image and ``z``, the median score and the share of
cells flagged at the default threshold (score below ``-DEFAULT_BLUR_STOPS``).

    python pipelines/calibrate_focus.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dask.array as da
import numpy as np

from wsi_deepr import physics
from wsi_deepr.focus import DEFAULT_BLUR_STOPS, focus_map
from wsi_deepr.pairs import linear_to_srgb, srgb_to_linear
from wsi_deepr.readers import open_slide
from wsi_deepr.spectra import scan_slide
from wsi_deepr.tissue import tissue_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGES = [
    DATA / "wsi" / "CMU-1-Small-Region.svs",
    DATA / "he" / "openslide_crops" / "OS-1-detail.ome.tif",
    DATA / "he" / "openslide_crops" / "OS-2-ndpi.ome.tif",
    DATA / "he" / "openslide_crops" / "OS-2-vsi.ome.tif",
]
Z_UM = (0.0, 1.0, 1.5, 2.0, 3.0)
NA = 0.75


def main() -> None:
    print(f"flagged = share of tissue cells scoring below -{DEFAULT_BLUR_STOPS} stops")
    print(f"{'image':28s} {'mpp':>6s} " + " ".join(f"{f'z={z:g}':>15s}" for z in Z_UM))
    for path in IMAGES:
        if not path.exists():
            print(f"{path.name}: absent, skipped")
            continue
        slide = open_slide(path)
        sharp = np.asarray(slide.data.compute())[:3].astype(np.float32) / 255.0
        mask = tissue_mask(slide)
        reference = focus_map(scan_slide(slide, mask, coarse_spectra=False))
        optics = physics.scanner_optics(NA, slide.mpp)
        linear = srgb_to_linear(sharp)
        cells = []
        for z in Z_UM:
            image = (
                sharp if z == 0 else linear_to_srgb(physics.defocus_image(linear, z, optics=optics))
            )
            u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
            blurred = dataclasses.replace(slide, data=da.from_array(u8, chunks=(3, 1024, 1024)))
            spectra = scan_slide(blurred, mask, coarse_spectra=False)
            fmap = focus_map(spectra, reference_log2=reference.reference_log2)
            score = fmap.score[reference.judged & fmap.judged]
            flagged = float((score < -DEFAULT_BLUR_STOPS).mean())
            cells.append(f"{np.median(score):+6.2f} {100 * flagged:5.1f}%")
        print(f"{path.name:28s} {slide.mpp:6.3f} " + " ".join(f"{c:>15s}" for c in cells))
    print("each cell: median score (stops), flagged share")


if __name__ == "__main__":
    main()

"""File formats: recorded ultrasound in (PLUS MetaImage / NRRD sequences, images, arrays), the
segmentation sequence out. No torch needed (tensors passed in are copied to the host).

One module per format: `common` (data classes, geometry conventions), `metaimage`, `nrrd`, `arrays`
(``.npy`` and in-memory arrays), `sequence` (`read_sequence` dispatch, intensity mapping, PLUS per-frame
fields, `write_image`), `segmentation` (the segmentation sequence). Import the public API from here.
"""

from UltramotionIGTLib.io.common import LPS_TO_RAS, SegmentationSequence, SegmentInfo, UltrasoundSequence
from UltramotionIGTLib.io.segmentation import (
    MAX_LABEL_VALUE,
    SegmentationSequenceWriter,
    default_segments,
    read_segmentation_sequence,
    write_segmentation_sequence,
)
from UltramotionIGTLib.io.sequence import (
    BT601_WEIGHTS,
    FORMAT_READERS,
    luminance,
    read_sequence,
    reader_for,
    stated_window,
    to_uint8,
    write_image,
)

__all__ = [
    "BT601_WEIGHTS",
    "MAX_LABEL_VALUE",
    "SegmentationSequenceWriter",
    "FORMAT_READERS",
    "LPS_TO_RAS",
    "SegmentInfo",
    "SegmentationSequence",
    "UltrasoundSequence",
    "default_segments",
    "luminance",
    "read_segmentation_sequence",
    "read_sequence",
    "reader_for",
    "stated_window",
    "to_uint8",
    "write_image",
    "write_segmentation_sequence",
]

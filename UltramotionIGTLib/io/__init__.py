"""File formats: recorded ultrasound in (PLUS MetaImage / NRRD sequences, images, arrays), the
segmentation sequence out. No torch needed.

Import the public API from here (`read_sequence`, `write_segmentation_sequence`, ...).
"""

from UltramotionIGTLib.io.sequence import (
    BT601_WEIGHTS,
    FORMAT_READERS,
    LPS_TO_RAS,
    SegmentationSequence,
    SegmentInfo,
    UltrasoundSequence,
    default_segments,
    luminance,
    read_segmentation_sequence,
    read_sequence,
    reader_for,
    to_uint8,
    write_image,
    write_segmentation_sequence,
)

__all__ = [
    "BT601_WEIGHTS",
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
    "to_uint8",
    "write_image",
    "write_segmentation_sequence",
]

"""The Slicer bridge: the only code that touches MRML. Qt-free; imports ``slicer`` lazily, so it runs
unchanged inside 3D Slicer and against ``slicer-core`` in the tests.

- `mrml`: volume node -> frame + IJK-to-RAS geometry; results -> segmentation node / target points;
- `sessions`: `LiveSession` (newest frame of a live volume) and `ReplaySession` (every frame of a
  sequence);
- `indicators`: the KPI panel text, status light and the one-line summary.
"""

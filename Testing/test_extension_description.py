"""UltramotionIGT.json and the top-level CMakeLists.txt pass the Extensions Index's checks.

3D Slicer's Extensions Index checks a submitted extension description with its
``scripts/check_description_files.py``: the JSON against the schema its ``$schema`` names, the
category, ``scm_url`` (scheme; a repository name containing "Slicer"), the repository's top-level
CMakeLists.txt (``project()`` name = description file name; ``EXTENSION_ICONURL`` and
``EXTENSION_SCREENSHOTURLS`` are http(s) URLs of images) and a licence file at the repository root.
The same checks run here, offline: the schema is read from Testing/data/ (its ``$id`` is the
``$schema`` URL), and each image URL must name a PNG file of this repository (they are raw URLs of
its main branch), where the index would download it.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = REPO / "UltramotionIGT.json"
SCHEMA = REPO / "Testing" / "data" / "slicer-extension-catalog-entry-schema-v1.0.1.json"
SCREENSHOT = REPO / "Resources" / "Screenshots" / "UltramotionIGT_panel.png"
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")


@pytest.fixture(scope="module")
def description() -> dict:
    return json.loads(DESCRIPTION.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cmake() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8")


def cmake_value(cmake: str, name: str) -> str:
    match = re.search(rf'set\s*\({name}\s*"([^"]+)"[ ]*\)', cmake, re.IGNORECASE | re.MULTILINE)
    assert match, f"no quoted set({name} ...) in CMakeLists.txt"
    return match.group(1)


def test_description_is_valid_against_the_catalog_schema(description):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert description["$schema"].split("#")[0] == schema["$id"].split("#")[0]
    jsonschema.validate(description, schema)
    # and the schema does reject what it must (it is not vacuous)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**description, "homepage": "https://example.org"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in description.items() if k != "scm_url"}, schema)


def test_category_and_dependencies_agree_with_cmake(description, cmake):
    assert description["category"] == cmake_value(cmake, "EXTENSION_CATEGORY") == "Ultrasound"
    assert description["build_dependencies"] == cmake_value(cmake, "EXTENSION_DEPENDS").split() == ["PyTorch"]


def test_scm_url_and_repository_name(description, cmake):
    url = urllib.parse.urlsplit(description["scm_url"])
    assert url.scheme in ("git", "https")
    repository = Path(url.path).stem
    assert "slicer" in repository.lower(), "the index asks for a repository named Slicer<Name>"
    homepage = cmake_value(cmake, "EXTENSION_HOMEPAGE")
    assert description["scm_url"].removesuffix(".git") == homepage


def test_cmake_project_name_is_the_extension_name(cmake):
    names = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", cmake, re.IGNORECASE | re.MULTILINE)
    assert names and names[0] == DESCRIPTION.stem == "UltramotionIGT"


def test_icon_and_screenshot_urls_are_png_files_of_this_repository(description, cmake):
    from PIL import Image

    icon = cmake_value(cmake, "EXTENSION_ICONURL")
    match = re.search(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake, re.IGNORECASE | re.MULTILINE)
    assert match, "EXTENSION_SCREENSHOTURLS"
    screenshots = match.group(1).split()
    assert screenshots == [
        "https://raw.githubusercontent.com/ultramotion-igt/SlicerUltramotionIGT/main/"
        + SCREENSHOT.relative_to(REPO).as_posix()
    ]
    org_repo = urllib.parse.urlsplit(description["scm_url"]).path.removesuffix(".git").strip("/")
    for url in [icon, *screenshots]:
        prefix = f"https://raw.githubusercontent.com/{org_repo}/{description['scm_revision']}/"
        assert url.startswith(prefix), url
        path = REPO / url.removeprefix(prefix)
        assert path.is_file(), f"{url}: {path.relative_to(REPO)} is not in the repository"
        with Image.open(path) as image:
            assert image.format == "PNG", url


def test_licence_file_at_the_repository_root():
    found = [name for name in LICENSE_NAMES if (REPO / name).is_file()]
    assert found == ["LICENSE"]
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License")
    assert 'license = "BSD-3-Clause"' in (REPO / "pyproject.toml").read_text(encoding="utf-8")

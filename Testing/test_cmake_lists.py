"""What the extension's CMake lists and what is on disk agree, both ways.

Slicer's scripted-module macro (and ctkMacroCompilePythonScript under it) ships only the files it
is given: a .py added to the library but not to CMakeLists.txt works in a checkout and is missing
from the installed extension. These tests read the CMake files (no CMake or Slicer needed).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = REPO / "CMakeLists.txt"
MODULE_DIR = REPO / "UltramotionIGT"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TESTING_CMAKE = MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt"
LIB_DIR = REPO / "UltramotionIGTLib"


def strip_comments(text: str) -> str:
    out = []
    for line in text.splitlines():
        in_quote = False
        cut = len(line)
        for i, ch in enumerate(line):
            if ch == '"':
                in_quote = not in_quote
            elif ch == "#" and not in_quote:
                cut = i
                break
        out.append(line[:cut])
    return "\n".join(out)


def commands(text: str, name: str) -> list[list[str]]:
    """Arguments of every ``name(...)`` call (parentheses only inside quoted arguments in these files)."""
    found = []
    pattern = rf'\b{name}\s*\(((?:"[^"]*"|[^")])*)\)'
    for match in re.finditer(pattern, strip_comments(text), flags=re.IGNORECASE):
        found.append(re.findall(r'"[^"]*"|[^\s"]+', match.group(1)))
    return found


def variables(text: str) -> dict[str, list[str]]:
    """``set(VAR a b c)`` -> {VAR: [a, b, c]} with ${VAR} references expanded (quotes removed)."""
    values: dict[str, list[str]] = {}
    for args in commands(text, "set"):
        name, items = args[0], [a.strip('"') for a in args[1:]]
        values[name] = items
    for name, items in values.items():
        values[name] = [
            re.sub(r"\$\{(\w+)\}", lambda m: " ".join(values.get(m.group(1), [m.group(0)])), item)
            for item in items
        ]
    return values


def files_under(root: Path, pattern: str = "*") -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob(pattern)
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def assert_same(listed: list[str], on_disk: set[str], what: str, where: Path) -> None:
    listed_set = set(listed)
    assert len(listed) == len(listed_set), (
        f"{what}: duplicates in {where}: {sorted(x for x in listed if listed.count(x) > 1)}"
    )
    missing = sorted(on_disk - listed_set)
    extra = sorted(listed_set - on_disk)
    assert not missing, f"{what}: on disk but not listed in {where.relative_to(REPO)} (add them): {missing}"
    assert not extra, f"{what}: listed in {where.relative_to(REPO)} but not on disk (remove them): {extra}"


@pytest.fixture(scope="module")
def top() -> str:
    return TOP.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def module_cmake() -> str:
    return MODULE_CMAKE.read_text(encoding="utf-8")


def test_extension_metadata(top):
    v = variables(top)
    assert commands(top, "project")[0] == ["UltramotionIGT"]
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert v.get(key) and all(v[key]), f"{key} is missing or empty"
    assert v["EXTENSION_CATEGORY"] == ["Ultrasound"]
    # the Extensions Index lists contributors as "Name (Affiliation)", comma-separated
    (contributors,) = v["EXTENSION_CONTRIBUTORS"]
    for contributor in contributors.split(","):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor.strip()), contributor
    assert "PyTorch" in v["EXTENSION_DEPENDS"]
    assert v["EXTENSION_HOMEPAGE"][0].startswith("https://github.com/")
    for url in v["EXTENSION_ICONURL"] + v["EXTENSION_SCREENSHOTURLS"]:
        assert url.startswith("https://"), url
    assert "placeholder" in top.lower(), "say in a comment that the GitHub organisation is a placeholder"
    assert ["UltramotionIGT"] in commands(top, "add_subdirectory")
    assert (MODULE_DIR / "CMakeLists.txt").is_file()
    assert re.search(r"include\(\$\{Slicer_USE_FILE\}\)", top)
    assert re.search(r"include\(\$\{Slicer_EXTENSION_CPACK\}\)", top)


def test_minimum_slicer_version_is_the_modules(top):
    """CMake refuses an older Slicer at configure time; the module says the same at start-up."""
    v = variables(top)
    (minimum,) = v["UltramotionIGT_MINIMUM_SLICER_VERSION"]
    module_tree = ast.parse((MODULE_DIR / "UltramotionIGT.py").read_text(encoding="utf-8"))
    (assigned,) = [
        node.value
        for node in module_tree.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "MINIMUM_SLICER_VERSION"
    ]
    assert minimum == ".".join(str(part) for part in ast.literal_eval(assigned))
    assert re.search(
        r'if\("\$\{Slicer_VERSION_MAJOR\}\.\$\{Slicer_VERSION_MINOR\}" VERSION_LESS '
        r'"\$\{UltramotionIGT_MINIMUM_SLICER_VERSION\}"\)\s*message\(FATAL_ERROR',
        strip_comments(top),
    )


def test_licence_and_readme_are_the_repositorys_and_ship(top):
    v = variables(top)
    assert v["EXTENSION_LICENSE_FILE"] == ["${CMAKE_CURRENT_SOURCE_DIR}/LICENSE"]
    assert v["EXTENSION_README_FILE"] == ["${CMAKE_CURRENT_SOURCE_DIR}/README.md"]
    assert (REPO / "LICENSE").is_file() and (REPO / "README.md").is_file()
    assert "BSD 3-Clause License" in (REPO / "LICENSE").read_text(encoding="utf-8")
    # installed beside the module and the library (the package's files, not only CPack's licence page)
    assert v["UltramotionIGT_LICENSE_FILES"] == ["LICENSE"]
    (call,) = commands(top, "ctkMacroCompilePythonScript")
    resources = call[call.index("RESOURCES") + 1]
    assert "${UltramotionIGT_LICENSE_FILES}" in resources


def test_icon_url_points_at_the_icon_in_this_repository(top):
    url = variables(top)["EXTENSION_ICONURL"][0]
    match = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$", url)
    assert match, url
    assert (REPO / match.group(1)).is_file(), (
        f"{match.group(1)} (from EXTENSION_ICONURL) is not in the repository"
    )


def _library_imports(path: Path) -> set[str]:
    """Every ``UltramotionIGTLib...`` module name a file imports, at module scope or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("UltramotionIGTLib"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("UltramotionIGTLib"))
    return names


def _module_file(name: str) -> Path | None:
    """The file of a dotted module name under the repository (None for a name that is not a module)."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_import_closure() -> set[str]:
    """Library files the Slicer module needs: what UltramotionIGT.py imports, transitively, with the
    packages that hold them."""
    todo = list(_library_imports(MODULE_DIR / "UltramotionIGT.py"))
    seen: set[Path] = set()
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _library_imports(path)
    return {p.relative_to(REPO).as_posix() for p in seen}


def test_the_library_files_the_module_imports_are_shipped_and_nothing_else(top):
    listed = variables(top)["UltramotionIGTLib_PYTHON_SCRIPTS"]
    needed = module_import_closure()
    assert {"UltramotionIGTLib/__init__.py", "UltramotionIGTLib/core/pipeline.py"} <= needed
    assert_same(listed, needed, "UltramotionIGTLib .py files the module imports", TOP)
    on_disk = {f"UltramotionIGTLib/{p}" for p in files_under(LIB_DIR, "*.py")}
    assert set(listed) <= on_disk
    tools = {"training", "benchmarks", "audit"}
    assert not [f for f in listed if tools & set(Path(f).parts)], (
        "command-line tools are not shipped to Slicer"
    )


def test_library_data_files_are_listed(top):
    listed = variables(top).get("UltramotionIGTLib_PYTHON_RESOURCES", [])
    on_disk = {f"UltramotionIGTLib/{p}" for p in files_under(LIB_DIR) if not p.endswith(".py")}
    assert_same(listed, on_disk, "UltramotionIGTLib data files", TOP)


def test_library_and_models_are_installed_beside_the_module(top):
    calls = commands(top, "ctkMacroCompilePythonScript")
    assert len(calls) == 1, "one ctkMacroCompilePythonScript call ships the library"
    args = calls[0]
    text = " ".join(args)
    assert "TARGET_NAME UltramotionIGTLib" in text
    assert "${UltramotionIGTLib_PYTHON_SCRIPTS}" in text
    assert "${UltramotionIGT_MODEL_FILES}" in text
    # the same folder as the scripted module (slicerMacroBuildScriptedModule's destination)
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text
    assert "NO_INSTALL_SUBDIR" in args
    glob = commands(top, "file")
    assert any(
        "GLOB_RECURSE" in g
        and "UltramotionIGT_MODEL_FILES" in g
        and any("Resources/Models/*" in a for a in g)
        for g in glob
    )


def test_module_scripts_and_resources_match_the_disk(module_cmake):
    v = variables(module_cmake)
    assert v["MODULE_NAME"] == ["UltramotionIGT"]
    scripts_on_disk = {p for p in files_under(MODULE_DIR, "*.py") if not p.startswith("Testing/")}
    assert_same(v["MODULE_PYTHON_SCRIPTS"], scripts_on_disk, "module .py files", MODULE_CMAKE)
    resources_on_disk = files_under(MODULE_DIR / "Resources")
    resources_on_disk = {f"Resources/{p}" for p in resources_on_disk}
    assert_same(v["MODULE_PYTHON_RESOURCES"], resources_on_disk, "module resources", MODULE_CMAKE)
    for required in ("Resources/Icons/UltramotionIGT.png", "Resources/UI/UltramotionIGT.ui"):
        assert required in v["MODULE_PYTHON_RESOURCES"]


def test_module_macro_and_tests_are_registered(module_cmake):
    macro = commands(module_cmake, "slicerMacroBuildScriptedModule")
    assert len(macro) == 1
    assert {"NAME", "SCRIPTS", "RESOURCES"} <= set(macro[0])
    assert ["SCRIPT", "${MODULE_NAME}.py"] in commands(module_cmake, "slicer_add_python_unittest")
    for sub in commands(module_cmake, "add_subdirectory"):
        assert (MODULE_DIR / sub[0] / "CMakeLists.txt").is_file(), (
            f"add_subdirectory({sub[0]}) has no CMakeLists.txt"
        )


def test_every_gui_test_script_is_registered():
    text = TESTING_CMAKE.read_text(encoding="utf-8")
    registered = [args[args.index("SCRIPT") + 1] for args in commands(text, "slicer_add_python_unittest")]
    on_disk = files_under(TESTING_CMAKE.parent, "*.py")
    assert_same(registered, on_disk, "GUI test scripts", TESTING_CMAKE)


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "UltramotionIGT.png") as icon:
        assert icon.format == "PNG"
        assert icon.size == (128, 128)

"""Family knowledge lives under ``families/``: no other module imports a named family or branches on its strings.

The shared layers reach a family only through the registry (``from .. import families``, then
``families.find`` / ``families.require`` and ``found.family.<capability>``). Checked with ``ast`` on
every ``src/vlmkit/**/*.py`` outside ``families/``:

* no import of a module under ``vlmkit.families`` (``from ..families.llava import x``,
  ``from ..families import llava``, ``import vlmkit.families.blip2``), at module level or inside a function;
* no comparison (``==``, ``!=``, ``in``, ...) with a string the families own: their names, and every
  string of their tables, READ FROM the families themselves (so a new family, backbone row or
  language-model row extends the guard without touching this file): module attributes named
  ``*ARCHITECTURES`` / ``*MODEL_TYPES`` (values, and keys and values of a mapping), the keys of the row
  tables ``ROWS`` / ``BACKBONES`` / ``LANGUAGE_MODELS`` (backbone and language-model names), and the
  architecture, model-type and class fields of each ``ROWS`` row.

There is no allow-list: a shared module that needs to know which family it holds asks the family.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
from pathlib import Path

import vlmkit
from vlmkit import families

ROOT = Path(vlmkit.__file__).parent
FAMILIES = ROOT / "families"
ROW_TABLES = ("ROWS", "BACKBONES", "LANGUAGE_MODELS")  # row name -> row: the keys are backbone / LM names
ROW_FIELDS = ("architecture", "model_type", "class")  # a row field so named holds strings configs carry


def _strings(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return {s for k, v in value.items() for s in _strings(k) | _strings(v)}
    if isinstance(value, (tuple, list, set, frozenset)):
        return {s for v in value for s in _strings(v)}
    return set()


def _family_modules(family):
    yield family
    for info in pkgutil.walk_packages(family.__path__, family.__name__ + "."):
        yield importlib.import_module(info.name)


def family_strings() -> set[str]:
    """Every string a family owns (see the module docstring), read from the registered families."""
    owned: set[str] = set(families.FAMILIES)
    for family in families.families():
        owned.add(family.NAME)
        for module in _family_modules(family):
            for attr, value in vars(module).items():
                if attr.endswith(("ARCHITECTURES", "MODEL_TYPES")):
                    owned |= _strings(value)
                if attr in ROW_TABLES and isinstance(value, dict):
                    owned |= {k for k in value if isinstance(k, str)}
                    for row in value.values():
                        if dataclasses.is_dataclass(row):
                            owned |= {s for f in dataclasses.fields(row) if any(w in f.name for w in ROW_FIELDS)
                                      for s in _strings(getattr(row, f.name))}
    return owned


def shared_files() -> list[Path]:
    return sorted(f for f in ROOT.rglob("*.py") if not f.is_relative_to(FAMILIES))


def _module_name(file: Path) -> str:
    parts = file.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_family_module(name: str) -> bool:
    """``vlmkit.families.<anything>``: a family package or one of its modules (the registry itself is allowed)."""
    return name.startswith("vlmkit.families.")


def violations(source: str, package: str, owned: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each import of a named family and each comparison with a family's string in ``source``,
    the text of a module of ``package`` (relative imports resolve from it)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"imports {a.name}") for a in node.names if _is_family_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if _is_family_module(base):
                found.append((node.lineno, f"imports {base}"))
            elif base == "vlmkit.families":  # `from ..families import llava`: a family package by name
                found += [(node.lineno, f"imports {base}.{a.name}") for a in node.names
                          if (FAMILIES / a.name / "__init__.py").is_file() or (FAMILIES / f"{a.name}.py").is_file()]
        elif isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                found += [(node.lineno, f"compares with {e.value!r}") for e in elements
                          if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in owned]
    return found


def file_violations(file: Path, owned: set[str]) -> list[str]:
    module = _module_name(file)
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    return [f"{file.relative_to(ROOT.parent.parent)}:{line}: {what}"
            for line, what in sorted(violations(file.read_text(), package, owned))]


def test_the_guard_reads_what_the_families_own():
    owned = family_strings()
    for family in families.families():
        assert family.NAME in owned
        for attr in ("ARCHITECTURES", "TRANSFORMERS_ARCHITECTURES"):
            assert set(getattr(family, attr, ())) <= owned
    assert len(shared_files()) > 50 and not any(f.is_relative_to(FAMILIES) for f in shared_files())


def test_the_guard_catches_what_it_forbids():
    """The checker on code written the ways the shared layers used to reach a family (and the allowed way)."""
    owned = family_strings()
    family = families.families()[0]
    name, architecture = family.NAME, sorted(family.ARCHITECTURES)[0]
    code = (f"from ...families.{name} import layout\n"
            f"from ... import families\n"
            f"from ...families import {name}, find\n"
            f"def f(arch, found):\n"
            f"    import vlmkit.families.{name}.tiny\n"
            f"    if arch in ('x', {architecture!r}) or found.name == {name!r}:\n"
            f"        return families.require(arch, 'gguf')\n")
    assert violations(code, "vlmkit.serve.engines", owned) == [
        (1, f"imports vlmkit.families.{name}"), (3, f"imports vlmkit.families.{name}"),
        (5, f"imports vlmkit.families.{name}.tiny"), (6, f"compares with {architecture!r}"),
        (6, f"compares with {name!r}")]
    assert violations("from .. import families\nok = families.find('x') is None\n", "vlmkit.data", owned) == []


def test_no_shared_module_imports_a_family_or_compares_its_strings():
    owned = family_strings()
    found = [v for f in shared_files() for v in file_violations(f, owned)]
    assert not found, f"{len(found)} places outside families/ that know a family:\n" + "\n".join(found)

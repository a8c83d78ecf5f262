"""The config reference, ``docs/config.md``, generated from the schema.

A field's meaning is the block of ``#`` comment lines directly above it in ``schema.py``
(a blank line detaches a comment; a comment at the end of a line is not a meaning); a
section's introduction is its dataclass docstring. Types and defaults come from the
dataclasses themselves, defaults as the loader would read them. Regenerate the file with

    python -m moepp_megatron.config.reference --write

(without ``--write`` it prints the reference). Imports only the config package: no torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Optional

from moepp_megatron.config.loader import to_yaml
from moepp_megatron.config.schema import RunConfig

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"
REGENERATE = "python -m moepp_megatron.config.reference --write"

HEADER = f"""\
# Config reference

Generated from `moepp_megatron/config/schema.py` (a field's meaning is the comment above
it there): edit the schema, not this file, and regenerate it with

    {REGENERATE}

`tests/config/test_reference.py` fails while this file is stale.

A run is described by YAML files (`configs/`) layered left to right, each of which may name
the files it extends with `base:`, then `dotted.key=value` overrides (`model.moe.tau=0.5`).
A key below is written nested in a file (`model.moe.tau` is `tau:` under `moe:` under
`model:`). Unknown keys and wrong types are errors. A default is the value when no file
and no override sets the key; the presets in `configs/` set many of them (every model
preset sets the paper's `model.moe.capacity_factor: 1.1`, for one).
"""


@dataclasses.dataclass
class Section:
    """One dataclass of the tree and where it sits: ``paths`` are its dotted keys (a list
    item's end in ``[]``; one class may sit in several lists), ``defaults`` the instance
    holding its default values (None for list items: their class defaults apply)."""

    cls: type
    paths: list[str]
    defaults: Optional[Any]


def sections(root: type = RunConfig) -> list[Section]:
    """The tree's dataclasses, depth first in field order, each once."""
    found: dict[type, Section] = {}

    def visit(cls: type, path: str, defaults: Optional[Any]) -> None:
        found[cls] = Section(cls, [path], defaults)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{path}.{f.name}" if path else f.name
            hint = hints[f.name]
            item = _list_item(hint)
            if dataclasses.is_dataclass(hint):
                visit(hint, key, None if defaults is None else getattr(defaults, f.name))
            elif item is not None and item in found:
                found[item].paths.append(key + "[]")
            elif item is not None:
                visit(item, key + "[]", None)

    visit(root, "", root())
    return list(found.values())


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines directly above the field in ``cls``'s source,
    joined into one paragraph ("" for a field without one)."""
    source = textwrap.dedent(inspect.getsource(cls))
    own_line = {}  # line number -> text of a comment that is alone on its line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and not token.line[: token.start[1]].strip():
            own_line[token.start[0]] = token.string.lstrip("#").strip()
    (class_def,) = ast.parse(source).body
    comments = {}
    for node in class_def.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines, number = [], node.lineno - 1
            while number in own_line:
                lines.insert(0, own_line[number])
                number -= 1
            comments[node.target.id] = " ".join(line for line in lines if line)
    return comments


def docstring(cls: type) -> str:
    """``cls``'s own docstring, "" when it has none (not dataclass's generated signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return inspect.cleandoc(doc)


def type_name(hint: Any) -> str:
    """A field's type as a reader of YAML sees it: ``float | null``, ``one of a, b``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(arg) for arg in args if arg is not type(None)]
        nullable = ["null"] if type(None) in args else []
        if len(names) == 1 and names[0].startswith("one of "):
            return ", ".join(names + nullable)
        return " | ".join(names + nullable)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        (item,) = args
        if dataclasses.is_dataclass(item):
            return "list[{" + ", ".join(f.name for f in dataclasses.fields(item)) + "}]"
        return f"list[{type_name(item)}]"
    return getattr(hint, "__name__", str(hint))


def default_text(section: Section, f: dataclasses.Field) -> str:
    """The field's default written as YAML, or ``required``."""
    if section.defaults is not None:
        return to_yaml(getattr(section.defaults, f.name), flow=True)
    if f.default is not dataclasses.MISSING:
        return to_yaml(f.default, flow=True)
    if f.default_factory is not dataclasses.MISSING:
        return to_yaml(f.default_factory(), flow=True)
    return "required"


def rows(section: Section) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every field that is a value, not a section."""
    hints = typing.get_type_hints(section.cls)
    comments = field_comments(section.cls)
    prefix = section.paths[0] + "." if section.paths[0] else ""
    return [
        (prefix + f.name, type_name(hints[f.name]), default_text(section, f), comments[f.name])
        for f in dataclasses.fields(section.cls)
        if not dataclasses.is_dataclass(hints[f.name])
    ]


def fields_without_meaning(root: type = RunConfig) -> list[str]:
    """Dotted keys whose field has no comment, and sections whose class has no docstring."""
    missing = []
    for section in sections(root):
        if not docstring(section.cls):
            missing.append(f"{section.paths[0] or 'top level'} ({section.cls.__name__} docstring)")
        missing += [key for key, _, _, meaning in rows(section) if not meaning]
    return missing


def reference_markdown(root: type = RunConfig) -> str:
    """The whole of ``docs/config.md``."""
    parts = [HEADER]
    for section in sections(root):
        title = ", ".join(f"`{path}`" for path in section.paths) if section.paths[0] else "Top level"
        parts.append(f"## {title}\n\n{_markdown(docstring(section.cls))}\n")
        table = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, type_, default, meaning in rows(section):
            table.append(
                f"| `{_cell(key)}` | `{_cell(type_)}` | `{_cell(default)}` | {_cell(_markdown(meaning))} |"
            )
        parts.append("\n".join(table) + "\n")
    return "\n".join(parts)


def _list_item(hint: Any) -> Optional[type]:
    """The dataclass of a ``list[SomeDataclass]`` hint, else None."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _markdown(text: str) -> str:
    """reStructuredText literals and roles (``x``, :class:`X`) as Markdown code."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Print the config reference (docs/config.md).")
    parser.add_argument("--write", action="store_true", help=f"write it to {DOC_PATH} instead")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()

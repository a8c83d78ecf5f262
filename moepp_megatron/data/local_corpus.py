"""An offline English corpus from text every CPython installation ships: what the demo (and
the tests) use instead of downloads.

Three sources, different in style so a blend of them is meaningful:
- ``reference``: the language reference and help topics (``pydoc_data.topics``);
- ``library``: docstrings of standard-library modules, classes and functions;
- ``builtins``: docstrings of the built-in functions and types and their methods.
"""

from __future__ import annotations

import builtins
import importlib
import inspect

LIBRARY_MODULES = (
    "argparse", "ast", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client",
    "inspect", "io", "itertools", "json", "logging", "multiprocessing", "os", "pathlib",
    "pickle", "random", "re", "shutil", "socket", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def python_docs_corpus() -> dict[str, list[str]]:
    """``{source name: documents}``; deterministic for a given Python version."""
    from pydoc_data.topics import topics

    return {
        "reference": [topics[name] for name in sorted(topics)],
        "library": [doc for name in LIBRARY_MODULES for doc in _docstrings(importlib.import_module(name))],
        "builtins": [doc for name in sorted(dir(builtins)) for doc in _docstrings(getattr(builtins, name), depth=1)],
    }


def _docstrings(obj, depth: int = 2) -> list[str]:
    docs = []
    doc = inspect.getdoc(obj)
    if doc and len(doc) > 40:
        docs.append(doc)
    if depth > 0 and (inspect.ismodule(obj) or inspect.isclass(obj)):
        for name, member in sorted(vars(obj).items()):
            if name.startswith("_") or not (inspect.isclass(member) or callable(member)):
                continue
            if inspect.ismodule(obj) and getattr(member, "__module__", None) != obj.__name__:
                continue
            docs.extend(_docstrings(member, depth - 1))
    return docs


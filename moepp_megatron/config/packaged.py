"""The configs that ship inside the package: presets, recipes, data mixtures, study configs.

They live in ``moepp_megatron/configs/`` (the repository's ``configs`` is a link to it), so
a wheel installed without the repository finds the same files as a checkout does, from any
working directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIGS_DIR = PACKAGE_DIR / "configs"


def find_config(path: str | Path, what: str = "config file") -> Path:
    """``path`` itself when it is a file (a relative one is taken from the working
    directory), else the packaged file it names: ``configs/recipes/strategy1.yaml`` as the
    README and the recipes write it, or a name under ``configs/`` such as
    ``moepp-0.6b-8+4e`` or ``recipes/strategy1.yaml``."""
    given = Path(path).expanduser()
    if given.is_absolute():
        tried = [given]
    else:
        named = given if given.name.endswith((".yaml", ".yml")) else Path(f"{given}.yaml")
        tried = [given, PACKAGE_DIR / given, CONFIGS_DIR / named]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    where = f"looked in {Path.cwd()} and in the package's {CONFIGS_DIR}" if len(tried) > 1 else "no such file"
    raise FileNotFoundError(f"{what} not found: {path} ({where})")

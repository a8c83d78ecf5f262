"""The study's offline corpus: Python source code and its documentation, from files this
machine already has (nothing is downloaded beyond the packages the project installs).

Sources, each a directory tree of ``.py`` files, every file one document:
- ``stdlib``: CPython's standard library (the running interpreter's, tests included);
- ``torch``: the installed torch package's Python sources;
- ``megatron``: the installed megatron-core package's Python sources;
- ``numpy``: the installed numpy package's Python sources.
``quick`` takes a few standard-library packages and megatron's transformer code instead.

Deterministic: files are read in sorted order; a file is held out for validation when the
first byte of SHA-1("source/relative/path") is below the spec's ``held_out_byte`` (3 of 256:
about 1.2% of the files), so the split does not depend on file order or count; the sentencepiece model is
trained on every n-th line of the training documents only. The same Python and package
versions (recorded in the manifest with the SHA-256 of every output) give the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import sysconfig
from pathlib import Path
from typing import Iterator

from moepp_megatron.data.train_tokenizer import train_sentencepiece

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What to build. ``sources`` maps a name to (package root, subdirectories or all)."""

    name: str
    sources: tuple[tuple[str, str, tuple[str, ...]], ...]
    vocab_size: int
    tokenizer_lines: int
    min_train_tokens: int
    held_out_byte: int = 3


def _package_dir(module: str) -> str:
    if module == "stdlib":
        return sysconfig.get_paths()["stdlib"]
    # find_spec also locates namespace packages (megatron has no __init__.py).
    return importlib.util.find_spec(module).submodule_search_locations[0]


SPECS = {
    "full": CorpusSpec(
        "full",
        (("stdlib", "stdlib", ()), ("torch", "torch", ()), ("megatron", "megatron", ()), ("numpy", "numpy", ())),
        vocab_size=8192, tokenizer_lines=400_000, min_train_tokens=20_000_000,
    ),
    "quick": CorpusSpec(
        "quick",
        (("stdlib", "stdlib", ("email", "json", "logging", "concurrent", "importlib")),
         ("megatron", "megatron", ("core/transformer",))),
        vocab_size=1024, tokenizer_lines=20_000, min_train_tokens=200_000, held_out_byte=24,
    ),
}


@dataclasses.dataclass
class Corpus:
    """A built corpus: prefixes (relative to ``directory``) and the manifest."""

    directory: Path
    tokenizer: Path
    train: dict[str, str]  # source -> indexed-dataset prefix
    valid: str
    manifest: dict


def _files(root: Path, subdirs: tuple[str, ...]) -> list[Path]:
    tops = [root / s for s in subdirs] if subdirs else [root]
    files = [p for top in tops for p in top.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def held_out(source: str, relative: str, held_out_byte: int) -> bool:
    return hashlib.sha1(f"{source}/{relative}".encode()).digest()[0] < held_out_byte


def _documents(spec: CorpusSpec) -> Iterator[tuple[str, bool, str]]:
    """(source, held out, text) for every file, in a fixed order."""
    for source, module, subdirs in spec.sources:
        root = Path(_package_dir(module))
        for path in _files(root, subdirs):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield source, held_out(source, path.relative_to(root).as_posix(), spec.held_out_byte), text


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict:
    def version(name: str):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(),
            **{name: version(name) for name in ("torch", "megatron-core", "numpy", "sentencepiece")}}


def build_corpus(spec_name: str, directory: Path, workers: int = 2) -> Corpus:
    """Build (or reuse, when its manifest matches) the corpus ``spec_name`` in ``directory``."""
    from moepp_megatron.data.preprocess import preprocess

    spec = SPECS[spec_name]
    directory = Path(directory)
    wanted = {"spec": dataclasses.asdict(spec), "versions": _versions()}
    manifest_path = directory / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == json.loads(json.dumps(wanted)):
            return _corpus(directory, spec, manifest)
        print(f"{directory}: the corpus there was built from another spec or package versions; rebuilding")

    raw = directory / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    outputs = {source: open(raw / f"train_{source}.jsonl", "w") for source, _, _ in spec.sources}
    outputs["valid"] = open(raw / "valid.jsonl", "w")
    files = {name: 0 for name in outputs}
    train_lines: list[str] = []
    try:
        for source, is_valid, text in _documents(spec):
            name = "valid" if is_valid else source
            outputs[name].write(json.dumps({"text": text}) + "\n")
            files[name] += 1
            if not is_valid:
                train_lines.extend(line for line in text.splitlines() if line.strip())
    finally:
        for output in outputs.values():
            output.close()
    step = max(1, len(train_lines) // spec.tokenizer_lines)
    print(f"corpus {spec.name}: {sum(files.values())} files; training the tokenizer on every "
          f"{step}th of {len(train_lines):,} training lines", flush=True)
    # Whitespace folded: the tokenizer of the recorded results (its SHA-256 is in the records).
    tokenizer = train_sentencepiece(
        train_lines[::step], directory / "tokenizer.model", spec.vocab_size, keep_whitespace=False
    )
    del train_lines

    summaries = {}
    for name in outputs:
        stem = f"train_{name}" if name != "valid" else "valid"
        summary = preprocess([str(raw / f"{stem}.jsonl")], directory / "data" / stem, tokenizer, workers=workers)
        summaries[name] = {"files": files[name], "documents": summary.documents, "tokens": summary.tokens,
                           "jsonl_sha256": _sha256(raw / f"{stem}.jsonl"),
                           "bin_sha256": _sha256(directory / "data" / f"{stem}.bin")}
        print(f"  {stem}: {summary.documents} documents, {summary.tokens:,} tokens", flush=True)
    train_tokens = sum(s["tokens"] for name, s in summaries.items() if name != "valid")
    if train_tokens < spec.min_train_tokens:
        raise RuntimeError(f"corpus {spec.name}: {train_tokens:,} training tokens, fewer than {spec.min_train_tokens:,}")
    manifest = {**wanted, "sources": summaries, "train_tokens": train_tokens,
                "tokenizer_sha256": _sha256(tokenizer)}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return _corpus(directory, spec, manifest)


def _corpus(directory: Path, spec: CorpusSpec, manifest: dict) -> Corpus:
    return Corpus(
        directory=directory,
        tokenizer=directory / "tokenizer.model",
        train={source: str(directory / "data" / f"train_{source}") for source, _, _ in spec.sources},
        valid=str(directory / "data" / "valid"),
        manifest=manifest,
    )

"""Weighted sources -> megatron's train / valid / test GPT datasets.

``resolve_sources`` turns ``data.mixture`` (a YAML file ``sources: [{prefix, weight}, ...]``,
see ``configs/data/``) or inline ``data.sources`` into absolute prefixes; ``check_sources``
names every missing ``.bin``/``.idx`` before anything heavy starts; ``build_gpt_datasets``
hands the blend to megatron's ``BlendedMegatronDatasetBuilder``, which splits every source
by ``data.split``, builds a ``GPTDataset`` per source and split (sample, shuffle and
document indices cached under ``data.cache_dir``) and a ``BlendedDataset`` drawing from
them in proportion to the normalised weights.

Every sample is megatron's dict: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``,
``attention_mask``, plus ``dataset_id`` (the source's position in the blend) when there is
more than one source.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from moepp_megatron.compat.megatron_internals import read_index_summary
from moepp_megatron.config.loader import from_dict
from moepp_megatron.config.packaged import find_config
from moepp_megatron.config.schema import DataConfig, DataSource
from moepp_megatron.files import sha256_of, write_durably

__all__ = ["DataFileError", "Mixture", "build_gpt_datasets", "check_sources", "resolve_sources"]

# In data.cache_dir: the SHA-256 of every index file megatron cached there.
CACHE_CHECKSUMS = "checksums.json"


@dataclass
class Mixture:
    """The content of a mixture file (``configs/data/*.yaml``)."""

    sources: list[DataSource] = field(default_factory=list)


def resolve_sources(data_cfg: DataConfig) -> list[DataSource]:
    """The blend's sources with absolute prefixes (weights as given, not normalised), the
    held-out ``data.valid_sources`` after them.

    A relative ``data.mixture`` path is taken from the working directory, else from the
    package (``configs/data/mix-s1.yaml`` is a packaged mixture, see
    :func:`~moepp_megatron.config.packaged.find_config`); relative prefixes are taken from
    ``data.root`` (itself relative to the working directory when not absolute).
    """
    if data_cfg.mixture:
        sources = _read_mixture(data_cfg.mixture)
    else:
        sources = data_cfg.sources
    if not sources:
        raise ValueError("data: no sources; set data.mixture or data.sources")
    return _absolute(data_cfg, sources) + _absolute(data_cfg, data_cfg.valid_sources)


def _absolute(data_cfg: DataConfig, sources: list[DataSource]) -> list[DataSource]:
    root = Path(data_cfg.root).expanduser()
    return [
        DataSource(prefix=os.path.abspath(root / Path(s.prefix).expanduser()), weight=s.weight)
        for s in sources
    ]


def _read_mixture(mixture: str) -> list[DataSource]:
    path = find_config(mixture, what="data.mixture")
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    return from_dict(Mixture, content, where=str(path)).sources


def _blend(sources: list[DataSource]) -> tuple[list[str], list[float] | None]:
    total = sum(s.weight for s in sources)
    # One source: no BlendedDataset around it (megatron builds one otherwise, and warns).
    return [s.prefix for s in sources], [s.weight / total for s in sources] if len(sources) > 1 else None


class DataFileError(ValueError):
    """A data file is damaged; the message names it."""


def check_sources(sources: list[DataSource]) -> list[int]:
    """The tokens of every source, after raising ``FileNotFoundError`` listing every prefix
    whose ``.bin`` or ``.idx`` is missing, then :class:`DataFileError` for every ``.idx`` that
    does not read and every ``.bin`` whose size is not the one its index describes
    (truncated, or from another run)."""
    missing = []
    for source in sources:
        absent = [s for s in (".bin", ".idx") if not os.path.isfile(source.prefix + s)]
        if absent:
            missing.append(f"  {source.prefix} (no {' or '.join(absent)})")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(sources)} data source(s) missing; run moepp-preprocess "
            "for each (see configs/data/):\n" + "\n".join(missing)
        )
    inspected = [_inspect_index(source.prefix) for source in sources]
    damaged = [problem for problem, _ in inspected if problem]
    if damaged:
        raise DataFileError(
            f"{len(damaged)} of {len(sources)} data source(s) damaged; run moepp-preprocess "
            "for each again:\n" + "\n".join(f"  {p}" for p in damaged)
        )
    return [tokens for _, tokens in inspected]


def _inspect_index(prefix: str) -> tuple[str | None, int]:
    """(what is wrong with the source or None, its tokens)."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    try:
        index = read_index_summary(idx)
    except Exception as e:  # megatron asserts on the header, numpy fails on a short file
        return f"{idx} is not a readable megatron index ({type(e).__name__}: {e})", 0
    size = os.path.getsize(bin_path)
    if size != index.bin_bytes:
        return f"{bin_path} has {size} bytes; its index {idx} describes {index.bin_bytes}", 0
    return None, index.num_tokens


def verify_index_cache(cache_dir: str | None) -> list[str]:
    """The sample / shuffle / document index files megatron caches are derived data: one that
    no longer matches the checksum recorded after it was built is deleted, so megatron builds
    it again. Call on the rank that builds them, before building; returns what was deleted."""
    recorded = _recorded_cache(cache_dir)
    deleted = [name for name, checksum in recorded.items()
               if (Path(cache_dir) / name).is_file() and sha256_of(Path(cache_dir) / name) != checksum]
    for name in deleted:
        (Path(cache_dir) / name).unlink()
        del recorded[name]
    if deleted:
        _write_cache_record(cache_dir, recorded)
    return [str(Path(cache_dir) / name) for name in deleted]


def record_index_cache(cache_dir: str | None) -> None:
    """Record the checksum of every cached index file not recorded yet (megatron just built it)."""
    if not cache_dir or not Path(cache_dir).is_dir():
        return
    recorded = _recorded_cache(cache_dir)
    new = {p.name: sha256_of(p) for p in sorted(Path(cache_dir).glob("*.npy")) if p.name not in recorded}
    if new:
        _write_cache_record(cache_dir, {**recorded, **new})


def _recorded_cache(cache_dir: str | None) -> dict:
    path = Path(cache_dir or "") / CACHE_CHECKSUMS
    if not cache_dir or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:  # a crash while writing it: every file is hashed again
        return {}


def _write_cache_record(cache_dir: str, recorded: dict) -> None:
    write_durably(Path(cache_dir) / CACHE_CHECKSUMS, json.dumps(dict(sorted(recorded.items())), indent=1))


def build_gpt_datasets(
    data_cfg: DataConfig,
    *,
    seq_length: int,
    tokenizer,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    seed: int,
    is_built_on_rank: Callable[[], bool] = lambda: True,
):
    """(train, valid, test) datasets of the blend; a split with no share in ``data.split`` is
    None.

    Call on every rank, after ``torch.distributed`` is initialised: megatron builds the
    index files on rank 0 first, then the other ranks read them from the cache. By default
    every rank gets the datasets; Megatron-LM instead passes "first or last pipeline stage
    and tensor-parallel rank 0" and broadcasts batches over the TP group (``None`` elsewhere).
    ``tokenizer`` is the object :func:`moepp_megatron.data.tokenizer.load_tokenizer` returns.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "build_gpt_datasets: initialise torch.distributed first (a single process too: "
            "megatron's dataset builder synchronises ranks through it)"
        )
    sources = resolve_sources(data_cfg)
    check_sources(sources)
    if data_cfg.valid_sources:
        held_out = len(sources) - len(data_cfg.valid_sources)  # resolve_sources puts them last
        splits = dict(blend_per_split=[_blend(sources[:held_out]), _blend(sources[held_out:]), None])
    else:
        splits = dict(blend=_blend(sources), split=data_cfg.split)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        **splits,
        path_to_cache=data_cfg.cache_dir and os.path.abspath(data_cfg.cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=data_cfg.eod_mask_loss,
    )
    sizes = [train_samples, valid_samples, test_samples]
    first = torch.distributed.get_rank() == 0
    if first:
        for path in verify_index_cache(config.path_to_cache):
            print(f"WARNING: {path} does not match its recorded checksum: deleted, megatron builds it again",
                  flush=True)
    torch.distributed.barrier()
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank, config
    ).build()
    if first:
        record_index_cache(config.path_to_cache)
    return train, valid, test

"""Reading and writing the files of a Hugging Face model directory: sharded safetensors
with ``model.safetensors.index.json``, config.json, generation_config.json and the MoE++ code
files that ``trust_remote_code=True`` loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CODE_FILES = ("configuration_moepp.py", "modeling_moepp.py")
_HF_INSTALL_HINT = "Hugging Face conversion needs transformers and safetensors: pip install 'moepp-megatron[hf]'"


def require_hf() -> None:
    """Fail early, with the install hint, when the optional HF dependencies are missing."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise ImportError(_HF_INSTALL_HINT) from err


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> list[str]:
    """Shards of at most ``max_shard_bytes`` (a tensor larger than that gets its own shard),
    named like transformers' ``model-00001-of-00003.safetensors``, plus the index."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        tensor = state[name].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model directory (sharded with an index, or one model.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = directory / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index_path}: not a safetensors index ({err})") from err
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}")
    elif (directory / SINGLE).is_file():
        files, weight_map = [SINGLE], None
    else:
        raise FileNotFoundError(f"{directory}: no {INDEX} and no {SINGLE}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            shard = load_file(str(directory / file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{directory / file}: unreadable safetensors file ({err})") from err
        state.update(shard)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ValueError(f"{index_path} lists tensors that no shard holds: {absent[:5]}")
    return state


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def copy_code_files(directory: Path) -> None:
    source = Path(__file__).resolve().parents[1] / "hf"
    for name in CODE_FILES:
        shutil.copyfile(source / name, directory / name)


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err

"""Mixture files, source checks and megatron's blended GPT datasets built from them."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.gpt_dataset import GPTDataset

from moepp_megatron.config.schema import DataConfig, DataSource
from moepp_megatron.data.blend import DataFileError, build_gpt_datasets, check_sources, resolve_sources
from moepp_megatron.data.preprocess import preprocess
from moepp_megatron.data.tokenizer import load_tokenizer
from tests.data.corpora import write_texts
from tests.distributed import run_distributed

REPO = Path(__file__).resolve().parents[2]

# The spec's section 3 table (percent): source -> (mix S1, mix S2).
SPEC_MIXTURES = {
    "redpajama/book/book_text_document": (4.24, 13.93),
    "redpajama/wikipedia/wikipedia_text_document": (3.50, 9.03),
    "redpajama/arxiv/arxiv_text_document": (4.37, 11.36),
    "redpajama/stackexchange/stackexchange_text_document": (3.19, 9.77),
    "redpajama/c4/c4_text_document": (10.94, 7.42),
    "dolma/dolma_text_document": (61.28, 41.53),
    "pile/pile_text_document": (12.48, 6.96),
}


@pytest.mark.parametrize("column, name", [(0, "mix-s1"), (1, "mix-s2")])
def test_mixture_files_match_the_spec(column, name):
    data = DataConfig(mixture=f"configs/data/{name}.yaml", root="/data")
    sources = resolve_sources(data)
    expected = {f"/data/{prefix}": weights[column] for prefix, weights in SPEC_MIXTURES.items()}
    assert {s.prefix: s.weight for s in sources} == expected
    assert sum(s.weight for s in sources) == pytest.approx(100.0)


def test_resolve_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "mixes").mkdir()
    (tmp_path / "mixes" / "m.yaml").write_text(
        "sources:\n  - {prefix: a/a_doc, weight: 2}\n  - {prefix: /abs/b_doc}\n"
    )
    monkeypatch.chdir(tmp_path)
    data = DataConfig(mixture="mixes/m.yaml", root="~/corpora")
    sources = resolve_sources(data)
    assert [(s.prefix, s.weight) for s in sources] == [
        (str(Path.home() / "corpora" / "a" / "a_doc"), 2.0),
        ("/abs/b_doc", 1.0),
    ]
    inline = DataConfig(root="data", sources=[DataSource("x_doc", 0.5)])
    assert resolve_sources(inline) == [DataSource(str(tmp_path / "data" / "x_doc"), 0.5)]


def test_packaged_mixture_from_any_directory(tmp_path, monkeypatch):
    """``configs/data/mix-s1.yaml`` as the recipes write it: a file of that name in the
    working directory wins, else the packaged one is read."""
    monkeypatch.chdir(tmp_path)
    data = DataConfig(mixture="configs/data/mix-s1.yaml", root="/data")
    assert len(resolve_sources(data)) == len(SPEC_MIXTURES)
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "mix-s1.yaml").write_text("sources:\n  - {prefix: mine}\n")
    assert resolve_sources(data) == [DataSource("/data/mine", 1.0)]


def test_mixture_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yaml").write_text("sources:\n  - {prefix: a, wieght: 2}\n")
    with pytest.raises(ValueError, match=r"m.yaml: unknown config key\(s\) sources\[0\]\.wieght"):
        resolve_sources(DataConfig(mixture="m.yaml"))
    looked = re.escape(f"data.mixture not found: nope.yaml (looked in {tmp_path} and in the package's ")
    with pytest.raises(FileNotFoundError, match=looked + r".*moepp_megatron/configs\)"):
        resolve_sources(DataConfig(mixture="nope.yaml"))
    with pytest.raises(ValueError, match="no sources"):
        resolve_sources(DataConfig())


def test_check_sources_lists_every_missing_prefix(tmp_path):
    for name in ("ok.bin", "ok.idx", "half.bin"):
        (tmp_path / name).write_bytes(b"")
    sources = [DataSource(str(tmp_path / n)) for n in ("ok", "gone", "half", "gone2")]
    with pytest.raises(FileNotFoundError) as error:
        check_sources(sources)
    message = str(error.value)
    assert message.startswith("3 of 4 data source(s) missing")
    assert f"{tmp_path / 'gone'} (no .bin or .idx)" in message
    assert f"{tmp_path / 'half'} (no .idx)" in message
    assert f"{tmp_path / 'gone2'} (no .bin or .idx)" in message
    assert f"{tmp_path / 'ok'} " not in message


# Three sources written in disjoint alphabets, so a sample shows which source it came from.
_ALPHABETS = ("abcdefghij", "0123456789", "ABCDEFGHIJ")


def _source_texts() -> list[list[str]]:
    rng = random.Random(0)
    return [
        [
            " ".join("".join(rng.choices(alphabet, k=rng.randint(2, 6))) for _ in range(8))
            for _ in range(40)
        ]
        for alphabet in _ALPHABETS
    ]


def _write_sources(directory: Path, sp_model) -> list[str]:
    prefixes = []
    for k, texts in enumerate(_source_texts()):
        raw = write_texts(directory / "raw" / f"s{k}.jsonl", texts)
        preprocess([str(raw)], directory / f"s{k}" / "doc", sp_model)
        prefixes.append(f"s{k}/doc")
    return prefixes


def _build(root, sp_model, sources, **overrides):
    data = DataConfig(
        root=str(root), sources=sources, cache_dir=str(root / "cache"), split="90,5,5", **overrides
    )
    kwargs = dict(seq_length=16, train_samples=2000, valid_samples=50, test_samples=50, seed=7)
    return build_gpt_datasets(data, tokenizer=load_tokenizer(sp_model), **kwargs)


def test_blend_honours_the_weights(tmp_path, sp_model, sp_reference, single_process):
    prefixes = _write_sources(tmp_path, sp_model)
    weights = np.array([6.0, 3.0, 1.0])  # 0.6 / 0.3 / 0.1 once normalised
    sources = [DataSource(p, w) for p, w in zip(prefixes, weights)]
    train, valid, test = _build(tmp_path, sp_model, sources)

    assert [d.dataset_path for d in train.datasets] == [str(tmp_path / p) for p in prefixes]
    counts = np.bincount(train.dataset_index, minlength=3)
    # megatron's blending is greedy on the running error: every count within 1 of its share.
    assert len(train) >= 2000
    shares = weights / weights.sum()
    assert np.abs(counts - len(train) * shares).max() <= 1.0, counts
    for split in (valid, test):
        counts = np.bincount(split.dataset_index, minlength=3)
        assert np.abs(counts - len(split) * shares).max() <= 1.0, counts

    # Every sample comes from the source it claims: its ids are that source's (EOS included)
    # and it holds some that no other source has.
    eos = load_tokenizer(sp_model).eos_id
    ids_of = [{eos} | {i for t in ts for i in sp_reference.encode(t)} for ts in _source_texts()]
    own_ids = [ids_of[k] - ids_of[k - 1] - ids_of[k - 2] for k in range(3)]
    assert all(own_ids)
    for index in range(0, len(train), 7):
        sample = train[index]
        source = int(sample["dataset_id"])
        assert source == train.dataset_index[index]
        ids = set(sample["tokens"].tolist()) | set(sample["labels"].tolist())
        assert ids <= ids_of[source] and ids & own_ids[source]


def test_held_out_valid_sources_and_data_seed(tmp_path, sp_model, single_process):
    """data.valid_sources: training reads all of its sources, validation only the held-out
    one (megatron's blend_per_split); the sample order follows the seed."""
    prefixes = _write_sources(tmp_path, sp_model)
    held_out = [DataSource(prefixes[2])]
    train, valid, test = _build(tmp_path, sp_model, [DataSource(p) for p in prefixes[:2]], valid_sources=held_out)
    assert [d.dataset_path for d in train.datasets] == [str(tmp_path / p) for p in prefixes[:2]]
    assert isinstance(valid, GPTDataset) and valid.dataset_path == str(tmp_path / prefixes[2])
    assert test is None and len(valid) >= 50
    # Whole sources, no split: every document of the training sources is in the blend.
    assert all(set(d.document_index.tolist()) == set(range(40)) for d in train.datasets)
    data = DataConfig(root=str(tmp_path), sources=[DataSource(prefixes[0])], cache_dir=str(tmp_path / "c2"),
                      split="100,0,0")
    kwargs = dict(seq_length=16, tokenizer=load_tokenizer(sp_model), train_samples=200, valid_samples=0,
                  test_samples=0)
    orders = [build_gpt_datasets(data, seed=seed, **kwargs)[0].shuffle_index.tolist() for seed in (7, 7, 8)]
    assert orders[0] == orders[1] != orders[2]


def test_samples_and_eod_mask_loss(tmp_path, sp_model, single_process):
    prefixes = _write_sources(tmp_path, sp_model)
    eos = load_tokenizer(sp_model).eos_id
    for eod_mask_loss in (False, True):
        train, _, _ = _build(
            tmp_path, sp_model, [DataSource(prefixes[0])], eod_mask_loss=eod_mask_loss
        )
        assert isinstance(train, GPTDataset)  # one source: no BlendedDataset around it
        assert len(train) >= 2000
        sample = train[3]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
        tokens, labels, loss_mask = sample["tokens"], sample["labels"], sample["loss_mask"]
        assert tokens.shape == labels.shape == loss_mask.shape == (16,)
        assert sample["attention_mask"].shape == (1, 16, 16)
        assert labels[:-1].tolist() == tokens[1:].tolist()
        assert (tokens == eos).any()
        assert loss_mask[tokens == eos].eq(0.0 if eod_mask_loss else 1.0).all()


def test_missing_sources_fail_before_building(tmp_path, sp_model, single_process):
    sources = [DataSource("nothing/here"), DataSource("nor/there")]
    with pytest.raises(FileNotFoundError, match="2 of 2") as error:
        _build(tmp_path, sp_model, sources)
    assert str(tmp_path / "nor" / "there") in str(error.value)
    assert not (tmp_path / "cache").exists()


def _build_on_rank(root: str, sp_model: str, prefixes: list[str]):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    sources = [DataSource(p, w) for p, w in zip(prefixes, (6.0, 3.0, 1.0))]
    train, valid, _ = _build(Path(root), sp_model, sources)
    return train.dataset_index.copy(), [train[i]["tokens"] for i in range(0, 2000, 97)], len(valid)


@pytest.mark.slow
def test_every_rank_builds_the_same_blend(tmp_path, sp_model):
    prefixes = _write_sources(tmp_path, sp_model)
    (rank0, rank1) = run_distributed(_build_on_rank, 2, str(tmp_path), str(sp_model), prefixes)
    assert np.array_equal(rank0[0], rank1[0])
    assert all(a.equal(b) for a, b in zip(rank0[1], rank1[1]))
    assert rank0[2] == rank1[2] > 0


def test_damaged_data_files_are_named_before_training(tmp_path, sp_model):
    prefixes = [str(tmp_path / p) for p in _write_sources(tmp_path, sp_model)]
    sources = [DataSource(p) for p in prefixes]
    check_sources(sources)
    bin_path = Path(prefixes[0] + ".bin")
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as f:
        f.truncate(size - 10)
    Path(prefixes[2] + ".idx").write_bytes(b"\xff" * 64)
    with pytest.raises(DataFileError) as error:
        check_sources(sources)
    message = str(error.value)
    assert message.startswith("2 of 3 data source(s) damaged; run moepp-preprocess")
    assert f"{bin_path} has {size - 10} bytes; its index {prefixes[0]}.idx describes {size}" in message
    assert f"{prefixes[2]}.idx is not a readable megatron index" in message


def test_damaged_index_cache_is_rebuilt(tmp_path, sp_model, single_process, capsys):
    """megatron's cached sample / shuffle indices with overwritten bytes (same size) would give
    wrong samples or 'offset must be non-negative' at read time: their checksums catch it,
    and megatron builds them again."""
    sources = [DataSource(p) for p in _write_sources(tmp_path, sp_model)[:1]]
    first = _build(tmp_path, sp_model, sources)[0]
    samples = [first[i]["tokens"].tolist() for i in range(0, 2000, 97)]
    cached = sorted((tmp_path / "cache").glob("*sample_index.npy"))[0]
    with open(cached, "r+b") as f:
        f.seek(cached.stat().st_size - 64)
        f.write(b"\xff" * 64)
    capsys.readouterr()
    again = _build(tmp_path, sp_model, sources)[0]
    assert f"WARNING: {cached} does not match its recorded checksum" in capsys.readouterr().out
    assert [again[i]["tokens"].tolist() for i in range(0, 2000, 97)] == samples

"""LM data (compt.paradigms.lm.data): corpora, the split, the token cache, deterministic batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compt.config import ConfigError, from_dict
from compt.engine.loader import DataError
from compt.paradigms.lm.data import (
    LMDataConfig,
    TokenLoader,
    TokenWindows,
    eval_windows,
    is_validation,
    prepare_data,
    read_documents,
)
from compt.paradigms.lm.tokenizer import eos_id


def _folder(tmp_path, n_txt=40):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(n_txt):
        (root / "sub" / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox " * (5 + i))
    lines = [json.dumps({"text": f"line {i} jumps over the lazy dog"}) for i in range(20)]
    (root / "more.jsonl").write_text("\n".join([*lines, "{not json", json.dumps({"txt": "x"}), ""]))
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "tests").mkdir()
    (root / "tests" / "skipped.txt").write_text("never read")
    return root


def test_stdlib_corpus_is_the_standard_library_without_tests():
    docs, skips = read_documents(LMDataConfig())
    keys = [k for k, _ in docs]
    assert keys == sorted(keys) and len(docs) > 300 and skips == {}
    assert "os.py" in keys and "json/decoder.py" in keys
    for k in keys:
        parts = k.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), k
    assert sum(len(t.encode()) for _, t in docs) > 5e6
    held = [k for k in keys if is_validation(k, 0.05)]
    assert 0.02 < len(held) / len(keys) < 0.1


def test_split_is_by_document_key_and_stable():
    keys = [f"file{i}.py" for i in range(2000)]
    val = {k for k in keys if is_validation(k, 0.1)}
    assert 150 < len(val) < 250
    assert val == {k for k in reversed(keys) if is_validation(k, 0.1)}  # order does not matter
    assert val <= {k for k in keys if is_validation(k, 0.2)}  # a larger fraction only adds documents


def test_text_folder_reads_txt_and_jsonl_and_counts_skips(tmp_path):
    cfg = LMDataConfig(source="text", path=str(_folder(tmp_path)))
    docs, skips = read_documents(cfg)
    keys = [k for k, _ in docs]
    assert len(docs) == 40 + 20 and "more.jsonl:1" in keys and "sub/doc00.txt" in keys
    assert not any(k.startswith("tests/") for k in keys)
    assert skips == {"bad_jsonl_line": 2, "not_utf8": 1}
    with pytest.raises(DataError, match="skipped 3: .* more than data.max_skips=2"):
        read_documents(LMDataConfig(source="text", path=cfg.path, max_skips=2))


def test_prepare_caches_tokenizer_and_streams(tmp_path):
    cfg = LMDataConfig(
        source="text", path=str(_folder(tmp_path)), vocab_size=300, val_fraction=0.2, seq_len=8
    )
    cache = tmp_path / "run" / "data"
    data = prepare_data(cfg, cache)
    assert data.tokenizer.get_vocab_size() == 300 and data.documents["train"] + data.documents["val"] == 60
    eos = eos_id(data.tokenizer)
    assert int((data.train == eos).sum()) == data.documents["train"] and data.train[-1] == eos
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert set(files) == {"tokenizer.json", "train.bin", "val.bin", "tokens.json"}
    again = prepare_data(cfg, cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == files  # nothing re-made
    assert isinstance(again.train, np.memmap) and np.array_equal(again.train, data.train)
    text = data.tokenizer.decode(data.val[: int(np.flatnonzero(data.val == eos)[0])].tolist())
    assert text in {t for _, t in read_documents(cfg)[0]}


def test_a_cached_tokenizer_is_reused_even_when_the_corpus_changes(tmp_path, caplog):
    root = _folder(tmp_path)
    cfg = LMDataConfig(source="text", path=str(root), vocab_size=300, val_fraction=0.2)
    cache = tmp_path / "data"
    first = prepare_data(cfg, cache)
    (root / "sub" / "new.txt").write_text("zebra " * 50)
    second = prepare_data(cfg, cache)
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert len(second.train) + len(second.val) > len(first.train) + len(first.val)  # streams re-encoded
    with caplog.at_level("WARNING", logger="compt.data"):
        third = prepare_data(LMDataConfig(source="text", path=str(root), tokenizer="byte"), cache)
    assert third.tokenizer.get_vocab_size() == 300 and "reusing the run's 300-token tokenizer" in caplog.text


def test_byte_tokenizer_source(tmp_path):
    cfg = LMDataConfig(source="text", path=str(_folder(tmp_path)), tokenizer="byte", val_fraction=0.2)
    data = prepare_data(cfg, tmp_path / "data")
    assert data.tokenizer.get_vocab_size() == 257
    assert int(data.token_bytes[data.train].sum()) == sum(
        len(t.encode()) for k, t in read_documents(cfg)[0] if not is_validation(k, 0.2)
    )


def test_token_files_are_memory_mapped(tmp_path):
    for name, n in (("train.bin", 1000), ("val.bin", 100)):
        np.arange(n, dtype=np.uint32).tofile(tmp_path / name)
    data = prepare_data(
        LMDataConfig(source="tokens", path=str(tmp_path), tokenizer="none", token_dtype="uint32"), "x"
    )
    assert isinstance(data.train, np.memmap) and data.train[999] == 999 and data.tokenizer is None
    (tmp_path / "val.bin").write_bytes(b"\0" * 7)
    with pytest.raises(DataError, match="7 bytes is not a whole number of uint32 ids"):
        prepare_data(
            LMDataConfig(source="tokens", path=str(tmp_path), tokenizer="none", token_dtype="uint32"), "x"
        )


def test_windows_overlap_by_one_token_and_batches_are_deterministic():
    stream = np.arange(1001, dtype=np.uint16)
    windows = TokenWindows(stream, seq_len=10)
    assert len(windows) == 100 and windows.load(3).tolist() == list(range(30, 41))

    def batches(**kw):
        args = {"seed": 1, "epoch": 0, "global_batch_size": 8, **kw}
        return [tokens for (tokens,) in TokenLoader(windows, **args)]

    one = batches()
    assert len(one) == 12 and one[0].shape == (8, 11) and one[0].dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(one, batches(), strict=True))
    two = [batches(rank=r, world_size=2) for r in range(2)]
    assert all(torch.equal(torch.cat([a, b]), c) for a, b, c in zip(*two, one, strict=True))
    resumed = batches(start_step=5)
    assert len(resumed) == 7 and all(torch.equal(a, b) for a, b in zip(resumed, one[5:], strict=True))
    assert not torch.equal(batches(epoch=1)[0], one[0]) and not torch.equal(batches(seed=2)[0], one[0])
    seen = torch.cat(one)[:, 0].tolist()
    assert len(set(seen)) == len(seen)  # no window twice in an epoch


def test_loader_errors_explain_the_fix():
    windows = TokenWindows(np.arange(41, dtype=np.uint16), seq_len=10)
    with pytest.raises(DataError, match="4 windows of 11 tokens is fewer than one global batch of 8"):
        TokenLoader(windows, seed=0, epoch=0, global_batch_size=8)
    with pytest.raises(DataError, match="not divisible by the world size 3"):
        TokenLoader(windows, seed=0, epoch=0, global_batch_size=4, world_size=3)
    with pytest.raises(DataError, match="smaller data.seq_len"):
        TokenWindows(np.arange(5, dtype=np.uint16), seq_len=10)


def test_eval_windows_are_fixed_and_spread_over_the_split():
    stream = np.arange(10_001, dtype=np.uint16)
    ev = eval_windows(stream, seq_len=100, num_windows=5)
    assert ev.shape == (5, 101) and ev[:, 0].tolist() == [0, 2500, 5000, 7400, 9900]
    assert eval_windows(stream, 100, 1000).shape == (100, 101)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sorce": "text"}, "did you mean 'source'"),
        ({"source": "web"}, "source='web' must be one of stdlib, text, tokens"),
        ({"source": "text"}, "path=None is required for source 'text'"),
        ({"val_fraction": 1.0}, r"must be in \(0, 1\)"),
        ({"source": "tokens", "path": "x"}, "tokenizer='bpe' must be the tokenizer.json"),
        ({"tokenizer": "none"}, "'none' is only for source 'tokens'"),
    ],
)
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(LMDataConfig, data, where="data")

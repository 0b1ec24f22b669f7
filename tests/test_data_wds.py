"""Webdataset shards in img2dataset layout, written as real tar files (compt.paradigms.clip.data.wds)."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from compt.paradigms.clip.data import DataConfig, DataError, build_dataset, build_loader
from compt.paradigms.clip.data.wds import dataset_size, expand_shards

LONG = "A red square sits on a table. It is bright and shiny. Next to it lies a pen."


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(folder, num_shards=4, per_shard=8, stats=True, bad=None):
    """img2dataset-style shards {00000..N}.tar (+ _stats.json); ``bad`` maps key -> kind of damage."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    bad = bad or {}
    for s in range(num_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = _jpeg(rng) if bad.get(key) != "corrupt" else b"not a jpeg at all"
                if bad.get(key) != "no_image":
                    _add(tar, f"{key}.jpg", image)
                caption = "" if bad.get(key) == "empty" else f"a photo of item {key}"
                text = caption.encode() + (b" caf\xe9" if bad.get(key) == "latin1" else b"")
                _add(tar, f"{key}.txt", text)
                meta = {
                    "key": key,
                    "status": "success",
                    "longSV_captions": [LONG],
                    "shortIB_captions": "a square",
                }
                if bad.get(key) == "empty":  # no caption anywhere
                    meta = {"key": key, "status": "success"}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        if stats:
            (folder / f"{s:05d}_stats.json").write_text(json.dumps({"successes": per_shard}))
    return str(folder / f"{{00000..{num_shards - 1:05d}}}.tar")


def _cfg(pattern, **kw):
    kw.setdefault("wds_caption_keys", ("shortIB_captions", "longSV_captions"))
    return DataConfig(kind="wds", path=pattern, **kw)


def _run(cfg, gbs=4, **kw):
    loader = build_loader(cfg, image_size=32, context_length=32, global_batch_size=gbs, **kw)
    return loader, list(loader)


def test_shards_stream_batches_with_size_from_img2dataset_stats(tmp_path):
    pattern = _shards(tmp_path / "shards")
    assert len(expand_shards(pattern)) == 4 and dataset_size(expand_shards(pattern)) == 32
    loader, batches = _run(_cfg(pattern))
    assert len(loader) == 8 and len(batches) == 8
    images, texts = batches[0]
    assert images.shape == (4, 3, 32, 32) and texts.shape == (4, 4, 32)
    assert loader.skips == {}


def test_json_captions_join_the_pool(tmp_path):
    pattern = _shards(tmp_path / "shards", num_shards=1, per_shard=2)
    ds = build_dataset(_cfg(pattern, num_samples=2), image_size=32, context_length=32)
    member = {
        "__key__": "k",
        "__url__": "u",
        "txt": b"raw text here",
        "json": json.dumps({"x": [LONG]}).encode(),
    }
    with tarfile.open(pattern.replace("{00000..00000}", "00000")) as tar:
        member["jpg"] = tar.extractfile("000000000.jpg").read()
    member["json"] = json.dumps({"longSV_captions": [LONG], "shortIB_captions": "a square"}).encode()
    image, tokens = ds.decode(member, epoch=0)
    assert image.shape == (3, 32, 32) and tokens.shape == (4, 32)
    # raw + "a square" + 3 sentences = 5 texts, 4 drawn without repeats.
    assert len({tuple(t.tolist()) for t in tokens}) == 4


def test_same_run_twice_is_identical_and_epochs_differ(tmp_path):
    pattern = _shards(tmp_path / "shards")
    _, a = _run(_cfg(pattern, wds_shuffle_buffer=5))
    _, b = _run(_cfg(pattern, wds_shuffle_buffer=5))
    _, c = _run(_cfg(pattern, wds_shuffle_buffer=5), epoch=1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_start_step_resumes_exactly(tmp_path, workers):
    pattern = _shards(tmp_path / "shards", num_shards=4, per_shard=6)
    cfg = _cfg(pattern, workers=workers, wds_shuffle_buffer=4, num_samples=48)  # streams cycle
    _, full = _run(cfg, gbs=4)
    assert len(full) == 12
    _, resumed = _run(cfg, gbs=4, start_step=5)
    assert len(resumed) == 7
    for (i, t), (ri, rt) in zip(full[5:], resumed, strict=True):
        assert torch.equal(i, ri) and torch.equal(t, rt)


def test_ranks_read_disjoint_shards(tmp_path):
    pattern = _shards(tmp_path / "shards", num_shards=4)
    cfg = _cfg(pattern)
    r0 = build_loader(cfg, image_size=32, context_length=32, global_batch_size=4, rank=0, world_size=2)
    r1 = build_loader(cfg, image_size=32, context_length=32, global_batch_size=4, rank=1, world_size=2)
    s0, s1 = set(r0.streams.rank_shards), set(r1.streams.rank_shards)
    assert len(s0) == len(s1) == 2 and not s0 & s1
    images, texts = next(iter(r0))
    assert images.shape[0] == 2
    with pytest.raises(DataError, match="cannot feed 2 rank"):
        build_loader(
            _cfg(pattern, workers=3), image_size=32, context_length=32, global_batch_size=4, world_size=2
        )


def test_truncated_tar_corrupt_image_missing_shard_are_counted(tmp_path, caplog):
    bad = {"000000001": "corrupt", "000000002": "empty", "000000003": "no_image"}
    _shards(tmp_path / "shards", num_shards=3, per_shard=8, bad=bad)
    shard2 = tmp_path / "shards" / "00002.tar"
    with tarfile.open(shard2) as tar:
        cut = tar.getmember("000020001.jpg").offset_data + 100  # inside the second sample's image
    shard2.write_bytes(shard2.read_bytes()[:cut])
    # Read in this order (shuffle off): missing shard, truncated shard (1 whole sample), shard 0.
    pattern = "::".join(str(tmp_path / "shards" / f) for f in ("00003.tar", "00002.tar", "00000.tar"))
    cfg = _cfg(pattern, num_samples=11, wds_shuffle_buffer=0, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="compt.paradigms.clip.data"):
        loader, batches = _run(cfg, gbs=11)
    assert loader.skips == {
        "corrupt_image": 1,
        "empty_caption": 1,
        "missing_image": 1,
        "truncated_tar": 1,
        "missing_file": 1,
    }
    assert [len(i) for i, _ in batches] == [11 - 5]
    assert "skipped 5: corrupt_image=1, empty_caption=1, missing_file=1" in caplog.text
    with pytest.raises(DataError, match="more than data.max_skips=3"):
        _run(_cfg(pattern, num_samples=11, max_skips=3, shuffle=False, wds_shuffle_buffer=0), gbs=11)


def test_missing_size_and_missing_shards_are_clear_errors(tmp_path):
    pattern = _shards(tmp_path / "shards", num_shards=2, stats=False)
    with pytest.raises(DataError, match="set data.num_samples"):
        build_dataset(_cfg(pattern), image_size=32, context_length=32)
    with pytest.raises(DataError, match="none of the 3 shards exists"):
        build_dataset(
            _cfg(str(tmp_path / "nope/{0..2}.tar"), num_samples=4), image_size=32, context_length=32
        )
    with pytest.raises(DataError, match="data.path is empty"):
        build_dataset(DataConfig(kind="wds"), image_size=32, context_length=32)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_of_only_bad_samples_borrows_from_the_next_batches(tmp_path, workers):
    # One shard per stream, no shuffling: stream 0 reads shard 0 in order; its first batch (4) is bad.
    bad = {f"00000{i:04d}": "corrupt" for i in range(4)}
    pattern = _shards(tmp_path / "shards", num_shards=2, per_shard=12, bad=bad)
    cfg = _cfg(pattern, workers=workers, shuffle=False, wds_shuffle_buffer=0, num_samples=24)
    loader, batches = _run(cfg, gbs=4)
    assert [len(i) for i, _ in batches] == [4] * 6
    stream0 = batches[:: max(1, workers)]  # the steps stream 0 serves
    # Step 0 borrowed the stream's next batch, which is still served in its own turn.
    assert torch.equal(stream0[0][0], stream0[1][0]) and torch.equal(stream0[0][1], stream0[1][1])
    assert loader.skips == {"corrupt_image": 4} and loader.repairs == {"refilled_batch": 1}
    _, resumed = _run(cfg, gbs=4, start_step=1)  # resume after the refilled step: unchanged
    for (i, t), (ri, rt) in zip(batches[1:], resumed, strict=True):
        assert torch.equal(i, ri) and torch.equal(t, rt)


def test_a_caption_that_is_not_utf8_is_kept_and_counted(tmp_path, caplog):
    pattern = _shards(tmp_path / "shards", num_shards=1, per_shard=4, bad={"000000002": "latin1"})
    with caplog.at_level(logging.WARNING, logger="compt.paradigms.clip.data"):
        loader, batches = _run(_cfg(pattern, shuffle=False, wds_shuffle_buffer=0), gbs=4)
    assert [len(i) for i, _ in batches] == [4]
    assert loader.skips == {} and loader.repairs == {"non_utf8_text": 1}
    assert "000000002.txt" in caplog.text and "repaired non_utf8_text=1" in caplog.text


def test_a_broken_size_file_names_itself(tmp_path):
    pattern = _shards(tmp_path / "shards", num_shards=1, stats=False)
    (tmp_path / "shards" / "sizes.json").write_text("{not json")
    with pytest.raises(DataError, match=r"sizes.json: cannot read the sample count.*data.num_samples"):
        build_dataset(_cfg(pattern), image_size=32, context_length=32)
    (tmp_path / "shards" / "sizes.json").unlink()
    (tmp_path / "shards" / "__len__").write_text("many\n")
    with pytest.raises(DataError, match=r"__len__: cannot read the sample count"):
        build_dataset(_cfg(pattern), image_size=32, context_length=32)


def test_a_json_that_is_not_an_object_is_a_bad_json_skip(tmp_path):
    pattern = _shards(tmp_path / "shards", num_shards=1, per_shard=2)
    ds = build_dataset(_cfg(pattern, num_samples=2), image_size=32, context_length=32)
    out = ds.decode({"__key__": "k", "__url__": "u", "jpg": b"", "json": b"[1, 2]"}, epoch=0)
    assert out.reason == "bad_json" and "not an object" in out.detail  # was an AttributeError

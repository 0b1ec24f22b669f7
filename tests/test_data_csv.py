"""CSV/TSV tables (OpenCLIP format + DreamLIP long captions) on real JPEG files (clip data.tsv)."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from compt.engine.loader import sample_rng
from compt.paradigms.clip.data import (
    DREAMLIP_CAPTION_KEYS,
    DataConfig,
    DataError,
    build_dataset,
    build_loader,
)
from compt.paradigms.clip.data.captions import caption_pool, split_sentences


def _jpegs(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.jpg", quality=90)
        names.append(f"images/img{i}.jpg")
    return names


def _tsv(tmp_path, rows, header=("filepath", "title"), sep="\t", name="train.tsv"):
    path = tmp_path / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def _loader(path, gbs=4, **cfg):
    cfg = DataConfig(kind="csv", path=str(path), **cfg)
    return build_loader(cfg, image_size=32, context_length=32, global_batch_size=gbs)


def test_openclip_tsv_loads_with_relative_paths(tmp_path):
    names = _jpegs(tmp_path / "images", 8)
    path = _tsv(tmp_path, [(n, f"photo number {i}") for i, n in enumerate(names)])
    loader = _loader(path)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    images, texts = batches[0]
    assert images.shape == (4, 3, 32, 32) and texts.shape == (4, 4, 32)
    # One caption per image: the pool is just it, so all M draws repeat the same caption.
    assert torch.equal(texts[:, 0], texts[:, 3])
    assert loader.skips == {}


def test_two_ranks_and_workers_match_one_process(tmp_path):
    names = _jpegs(tmp_path / "images", 16)
    path = _tsv(tmp_path, [(n, f"a photo. of item {i}. with words") for i, n in enumerate(names)])
    one = list(_loader(path, gbs=8))
    r0 = list(_loader(path, gbs=8, workers=2))
    halves = [
        list(
            build_loader(
                DataConfig(kind="csv", path=str(path)),
                image_size=32,
                context_length=32,
                global_batch_size=8,
                rank=r,
                world_size=2,
            )
        )
        for r in (0, 1)
    ]
    for (img, txt), (wi, wt), (i0, t0), (i1, t1) in zip(one, r0, *halves, strict=True):
        assert torch.equal(img, wi) and torch.equal(txt, wt)
        assert torch.equal(torch.cat([i0, i1]), img) and torch.equal(torch.cat([t0, t1]), txt)


def test_dreamlip_csv_builds_sub_caption_pools(tmp_path):
    names = _jpegs(tmp_path / "images", 4)
    long_caption = (
        "In the image, there is a small black house with a green roof. The house appears to be under "
        "construction, e.g. tools lie around.\nA hammer is visible. Trees surround it! Is it a cabin?"
    )
    header = ("Image Path", "raw_caption", *DREAMLIP_CAPTION_KEYS)
    rows = [
        (
            n,
            f"raw caption {i}",
            "a small cabin",
            long_caption,
            "A wooden building.",
            long_caption,
            "A small wooden building is being built.",
            long_caption,
        )
        for i, n in enumerate(names)
    ]
    path = _tsv(tmp_path, rows, header=header, sep=",", name="dreamlip.csv")
    cfg = DataConfig(
        kind="csv",
        path=str(path),
        csv_separator=",",
        csv_img_key="Image Path",
        csv_caption_key="raw_caption",
        csv_extra_caption_keys=DREAMLIP_CAPTION_KEYS,
    )
    ds = build_dataset(cfg, image_size=32, context_length=32)
    image_path, pool = ds.row(2)
    assert image_path == str(tmp_path / "images" / "img2.jpg")
    assert pool[0] == "raw caption 2"
    assert "The house appears to be under construction, e.g. tools lie around." in pool
    assert "A hammer is visible." in pool and "Is it a cabin?" in pool
    assert len(pool) == len(set(pool)) <= 16  # raw + at most 15 sub-captions (App. A)
    images, tokens = ds.load(2, sample_rng(0, 0, 2))
    assert images.shape == (3, 32, 32) and tokens.shape == (4, 32)
    assert len({tuple(t.tolist()) for t in tokens}) == 4  # 4 distinct captions drawn


def test_caption_pool_limits_and_round_robin():
    pool = caption_pool("raw", ["one. two words. three words here.", ["list item one", "list item two"]], 3)
    assert pool == ["raw", "two words.", "list item one", "three words here."]
    assert split_sentences("Dr. Smith arrived at 3.5 p.m. today. He left.") == [
        "Dr. Smith arrived at 3.5 p.m. today.",
        "He left.",
    ]
    assert caption_pool("", [""], 15) == []


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    names = _jpegs(tmp_path / "images", 6)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = (tmp_path / "images" / "img0.jpg").read_bytes()[:200]
    (tmp_path / "images" / "cut.jpg").write_bytes(truncated)
    rows = [(n, f"good {i}") for i, n in enumerate(names)] + [
        ("images/missing.jpg", "no file"),
        ("images/broken.jpg", "garbage bytes"),
        ("images/cut.jpg", "truncated jpeg"),
        (names[0], "   "),
    ]
    path = _tsv(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="compt.paradigms.clip.data"):
        loader = _loader(path, gbs=10)
        # A trainer takes len(loader) batches and never sees the generator end: the summary is
        # logged before the last batch is handed out.
        images, texts = next(iter(loader))
    assert len(images) == 6 and len(texts) == 6
    assert loader.skips == {"missing_file": 1, "corrupt_image": 2, "empty_caption": 1}
    assert "skipped 4: corrupt_image=2, empty_caption=1, missing_file=1" in caplog.text
    with pytest.raises(DataError, match=r"more than data.max_skips=2.*raise data.max_skips"):
        list(_loader(path, gbs=10, max_skips=2))


def test_malformed_rows_are_skipped(tmp_path):
    names = _jpegs(tmp_path / "images", 4)
    path = tmp_path / "t.tsv"
    lines = ["filepath\ttitle"] + [f"{n}\tcaption {i}" for i, n in enumerate(names)] + ["only-one-field"]
    path.write_text("\n".join(lines) + "\n")
    loader = _loader(path, gbs=5)
    assert sum(len(i) for i, _ in loader) == 4 and loader.skips == {"bad_row": 1}


def test_missing_column_and_wrong_separator_name_the_file_and_column(tmp_path):
    names = _jpegs(tmp_path / "images", 2)
    path = _tsv(tmp_path, [(n, "x") for n in names], header=("filepath", "caption"))
    with pytest.raises(DataError, match=r"train.tsv: no column 'title' \(set by data.csv_caption_key\)"):
        _loader(path)
    comma = _tsv(tmp_path, [(n, "x") for n in names], sep=",", name="comma.csv")
    with pytest.raises(DataError, match="contains a comma: set data.csv_separator"):
        _loader(comma)
    extra = DataConfig(
        kind="csv", path=str(path), csv_caption_key="caption", csv_extra_caption_keys=("longSV",)
    )
    with pytest.raises(DataError, match="no column 'longSV'.*csv_extra_caption_keys"):
        build_dataset(extra, image_size=32, context_length=32)


def test_empty_and_missing_tables_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _loader(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DataError, match="empty.tsv: the file is empty"):
        _loader(tmp_path / "empty.tsv")
    (tmp_path / "header.tsv").write_text("filepath\ttitle\n")
    with pytest.raises(DataError, match="no data rows"):
        _loader(tmp_path / "header.tsv")
    (tmp_path / "dup.tsv").write_text("filepath\ttitle\ttitle\na.jpg\tx\ty\n")
    with pytest.raises(DataError, match="duplicate column"):
        _loader(tmp_path / "dup.tsv")


def test_num_samples_limits_rows_and_image_root(tmp_path):
    names = _jpegs(tmp_path / "pics" / "images", 8)
    path = _tsv(tmp_path, [(n, f"c {i}") for i, n in enumerate(names)])
    loader = _loader(path, num_samples=4, image_root=str(tmp_path / "pics"))
    assert len(loader) == 1 and loader.skips == {}
    assert sum(len(i) for i, _ in loader) == 4


def test_a_batch_of_only_bad_samples_is_refilled_from_the_following_ones(tmp_path, caplog):
    names = _jpegs(tmp_path / "images", 5)
    # Rows 3..5 (the whole second batch of 3) are missing: step 1 borrows rows 6, 7, 0 (wrapping).
    rows = [(n, f"good {i}") for i, n in enumerate(names[:3])]
    rows += [(f"images/gone{i}.jpg", f"gone {i}") for i in range(3)]
    rows += [(n, f"good {i}") for i, n in enumerate(names[3:], 3)]
    path = _tsv(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="compt.paradigms.clip.data"):
        loader = _loader(path, gbs=3, shuffle=False)
        batches = list(loader)
    assert [len(i) for i, _ in batches] == [3, 3]
    ds = build_dataset(DataConfig(kind="csv", path=str(path)), image_size=32, context_length=32)
    borrowed = [ds.load(i, sample_rng(0, 0, i))[0] for i in (6, 7, 0)]
    assert torch.equal(batches[1][0], torch.stack(borrowed))
    assert loader.skips == {"missing_file": 3} and loader.repairs == {"refilled_batch": 1}
    assert "refilled_batch" in caplog.text and "step 1" in caplog.text
    # A resume at the refilled step sees the same batch (the refill is a function of the step).
    cfg = DataConfig(kind="csv", path=str(path), shuffle=False)
    resumed = list(build_loader(cfg, image_size=32, context_length=32, global_batch_size=3, start_step=1))
    assert torch.equal(resumed[0][0], batches[1][0]) and torch.equal(resumed[0][1], batches[1][1])
    with_workers = list(_loader(path, gbs=3, shuffle=False, workers=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, with_workers, strict=True))


def test_a_batch_with_nothing_to_borrow_is_an_error_naming_the_step(tmp_path):
    rows = [(f"images/gone{i}.jpg", f"gone {i}") for i in range(8)]
    with pytest.raises(DataError, match=r"step 0 has no usable sample.*missing_file=4"):
        list(_loader(_tsv(tmp_path, rows), gbs=4, shuffle=False, max_skips=4))


def _lines(tmp_path, lines, name="train.tsv"):
    path = tmp_path / name
    path.write_bytes(b"filepath\ttitle\n" + b"".join(line + b"\n" for line in lines))
    return path


def test_a_stray_quote_swallowing_rows_is_an_error_naming_the_row(tmp_path):
    names = _jpegs(tmp_path / "images", 8)
    lines = [f"{n}\tphoto {i}".encode() for i, n in enumerate(names)]
    lines[2] = f'{names[2]}\t"stray quote opens photo 2'.encode()
    lines[6] = f'{names[6]}\tphoto 6 ends with a quote"'.encode()
    # Both csv and pandas (OpenCLIP) read this as 4 rows, row 3's caption holding rows 4-7.
    with pytest.raises(DataError, match=r"train.tsv: data row 3 \(line 4\) runs over lines 4-8.*line 5: "):
        _loader(_lines(tmp_path, lines))
    lines[6] = f"{names[6]}\tphoto 6".encode()  # one stray quote left: it never closes
    with pytest.raises(DataError, match=r"data row 3 \(line 4\) runs over lines 4-9"):
        _loader(_lines(tmp_path, lines))
    lines[2], lines[-1] = lines[2].replace(b'"', b""), f'{names[7]}\t"quote on the last row'.encode()
    with pytest.raises(DataError, match=r"OpenCLIP's reader \(pandas.read_csv\) cannot split it.*EOF inside"):
        _loader(_lines(tmp_path, lines))


def test_rows_read_vs_lines_are_logged_and_quoted_line_breaks_are_fine(tmp_path, caplog):
    names = _jpegs(tmp_path / "images", 4)
    lines = [f"{n}\tphoto {i}".encode() for i, n in enumerate(names)]
    lines[1] = f'{names[1]}\t"a long caption\nover two lines, e.g. from an MLLM"'.encode()
    with caplog.at_level(logging.INFO, logger="compt.paradigms.clip.data"):
        loader = _loader(_lines(tmp_path, lines + [b""]))
    assert len(loader) == 1 and loader.skips == {}
    assert "4 rows read from 5 lines after the header (1 line breaks inside quoted fields)" in caplog.text


QUOTE_CASES = [
    b'a.jpg\tsay "hi" now',
    b'a.jpg\t"he said ""x"" twice"',
    b'a.jpg\t"quoted" then text',
    b'a.jpg\t"tab\tinside quotes"',
    b'a.jpg\t"a caption\nwith a line break"',
    b"a.jpg\tNA",
    b"a.jpg\t",
    b"a.jpg\tnull",
    b"",
    b"a.jpg\tplain caption",
]


def test_cells_are_the_ones_openclip_reads_with_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    path = _lines(tmp_path, QUOTE_CASES)
    ds = build_dataset(DataConfig(kind="csv", path=str(path)), image_size=32, context_length=32)
    ours = [ds._record(i)[0][1] for i in range(len(ds))]
    # OpenCLIP's own call is pd.read_csv(path, sep=sep); its NaN for empty/"NA"/"null" cells is a
    # pandas default compt does not copy (OpenCLIP then trains on the caption "nan").
    theirs = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)["title"].tolist()
    assert ours == theirs and len(ours) == len(QUOTE_CASES) - 1
    assert pd.read_csv(path, sep="\t")["title"].isna().sum() == 3


def test_a_caption_that_is_not_utf8_is_kept_and_counted(tmp_path):
    names = _jpegs(tmp_path / "images", 4)
    lines = [f"{n}\tphoto {i}".encode() for i, n in enumerate(names)]
    lines[2] = names[2].encode() + b"\tcaf\xe9 cr\xe8me (latin-1)"
    loader = _loader(_lines(tmp_path, lines), shuffle=False)
    (images, _), *_ = list(loader)
    assert len(images) == 4 and loader.skips == {}
    assert loader.repairs == {"non_utf8_text": 1}

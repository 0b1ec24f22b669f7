"""CLIP export writes open_clip's local-dir layout; open_clip alone reloads the same model and tokenizer."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from compt.cli import main as cli_main
from compt.engine.checkpoint import model_from_checkpoint, save_checkpoint
from compt.families import get_family, get_member
from compt.paradigms.clip.data import tokenizer as compt_tokenizer
from compt.paradigms.clip.data.images import MEAN, STD, eval_transform
from compt.paradigms.clip.export import CONFIG_NAME, WEIGHTS_NAME, export_member, load_model

CAPTIONS = ["a red circle on a black background", "two blue squares", "", "a photo of a striped star " * 8]


def _checkpoint(tmp_path, name: str, seed: int = 0):
    torch.manual_seed(seed)
    member = get_member(name)
    model = member.create()
    with torch.no_grad():  # move logit_scale off its init value so a dropped tensor would show
        model.logit_scale.fill_(3.21)
    path = save_checkpoint(
        tmp_path / "run" / "final.pt",
        {"model": model.state_dict(), "model_cfg": member.model_cfg, "member": member.name},
    )
    return member, path


@pytest.mark.parametrize("name", ["debug-S", "tiny-XS", "tiny-S"])
def test_open_clip_local_dir_gives_identical_embeddings(tmp_path, name):
    member, ckpt = _checkpoint(tmp_path, name)
    out = export_member(ckpt, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    ours, _ = model_from_checkpoint(ckpt)
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    ours.eval(), theirs.eval()
    tok_theirs = open_clip.get_tokenizer(f"local-dir:{out}")
    tok_ours = compt_tokenizer(member.context_length)
    tokens = tok_ours(CAPTIONS)
    assert tokens.shape == (len(CAPTIONS), member.context_length)
    assert torch.equal(tok_theirs(CAPTIONS), tokens)

    g = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, member.image_size, member.image_size, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images), ours.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs.encode_text(tokens), ours.encode_text(tokens), rtol=0, atol=1e-6)
        assert theirs.logit_scale.item() == pytest.approx(3.21)


def test_exported_preprocess_matches_compt_eval_transform(tmp_path):
    member, ckpt = _checkpoint(tmp_path, "tiny-XS")
    out = export_member(ckpt, tmp_path / "export")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    cfg = json.loads((out / CONFIG_NAME).read_text())["preprocess_cfg"]
    assert cfg["size"] == member.image_size
    assert cfg["mean"] == pytest.approx(MEAN.flatten().tolist()) and cfg["std"] == pytest.approx(
        STD.flatten().tolist()
    )
    rng = np.random.default_rng(0)
    # Shapes whose resize and center crop land on whole pixels in both implementations.
    for h, w in [(32, 32), (64, 64), (48, 96), (67, 101)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        torch.testing.assert_close(preprocess(img), eval_transform(img, member.image_size), rtol=0, atol=1e-6)


def test_safetensors_hold_the_full_state_dict(tmp_path):
    member, ckpt = _checkpoint(tmp_path, "debug-L")
    out = export_member(ckpt, tmp_path / "export")
    tensors = load_file(str(out / WEIGHTS_NAME))
    expected = member.create().state_dict()
    assert set(tensors) == set(expected)
    assert all(t.is_contiguous() and t.shape == expected[k].shape for k, t in tensors.items())
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["model_cfg"] == member.model_cfg
    assert config["compt"]["member"] == member.name


def test_export_from_module_payload_and_run_folder(tmp_path):
    member, ckpt = _checkpoint(tmp_path, "debug-S")
    model, payload = model_from_checkpoint(ckpt)
    with pytest.raises(ValueError, match="model_cfg"):
        export_member(model, tmp_path / "a")
    # A model whose tensors share storage / are non-contiguous still exports (safetensors refuses those).
    with torch.no_grad():
        model.text_projection.data = model.text_projection.data.t().contiguous().t()
    a = export_member(model, tmp_path / "a", model_cfg=member.model_cfg, member=member.name)
    b = export_member(payload, tmp_path / "b")
    shared = dict(payload["model"])
    shared["logit_scale"] = shared["logit_scale"].view(1)[0]  # a view of another storage...
    shared["extra"] = shared["logit_scale"]  # ...and two entries on one storage
    tied = load_file(str(export_member({**payload, "model": shared}, tmp_path / "tied") / WEIGHTS_NAME))
    assert torch.equal(tied["extra"], tied["logit_scale"])
    c = export_member(ckpt.parent, tmp_path / "c")  # run folder: uses final.pt
    ref = load_file(str(b / WEIGHTS_NAME))
    for folder in (a, c):
        got = load_file(str(folder / WEIGHTS_NAME))
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    # load_model reads all three forms and names the member.
    for path, fmt in ((ckpt, "checkpoint"), (ckpt.parent, "checkpoint"), (c, "export")):
        loaded, cfg, info = load_model(path)
        assert info["format"] == fmt and info["member"] == member.name and cfg == member.model_cfg
        assert torch.equal(loaded.state_dict()["logit_scale"], ref["logit_scale"])


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_model(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / CONFIG_NAME).write_text('{"model_cfg": ')
    with pytest.raises(ValueError, match=r"broken/open_clip_config.json is not valid JSON"):
        load_model(tmp_path / "broken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="final.pt"):
        load_model(tmp_path / "empty")


def test_cli_export(tmp_path, capsys):
    _, ckpt = _checkpoint(tmp_path, "debug-S")
    assert cli_main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / WEIGHTS_NAME).is_file()
    assert "local-dir:" in capsys.readouterr().out
    assert cli_main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "o2")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert cli_main(["export", str(tmp_path / "garbage.pt"), str(tmp_path / "o3")]) == 2
    assert "garbage.pt cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_honour_the_umask(tmp_path, umask):
    _, ckpt = _checkpoint(tmp_path, "debug-S")
    old = os.umask(umask)
    try:
        out = export_member(ckpt, tmp_path / "out")
    finally:
        os.umask(old)
    # Both files as any new file under this umask (safetensors alone used to write 0600).
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {
        CONFIG_NAME: 0o666 & ~umask,
        WEIGHTS_NAME: 0o666 & ~umask,
    }


def test_export_refuses_to_replace_another_models_export(tmp_path, capsys):
    _, small = _checkpoint(tmp_path / "s", "debug-S")
    _, large = _checkpoint(tmp_path / "l", "debug-L")
    _, again = _checkpoint(tmp_path / "a", "debug-S", seed=1)  # same member, other weights
    out = tmp_path / "out"
    assert cli_main(["export", str(small), str(out)]) == 0
    assert cli_main(["export", str(small), str(out)]) == 0  # the same export again: fine
    for other, why in ((large, ""), (again, " with other weights")):
        assert cli_main(["export", str(other), str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out} already holds the export of debug-S{why}; exporting" in err and "--force" in err
        assert load_model(out)[2]["member"] == "debug-S"  # untouched
    assert cli_main(["export", str(large), str(out), "--force"]) == 0
    assert load_model(out)[2]["member"] == "debug-L"


def test_export_onto_a_file_is_one_line(tmp_path, capsys):
    _, ckpt = _checkpoint(tmp_path, "debug-S")
    (tmp_path / "taken").write_text("notes")
    assert cli_main(["export", str(ckpt), str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "taken is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "notes"


def test_an_export_whose_config_belongs_to_another_member_is_named(tmp_path, capsys):
    _, ckpt = _checkpoint(tmp_path, "debug-S")
    out = export_member(ckpt, tmp_path / "out")
    config = json.loads((out / CONFIG_NAME).read_text())
    config["model_cfg"] = get_member("debug-L").model_cfg  # was an AssertionError inside open_clip
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"does not fit open_clip_config.json \(member debug-S.*shapes differ"
    ):
        load_model(out)
    assert cli_main(["eval", str(out), "--num-images", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compt eval: error:") and "--force" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_paper_families_export_to_open_clip(tmp_path, family):
    """The 224 px members (open_clip ViT and timm Swin towers) reload with open_clip alone too."""
    member = get_family(family).members[0]
    torch.manual_seed(0)
    model = member.create().eval()
    out = export_member(model, tmp_path / "export", model_cfg=member.model_cfg, member=member.name)
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    theirs.eval()
    images = torch.randn(1, 3, member.image_size, member.image_size)
    tokens = compt_tokenizer(member.context_length)(CAPTIONS[:2])
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS[:2]), tokens)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images), model.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs.encode_text(tokens), model.encode_text(tokens), rtol=0, atol=1e-6)

"""Tests for compt.families: every registered member builds, names resolve, YAML families validate."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP

from compt.cost import count_params
from compt.families import (
    Member,
    check_ascending,
    create,
    get_family,
    get_member,
    list_families,
    list_members,
    load_family_yaml,
    normalize_name,
    register_family,
)

torch.set_num_threads(1)

SMALL_FAMILIES = {"tiny", "debug"}  # cheap enough to build for real and run on CPU


@pytest.mark.parametrize("member", list_members(), ids=lambda m: m.name)
def test_every_member_builds_and_param_count_matches(member):
    small = member.family in SMALL_FAMILIES | {"llama-cpu"}
    device = "cpu" if small else "meta"  # meta: ViT-L without memory
    model = member.create(device)
    assert member.paradigm.owns(model) and isinstance(model, CLIP) == (member.paradigm_name == "clip")
    assert all(p.device.type == device for p in model.parameters())
    assert count_params(member)["total"] == sum(p.numel() for p in model.parameters())
    if member.paradigm_name == "clip":
        assert count_params(member)["vision"] == sum(p.numel() for p in model.visual.parameters())


@pytest.mark.parametrize("name", sorted(SMALL_FAMILIES))
def test_small_family_members_run_forward(name):
    for member in get_family(name).members:
        model = member.create().eval()
        images = torch.randn(2, 3, member.image_size, member.image_size)
        texts = torch.randint(0, member.text_cfg["vocab_size"], (3, member.context_length))
        with torch.no_grad():
            img, txt = model.encode_image(images), model.encode_text(texts)
        embed_dim = member.model_cfg["embed_dim"]
        assert img.shape == (2, embed_dim) and txt.shape == (3, embed_dim)


@pytest.mark.parametrize("family", list_families())
def test_registered_families_are_in_ascending_size(family):
    check_ascending(list(get_family(family).members))


def test_member_names_resolve_with_slash_or_dash():
    assert normalize_name("ViT-S/16") == normalize_name("vit-s-16")
    assert get_member("ViT-S/16") is get_member("ViT-S-16")
    assert get_family("vit").member("vit-s-16").name == "ViT-S/16"
    assert get_member("ViT-S/16", family="vit").family == "vit"
    assert isinstance(create("debug-S"), CLIP)


def test_unknown_member_lists_known_names():
    with pytest.raises(KeyError) as err:
        get_family("vit").member("ViT-Q/16")
    msg = err.value.args[0]
    assert "ViT-Q/16" in msg and "ViT-T/16" in msg and "ViT-L/16" in msg
    with pytest.raises(KeyError, match="tiny-XS"):
        get_member("no-such-model")


def test_unknown_family_suggests_a_name():
    with pytest.raises(KeyError, match="Did you mean 'tiny'"):
        get_family("tinny")


def test_duplicate_family_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_family("tiny")(lambda: [])


def test_check_ascending_names_the_pair():
    members = [get_member("tiny-S"), get_member("tiny-XS")]
    with pytest.raises(ValueError, match=r"tiny-XS .* follows tiny-S"):
        check_ascending(members)
    # A member listed twice is named as such (issue 11: "reorder them" did not say what was wrong).
    with pytest.raises(ValueError, match="tiny-S appears twice"):
        check_ascending([get_member("tiny-S"), get_member("tiny-S")])


# --- YAML families -------------------------------------------------------------------------------

_GOOD = """\
name: my-family
description: two small members
members:
  - name: my-S
    embed_dim: 32
    vision_cfg: {image_size: 16, patch_size: 4, width: 32, layers: 1, head_width: 16}
    text_cfg: {context_length: 16, vocab_size: 1000, width: 32, heads: 2, layers: 1}
  - name: my-L
    embed_dim: 32
    vision_cfg: {image_size: 16, patch_size: 4, width: 64, layers: 2, head_width: 16}
    text_cfg: {context_length: 16, vocab_size: 1000, width: 64, heads: 4, layers: 2}
"""


def test_yaml_family_loads_and_builds(tmp_path):
    path = tmp_path / "fam.yaml"
    path.write_text(_GOOD)
    family = load_family_yaml(path)
    assert family.name == "my-family" and family.names == ["my-S", "my-L"]
    assert get_family(str(path)).names == family.names
    check_ascending(list(family.members))
    model = family.member("my-L").create()
    assert sum(p.numel() for p in model.parameters()) == count_params(family.member("my-L"))["total"]


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("width: 64, heads: 4", "width: 64, headz: 4", "headz"),  # text_cfg
        ("patch_size: 4, width: 32", "patch_sise: 4, width: 32", "patch_sise"),  # vision_cfg
        ("  - name: my-L\n    embed_dim", "  - name: my-L\n    embed_dims: 32\n    embed_dim", "embed_dims"),
        ("description:", "descripton:", "descripton"),  # top level
    ],
)
def test_yaml_unknown_field_names_field_and_file(tmp_path, old, new, field):
    path = tmp_path / "bad.yaml"
    assert old in _GOOD
    path.write_text(_GOOD.replace(old, new, 1))
    with pytest.raises(ValueError) as err:
        load_family_yaml(path)
    assert field in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: x\n", "members"),
        ("members: []\n", "no members"),
        ("members:\n  - embed_dim: 32\n", "needs a 'name'"),
        ("members:\n  - name: a\n    vision_cfg: {}\n    text_cfg: {}\n", "missing model field 'embed_dim'"),
        (
            "members:\n  - name: a\n    embed_dim: 8\n    vision_cfg: oops\n    text_cfg: {}\n",
            "vision_cfg must be a mapping",
        ),
        ("members: {a: 1}\n", "must be a list"),
    ],
)
def test_yaml_malformed_family_is_explained(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_family_yaml(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        (
            "width: 64, heads: 4",
            "width: 64, heads: 5",
            "text_cfg.width 64 is not divisible by text_cfg.heads 5",
        ),
        ("width: 64, layers: 2, head_width: 16", "width: 60, layers: 2, head_width: 16", "not a multiple"),
        ("description:", "paradigm: clipp\ndescription:", "Did you mean 'clip'"),
    ],
)
def test_yaml_sizes_that_cannot_build_fail_at_load(tmp_path, old, new, match):
    """Issue 11: heads that do not divide the width failed inside torch when the model was built."""
    path = tmp_path / "bad.yaml"
    assert old in _GOOD
    path.write_text(_GOOD.replace(old, new, 1))
    with pytest.raises(ValueError, match=match) as err:
        load_family_yaml(path)
    assert str(path) in str(err.value)


def test_yaml_duplicate_member_names_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(_GOOD.replace("name: my-L", "name: my-s"))
    with pytest.raises(ValueError, match="my-s") as err:
        load_family_yaml(path)
    assert str(path) in str(err.value)


def test_missing_yaml_family_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        get_family("nope.yaml")


def test_member_config_copy_is_independent():
    member = get_member("tiny-S")
    cfg = member.open_clip_config()
    cfg["vision_cfg"]["width"] = 1
    assert member.vision_cfg["width"] != 1
    assert isinstance(member, Member) and member.vision_kind == "vit"
    assert get_member("Swin-T").vision_kind == "swin_tiny_patch4_window7_224"

import numpy as np
import pytest

from emserve.classes import (
    ATOMIC_NAMES,
    BY_NAME,
    CLASS_TABLE,
    atomic_members,
    check_class_names,
    colorize,
    masks_from_ids,
)


def test_table_ids_and_names_are_unique_and_groups_are_made_of_atomic_classes():
    assert len({c.id for c in CLASS_TABLE}) == len(CLASS_TABLE)
    assert len({c.name for c in CLASS_TABLE}) == len(CLASS_TABLE)
    for cls in CLASS_TABLE:
        assert all(m in ATOMIC_NAMES for m in cls.members), cls.name


def test_cellmap_ids_match_the_published_table():
    expected = {"ecs": 1, "pm": 2, "mito_mem": 3, "mito_lum": 4, "mito_ribo": 5, "mt_out": 30, "mt_in": 36}
    assert {name: BY_NAME[name].id for name in expected} == expected
    assert set(atomic_members("mito")) == {"mito_mem", "mito_lum", "mito_ribo"}


def test_group_masks_are_unions_of_member_ids():
    ids = np.array([[0, 3, 4], [5, 14, 15]])
    masks = masks_from_ids(ids, ["mito", "ld", "mito_lum"])
    assert masks[0].tolist() == [[False, True, True], [True, False, False]]
    assert masks[1].tolist() == [[False, False, False], [False, True, True]]
    assert masks[2].tolist() == [[False, False, True], [False, False, False]]


def test_unknown_or_duplicate_class_names_are_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match=r"unknown class name 'mitochondria'.*mito_lum"):
        check_class_names(["mitochondria"])
    with pytest.raises(ValueError, match=r"classes: duplicate class names \['pm'\]"):
        check_class_names(["pm", "pm"])


def test_colorize_paints_each_class_in_its_colour():
    masks = np.zeros((2, 2, 2), bool)
    masks[0, 0, 0] = masks[1, 1, 1] = True
    rgb = colorize(masks, ["mito_mem", "ld_lum"])
    assert tuple(rgb[0, 0]) == BY_NAME["mito_mem"].color
    assert tuple(rgb[1, 1]) == BY_NAME["ld_lum"].color
    assert tuple(rgb[0, 1]) == (0, 0, 0)

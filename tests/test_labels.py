"""Tests for sphere_ar_hf.labels (offline, no model weights)."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch

from sphere_ar_hf.labels import build_label_index, imagenet_id2label, resolve_label_ids

N = 1000


@pytest.fixture(scope="module")
def id2label() -> dict[int, str]:
    return imagenet_id2label()


# ----------------------------------------------------------------------------- package data


def test_data_file_is_package_data() -> None:
    path = resources.files("sphere_ar_hf") / "data" / "imagenet_labels.json"
    labels = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(labels, list)
    assert len(labels) == N
    assert all(isinstance(x, str) and x.strip() == x and x for x in labels)


def test_imagenet_id2label_contents(id2label: dict[int, str]) -> None:
    assert len(id2label) == N
    assert sorted(id2label) == list(range(N))
    assert id2label[0].startswith("tench")
    assert id2label[0] == "tench, Tinca tinca"
    assert id2label[1] == "goldfish, Carassius auratus"
    assert id2label[207] == "golden retriever"
    assert id2label[360] == "otter"
    assert id2label[999].startswith("toilet tissue")
    for i, label in id2label.items():
        assert label, i
        assert all(s.strip() for s in label.split(",")), (i, label)


def test_imagenet_id2label_returns_copy() -> None:
    a = imagenet_id2label()
    a[0] = "mutated"
    del a[1]
    b = imagenet_id2label()
    assert b[0].startswith("tench")
    assert 1 in b
    assert a is not b


# ----------------------------------------------------------------------------- index


def test_build_label_index_synonyms_and_full_label(id2label: dict[int, str]) -> None:
    index = build_label_index(id2label)
    assert index["tench"] == 0
    assert index["tinca tinca"] == 0
    assert index["tench, tinca tinca"] == 0
    assert index["goldfish"] == 1
    assert index["golden retriever"] == 207
    assert all(k == k.strip().lower() for k in index)


def test_build_label_index_collisions(id2label: dict[int, str]) -> None:
    index = build_label_index(id2label)
    # shared synonym -> lowest id
    assert index["crane"] == 134  # 134 (bird) and 517 (machine) are both labelled just "crane"
    assert index["maillot"] == 638  # full label of 638, synonym of 639
    assert index["panda"] == 387
    assert index["crayfish"] == 123
    # ... but every class's own full label maps to itself
    assert index["maillot, tank suit"] == 639
    assert index["crayfish, crawfish, crawdad, crawdaddy"] == 124
    assert index["partridge"] == 86  # full label of 86, although also a synonym of 82
    assert index["harp"] == 594  # full label of 594, although also a synonym of 593


def test_build_label_index_str_keys_and_custom() -> None:
    index = build_label_index({"2": "b, Beta", "0": "a", "1": "beta , c"})
    assert index == {"a": 0, "beta": 1, "beta , c": 1, "c": 1, "b": 2, "b, beta": 2}


# ----------------------------------------------------------------------------- resolve: valid inputs


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (207, 207),
        (0, 0),
        (N - 1, N - 1),
        ("Golden Retriever", 207),
        ("golden retriever", 207),
        ("tinca tinca", 0),
        (" GOLDFISH ", 1),
        ("Goldfish, Carassius auratus", 1),
        ("  tench, TINCA TINCA\t", 0),
        ("otter", 360),
        ("207", 207),
        (" 42 ", 42),
        (np.int64(5), 5),
        (np.uint16(7), 7),
        (torch.tensor(3), 3),
        (np.array(9), 9),
        (np.array("otter"), 360),
    ],
)
def test_resolve_single(id2label: dict[int, str], label: object, expected: int) -> None:
    assert resolve_label_ids(label, id2label, N) == [expected]


def test_resolve_list_tuple_mixed(id2label: dict[int, str]) -> None:
    assert resolve_label_ids([207, "otter", " GOLDFISH ", "12", np.int32(4)], id2label, N) == [207, 360, 1, 12, 4]
    assert resolve_label_ids((1, "tench"), id2label, N) == [1, 0]


def test_resolve_numpy(id2label: dict[int, str]) -> None:
    out = resolve_label_ids(np.array([1, 2, 999], dtype=np.int64), id2label, N)
    assert out == [1, 2, 999]
    assert all(type(x) is int for x in out)
    assert resolve_label_ids(np.array([3], dtype=np.uint8), id2label, N) == [3]
    assert resolve_label_ids(np.array(["otter", "Golden Retriever"]), id2label, N) == [360, 207]
    assert resolve_label_ids(np.array([360, "tench"], dtype=object), id2label, N) == [360, 0]


def test_resolve_torch(id2label: dict[int, str]) -> None:
    out = resolve_label_ids(torch.tensor([207, 360]), id2label, N)
    assert out == [207, 360]
    assert all(type(x) is int for x in out)
    assert resolve_label_ids(torch.tensor([5], dtype=torch.int32), id2label, N) == [5]
    assert resolve_label_ids([torch.tensor(8), "otter"], id2label, N) == [8, 360]


def test_resolve_ids_without_id2label() -> None:
    assert resolve_label_ids([0, 3, "4"], None, 10) == [0, 3, 4]
    assert resolve_label_ids(torch.tensor([9]), {}, 10) == [9]


def test_resolve_custom_id2label_str_keys() -> None:
    assert resolve_label_ids(["Cat", "dog"], {"0": "cat, kitty", "1": "dog"}, 2) == [0, 1]


# ----------------------------------------------------------------------------- resolve: errors


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), [1, True], torch.tensor([True]), np.array([True])])
def test_bool_rejected(id2label: dict[int, str], bad: object) -> None:
    with pytest.raises(TypeError, match="bool"):
        resolve_label_ids(bad, id2label, N)


@pytest.mark.parametrize(
    "bad",
    [
        3.0,
        2.5,
        np.float32(3.0),
        [1, 3.0],
        None,
        [None],
        {207},
        {"a": 1},
        b"otter",
        [[1, 2]],
        torch.tensor([1.0, 2.0]),
        torch.tensor(3.0),
        np.array([1.0, 2.0]),
        np.array([1, 2.5], dtype=object),
    ],
)
def test_bad_types_rejected(id2label: dict[int, str], bad: object) -> None:
    with pytest.raises(TypeError, match="must be an int, a str, or a list"):
        resolve_label_ids(bad, id2label, N)


@pytest.mark.parametrize("bad", [-1, N, N + 5, [0, N], "1000", "-1", np.int64(N), torch.tensor([0, -3])])
def test_out_of_range(id2label: dict[int, str], bad: object) -> None:
    with pytest.raises(ValueError, match=r"out of range; valid class ids are 0\.\.999") as exc:
        resolve_label_ids(bad, id2label, N)
    assert "id 1000 is the null (unconditional) class, not a class" in str(exc.value)


def test_out_of_range_small_num_classes() -> None:
    with pytest.raises(ValueError, match=r"valid class ids are 0\.\.9 .*id 10 is the null"):
        resolve_label_ids(10, None, 10)


@pytest.mark.parametrize("bad", [[], (), np.array([], dtype=np.int64), torch.tensor([], dtype=torch.long)])
def test_empty_inputs(id2label: dict[int, str], bad: object) -> None:
    with pytest.raises(ValueError, match="empty"):
        resolve_label_ids(bad, id2label, N)


@pytest.mark.parametrize("bad", ["", "   ", ["otter", " "]])
def test_empty_string(id2label: dict[int, str], bad: object) -> None:
    with pytest.raises(ValueError, match="empty class name"):
        resolve_label_ids(bad, id2label, N)


@pytest.mark.parametrize("bad", [np.zeros((2, 2), dtype=np.int64), torch.zeros(1, 3, dtype=torch.long)])
def test_2d_rejected(id2label: dict[int, str], bad: object) -> None:
    with pytest.raises(ValueError, match="0-d or 1-d"):
        resolve_label_ids(bad, id2label, N)


@pytest.mark.parametrize("empty_map", [None, {}])
def test_names_without_id2label(empty_map: dict | None) -> None:
    with pytest.raises(ValueError, match=r"has no id2label.*pass integer class ids"):
        resolve_label_ids("otter", empty_map, N)
    with pytest.raises(ValueError, match="has no id2label"):
        resolve_label_ids([1, "otter"], empty_map, N)


def test_unknown_name_suggests_close_matches(id2label: dict[int, str]) -> None:
    with pytest.raises(ValueError, match=r"unknown class name 'golden retreiver'.*'golden retriever'"):
        resolve_label_ids("golden retreiver", id2label, N)
    with pytest.raises(ValueError, match=r"closest matches: .*'goldfish'"):
        resolve_label_ids(["otter", "Goldfsh"], id2label, N)


def test_unknown_name_at_most_five_suggestions(id2label: dict[int, str]) -> None:
    with pytest.raises(ValueError, match="closest matches") as exc:
        resolve_label_ids("terrier", id2label, N)
    suggestions = str(exc.value).split("closest matches: ", 1)[1]
    assert 1 <= suggestions.count("'") // 2 <= 5


def test_unknown_name_no_close_match(id2label: dict[int, str]) -> None:
    with pytest.raises(ValueError, match="unknown class name 'qqqqzzzzxxxx'; no close match"):
        resolve_label_ids("qqqqzzzzxxxx", id2label, N)


def test_error_names_position(id2label: dict[int, str]) -> None:
    with pytest.raises(ValueError, match=r"labels\[2\]"):
        resolve_label_ids([0, 1, "not a real class xyz"], id2label, N)


@pytest.mark.parametrize("bad", [0, -1, True, 10.0])
def test_bad_num_classes(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        resolve_label_ids(0, None, bad)  # type: ignore[arg-type]

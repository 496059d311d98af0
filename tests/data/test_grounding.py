"""qwenvl/data/grounding.py: boxes and points parsed from answers, placed in each family's coordinate frame."""

from __future__ import annotations

import pytest

from qwenvl.data.grounding import Grounding, parse_grounding, place
from qwenvl.models import family_for


def test_token_boxes_with_and_without_labels_in_order():
    text = ("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|> and "
            "<|box_start|>(5, 6), (7.5, 8)<|box_end|>; later {\"bbox_2d\": [9, 10, 11, 12], \"label\": \"dog\"}")
    assert parse_grounding(text) == [
        Grounding("the cat", (1.0, 2.0, 30.0, 40.0), "(1,2),(30,40)"),
        Grounding("", (5.0, 6.0, 7.5, 8.0), "(5, 6), (7.5, 8)"),
        Grounding("dog", (9.0, 10.0, 11.0, 12.0), '"bbox_2d": [9, 10, 11, 12]'),
    ]


def test_json_boxes_and_points_of_the_cookbooks():
    text = '```json\n[\n  {"bbox_2d": [100, 200, 300, 400], "label": "a \\"b\\""},\n  {"point_2d": [50, 60]}\n]\n```'
    found = parse_grounding(text)
    assert [(g.label, g.coords, g.is_box) for g in found] == [('a \\"b\\"', (100.0, 200.0, 300.0, 400.0), True),
                                                               ("", (50.0, 60.0), False)]
    assert parse_grounding('{"bbox_2d": [1, 2, 3]} plain text (1,2),(3,4)') == []  # 3 numbers; no box tokens


@pytest.mark.parametrize("model_type,expected", [
    ("qwen2_5_vl", (100.0, 50.0, 200.0, 150.0)),  # absolute pixels of the resized image
    ("qwen2_vl", (64.0, 24.0, 128.0, 72.0)),  # 0-1000 relative of 640x480
    ("qwen3_vl", (64.0, 24.0, 128.0, 72.0)),
    ("qwen3_vl_moe", (64.0, 24.0, 128.0, 72.0)),
])
def test_place_in_the_family_frame(model_type, expected):
    box = parse_grounding("<|box_start|>(100,50),(200,150)<|box_end|>")
    placed = place(box, family_for(model_type), 640, 480)
    assert placed[0].pixels == pytest.approx(expected) and placed[0].problem == ""


def test_outside_and_inverted_boxes_are_flagged():
    family = family_for("qwen3_vl")
    found = parse_grounding('{"bbox_2d": [0, 0, 1001, 10]} {"bbox_2d": [500, 10, 400, 20]} {"point_2d": [-1, 5]}')
    assert [p.problem for p in place(found, family, 640, 480)] == [
        "outside the 640x480 image", "empty or inverted box (x2 <= x1 or y2 <= y1)", "outside the 640x480 image"]
    assert family.grounding_frame() == "relative 0-1000 of the image"
    assert family_for("qwen2_5_vl").grounding_frame() == "absolute pixels of the resized image"

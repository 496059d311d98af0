"""tools/preview.py: the page (boxes, learned spans, token counts, frames, counts) against the training item."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from qwenvl.data import data_dict
from qwenvl.data.chat import IGNORE_INDEX
from qwenvl.data.data_qwen import make_supervised_data_module
from qwenvl.data.validation import check_record
from qwenvl.data.video import probe_video, sample_frame_indices
from qwenvl.data.vision import VisionConfig, patchify
from qwenvl.models import family_for
from qwenvl.models.loading import load_image_processor
from qwenvl.train.argument import DataArguments
from tools.preview import main, unpatchify

DEMO = Path(data_dict["demo_grounding"]["data_path"])
MAX_PIXELS = 64 * 28 * 28  # demo images shrink to 252x168: several demo boxes fall outside
MAX_LENGTH = 200
BOX = re.compile(r"\((\d+),(\d+)\),\((\d+),(\d+)\)")


def turn(speaker: str, text: str) -> dict:
    return {"from": speaker, "value": text}


def user_records() -> list[dict]:
    """0: one box inside and one outside the 252x168 image; 1: missing image; 2: tag mismatch; 3: cut answer."""
    image = str(DEMO / "images" / "red_circle.jpg")  # 320x240 -> 252x168 at MAX_PIXELS
    boxes = ("<|object_ref_start|>in<|object_ref_end|><|box_start|>(10,20),(100,120)<|box_end|> and "
             "<|object_ref_start|>out<|object_ref_end|><|box_start|>(200,100),(300,160)<|box_end|>")
    return [
        {"image": image, "conversations": [turn("human", "<image>\nWhere?"), turn("gpt", boxes)]},
        {"image": "no/such/image.jpg", "conversations": [turn("human", "<image>\nWhat?"), turn("gpt", "x")]},
        {"image": image, "conversations": [turn("human", "no tag"), turn("gpt", "y")]},
        {"conversations": [turn("human", "Count."), turn("gpt", " ".join(str(n) for n in range(400)))]},
    ]


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    text: str = ""
    children: list["Node"] = field(default_factory=list)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def find(self, tag: str, cls: str | None = None) -> list["Node"]:
        found = []
        for child in self.children:
            if child.tag == tag and (cls is None or cls in child.classes()):
                found.append(child)
            found.extend(child.find(tag, cls))
        return found


class PageParser(HTMLParser):
    """The page as a tree of nodes (text kept per node, entities decoded)."""

    VOID = {"meta", "img", "br", "image", "line", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self.stack[-1].tag != tag:
            self.stack.pop()
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].text += data


def parse_page(path: Path) -> Node:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.root


@pytest.fixture(scope="module")
def qwen25_page(tiny_model_dir, tmp_path_factory):
    """The page of demo_grounding, demo_video and the user file, and training's dataset of the same inputs."""
    folder = tmp_path_factory.mktemp("preview")
    annotation = folder / "user.json"
    annotation.write_text(json.dumps(user_records()))
    out = folder / "preview.html"
    inputs = ["demo_grounding", "demo_video", str(annotation)]
    status = main([*inputs, "--model_name_or_path", str(tiny_model_dir), "--max_pixels", str(MAX_PIXELS),
                   "--model_max_length", str(MAX_LENGTH), "--out", str(out), "--image_format", "png"])
    cfg = VisionConfig.from_image_processor(load_image_processor(str(tiny_model_dir)), 16 * 28 * 28, MAX_PIXELS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def dataset(model_max_length: int):
        args = DataArguments(dataset_use=",".join(inputs), max_pixels=MAX_PIXELS, bad_sample_policy="skip")
        return make_supervised_data_module(tokenizer, args, cfg, model_max_length=model_max_length)["train_dataset"]

    return {"status": status, "page": parse_page(out), "html": out.read_text(), "dataset": dataset(MAX_LENGTH),
            "uncut": dataset(100_000), "tokenizer": tokenizer, "annotation": annotation}


def sections(page: Node) -> dict[int, Node]:
    return {int(s.attrs["data-position"]): s for s in page.find("section", "sample")}


def test_counts_and_bad_samples(qwen25_page):
    page, dataset = qwen25_page["page"], qwen25_page["dataset"]
    assert qwen25_page["status"] == 1  # bad samples found
    shown = sections(page)
    assert sorted(shown) == list(range(7 + 4 + 4))  # every sample (fewer than --samples 20 per input)
    bad = {p: s for p, s in shown.items() if s.attrs["data-status"] == "bad"}
    assert {p: s.find("p", "problem")[0].attrs["data-kind"] for p, s in bad.items()} == \
        {12: "missing_media", 13: "tag_mismatch"}
    counts = page.find("p")[[n.attrs.get("id") for n in page.find("p")].index("counts")]
    assert (counts.attrs["data-shown"], counts.attrs["data-bad-shown"], counts.attrs["data-bad"]) == ("15", "2", "2")
    rows = {r.attrs["data-label"]: r.attrs for r in page.find("tr", "input")}
    assert [(r["data-records"], r["data-kept"], r["data-bad"], r["data-shown"]) for r in rows.values()] == \
        [("7", "7", "0", "7"), ("4", "4", "0", "4"), ("4", "4", "2", "4")]
    listed = [(r.attrs["data-kind"], r.attrs["data-index"]) for r in page.find("tr", "bad-sample")]
    assert listed == [("missing_media", "1"), ("tag_mismatch", "2")]
    assert all(isinstance(dataset[p], dict) for p in shown if p not in bad)  # the item training builds


def test_images_are_the_items_pixels_with_their_token_counts(qwen25_page, tiny_model_dir):
    page, dataset = qwen25_page["page"], qwen25_page["dataset"]
    cfg = dataset.vision_config
    pad = dataset.encoder.image_pad_id
    checked = 0
    for position, section in sections(page).items():
        figures = section.find("figure", "image")
        item = dataset[position]
        if not isinstance(item, dict) or "image_grid_thw" not in item:
            assert not figures
            continue
        grids = item["image_grid_thw"].tolist()
        assert [f.attrs["data-grid"] for f in figures] == [",".join(map(str, g)) for g in grids]
        assert [int(f.attrs["data-tokens"]) for f in figures] == [t * h * w // 4 for t, h, w in grids]
        assert sum(int(f.attrs["data-tokens"]) for f in figures) == int((item["input_ids"] == pad).sum())
        assert [f.attrs["data-size"] for f in figures] == [f"{w * 14}x{h * 14}" for _, h, w in grids]
        checked += len(figures)
    assert checked == 7 + 1 + 1  # grounding, the video+image sample, the user's boxes
    # the inlined PNG is the item's pixels exactly
    figure = sections(page)[0].find("figure", "image")[0]
    uri = figure.find("image")[0].attrs["href"]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    item = dataset[0]
    again, _ = patchify(shown[None], cfg)
    np.testing.assert_allclose(again, item["pixel_values"].numpy(), atol=1e-5)


def test_boxes_are_the_answers_boxes_in_resized_pixels_and_outside_ones_are_flagged(qwen25_page):
    page, dataset = qwen25_page["page"], qwen25_page["dataset"]
    drawn_total = 0
    for position, section in sections(page).items():
        item = dataset[position]
        if not isinstance(item, dict) or "image_grid_thw" not in item:
            continue
        answers = [text for role, text in _turns(dataset, position) if role == "assistant"]
        written = [tuple(float(v) for v in m) for text in answers for m in BOX.findall(text)]
        rects = section.find("rect", "box")
        drawn = [tuple(float(v) for v in r.attrs["data-pixels"].split()) for r in rects]
        assert drawn == written  # Qwen2.5-VL: absolute pixels of the resized image, scale 1
        _, h, w = item["image_grid_thw"].tolist()[-1]
        width, height = w * 14, h * 14
        for rect, (x1, y1, x2, y2) in zip(rects, written):
            outside = max(x1, x2) > width or max(y1, y2) > height
            assert ("outside" in rect.classes()) == outside
            assert rect.attrs["data-problem"] == (f"outside the {width}x{height} image" if outside else "")
            assert float(rect.attrs["width"]) == pytest.approx(x2 - x1, abs=1e-3)
        drawn_total += len(drawn)
    assert drawn_total == 8 + 2  # demo_grounding writes 8 boxes (one sample has two), the user file 2
    user = sections(page)[11].find("rect", "box")
    assert [("outside" in r.classes()) for r in user] == [False, True]
    assert "⚠ out (200,100),(300,160): outside the 252x168 image" in qwen25_page["html"]


def _turns(dataset, position):
    ref = dataset.refs[position]
    return check_record(dataset.records[position], ref.annotation_path, ref.index).conversation.turns


def test_learned_spans_and_cut_text_are_the_items(qwen25_page):
    page, dataset, uncut, tokenizer = (qwen25_page[k] for k in ("page", "dataset", "uncut", "tokenizer"))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for position, section in sections(page).items():
        item = dataset[position]
        if not isinstance(item, dict):
            continue
        ids, labels = item["input_ids"].numpy(), item["labels"].numpy()
        spans = section.find("span", "tok")
        learned = "".join(s.text for s in spans if "learned" in s.classes() and "cut" not in s.classes())
        assert learned == decode(ids[labels != IGNORE_INDEX].tolist())
        full = uncut[position]["input_ids"].numpy()
        cut = "".join(s.text for s in spans if "cut" in s.classes())
        assert cut == decode(full[len(ids):].tolist())
        meta = section.find("p", "meta")[0].attrs
        assert (int(meta["data-length"]), int(meta["data-full-length"])) == (len(ids), len(full))
        pads = sum(int(s.attrs["data-tokens"]) for s in section.find("span", "pad"))
        assert pads == int(((ids == dataset.encoder.image_pad_id) | (ids == dataset.encoder.video_pad_id)).sum())
    cut_sample = sections(page)[14]
    assert cut_sample.attrs["data-status"] == "cut" and cut_sample.find("span", "cut")


def test_video_frames_are_the_loaders_with_their_times(qwen25_page):
    page, dataset = qwen25_page["page"], qwen25_page["dataset"]
    args = dataset.data_args
    for position in range(7, 11):  # demo_video
        item = dataset[position]
        videos = [v for v in sections(page)[position].find("figure", "video")]
        ref = dataset.refs[position]
        sources = dataset.records[position]["video"]
        sources = sources if isinstance(sources, list) else [sources]
        assert len(videos) == len(sources)
        for number, (figure, source) in enumerate(zip(videos, sources)):
            meta = probe_video(source, ref.data_path)
            indices = sample_frame_indices(meta.num_frames, meta.fps, args.base_interval, args.video_min_frames,
                                           args.video_max_frames)
            frames = figure.find("figure", "frame")
            assert [int(f.attrs["data-frame"]) for f in frames] == indices.tolist()
            assert [float(f.attrs["data-seconds"]) for f in frames] == pytest.approx(indices / meta.fps, abs=1e-3)
            t, h, w = item["video_grid_thw"].tolist()[number]
            assert figure.attrs["data-grid"] == f"{t},{h},{w}" and int(figure.attrs["data-tokens"]) == t * h * w // 4
    chips = [s.text for s in sections(page)[9].find("span", "pad")]  # two videos, one block each (Qwen2.5-VL)
    assert [c.split(":")[0] for c in chips] == ["[video 0 block 0", "[video 1 block 0"]


def test_page_is_self_contained(qwen25_page):
    text = qwen25_page["html"]
    assert "<script" not in text
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"] * text.count("xmlns=")
    assert text.count('href="data:image/png;base64,') == 9


def test_qwen3_boxes_are_relative_1000(tiny_qwen3_model_dir, tmp_path):
    out = tmp_path / "p.html"
    assert main(["demo_grounding", "--model_name_or_path", str(tiny_qwen3_model_dir), "--samples", "3",
                 "--count", "shown", "--out", str(out)]) == 0
    page = parse_page(out)
    records = json.loads(Path(data_dict["demo_grounding"]["annotation_path"]).read_text())
    shown = sections(page)
    assert sorted(shown) == [0, 1, 2]
    for position, section in shown.items():
        figure = section.find("figure", "image")[0]
        width, height = (int(v) for v in figure.attrs["data-size"].split("x"))
        _, h, w = (int(v) for v in figure.attrs["data-grid"].split(","))
        assert (width, height) == (w * 16, h * 16)
        written = [tuple(float(v) for v in m) for t in records[position]["conversations"] if t["from"] == "gpt"
                   for m in BOX.findall(t["value"])]
        drawn = [tuple(float(v) for v in r.attrs["data-pixels"].split()) for r in section.find("rect", "box")]
        expected = [(x1 * width / 1000, y1 * height / 1000, x2 * width / 1000, y2 * height / 1000)
                    for x1, y1, x2, y2 in written]
        assert drawn == [pytest.approx(box, abs=1e-3) for box in expected]
    assert family_for("qwen3_vl").grounding_frame() in out.read_text()


@pytest.mark.parametrize("patch,shape", [(14, (1, 56, 84, 3)), (16, (3, 64, 32, 3))])
def test_unpatchify_inverts_patchify(patch, shape):
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    cfg = VisionConfig(patch_size=patch)
    pixel_values, grid = patchify(frames, cfg)
    back = unpatchify(pixel_values, grid, cfg)
    padded = np.concatenate([frames, frames[-1:]]) if shape[0] % 2 else frames
    assert (back == padded).all()
    with pytest.raises(ValueError, match=r"expected pixel values of shape \(5, 1176\) for grid \(1, 1, 5\)"):
        unpatchify(np.zeros((4, 1176), np.float32), (1, 1, 5), VisionConfig())

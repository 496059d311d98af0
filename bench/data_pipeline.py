"""Data pipeline throughput: samples/s of ``dataset[i]`` and where the time goes.

Single process, one thread, default max_pixels (576*28*28), synthetic
demo-like single-image samples (JPEG photos-like noise + shapes, ~600 tokens).
The baseline column is transformers' own Qwen2VLImageProcessorPil doing the
image part, measured in the same run.

    python bench/data_pipeline.py [--samples 200] [--size 640x640]

The video line does the same for the demo video samples (decord, or the backend
QWENVL_VIDEO_BACKEND names). The last table compares the families: ``dataset[i]`` of the
same image and video samples under Qwen2.5-VL and Qwen3-VL (each with its tiny checkpoint's
processor config, the same pixel flags), per sample and per token, then every HF-processor family
registered in ``qwenvl.models.FAMILIES`` (``uses_processor_items``: LLaVA & co., each with its tiny
checkpoint's processor) on the same image samples: a family added to the registry gets its row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_samples(folder: Path, count: int, width: int, height: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
        ImageDraw.Draw(image).ellipse((width // 4, height // 4, width // 2, height // 2), fill=(200, 30, 30))
        image.save(folder / f"{i}.jpg", quality=90)
        question = "Describe the picture in detail, mention every object, its colour and where it is. " * 2
        answer = "The picture shows a red circle in the upper left quarter on a blurred colourful background. " * 3
        records.append({"image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    annotation = folder / "bench.json"
    annotation.write_text(json.dumps(records))
    return annotation


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeat`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def family_rows(tmp_path: Path, rounds: int) -> list[tuple[str, str, float, float]]:
    """(family, samples, ms per sample, tokens per sample) of ``dataset[i]`` for Qwen2.5-VL and Qwen3-VL, then for
    every registered HF-processor family on the image samples (``processor_family_rows``)."""
    from transformers import AutoTokenizer

    from qwenvl.data.data_qwen import LazySupervisedDataset
    from qwenvl.data.vision import VisionConfig
    from qwenvl.models import family_for
    from qwenvl.models.loading import load_image_processor
    from qwenvl.train.argument import DataArguments
    from tools.build_tiny_model import build_tiny_model

    rows = []
    for model_type in ("qwen2_5_vl", "qwen3_vl"):
        folder = build_tiny_model(tmp_path / f"family_{model_type}", model_type=model_type)
        family = family_for(model_type)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for label, use in (("image", "bench_images"), ("video", "demo_video")):
            args = DataArguments(dataset_use=use)
            cfg = VisionConfig.from_image_processor(load_image_processor(str(folder)), args.min_pixels,
                                                    args.max_pixels)
            dataset = LazySupervisedDataset(tokenizer, args, cfg, model_max_length=16384, family=family,
                                            vision_settings=family.vision_settings(folder))
            dataset[0]
            repeat = rounds if label == "video" else 1
            start = time.perf_counter()
            tokens = sum(len(dataset[i]["input_ids"]) for _ in range(repeat) for i in range(len(dataset)))
            seconds = time.perf_counter() - start
            count = repeat * len(dataset)
            rows.append((model_type, label, seconds / count * 1e3, tokens / count))
    return rows + processor_family_rows(tmp_path)


def processor_family_rows(tmp_path: Path) -> list[tuple[str, str, float, float]]:
    """``family_rows`` of every HF-processor family in ``FAMILIES`` on the image samples: ``dataset[i]`` through
    its tiny checkpoint's processor (``family.load_processor``, ``ProcessorItemBuilder``), as training builds its items. A family
    whose processor cannot be built here (an optional package missing, e.g. torchvision) gets a row saying why
    (samples ``skipped``, NaN times)."""
    from qwenvl.data.data_qwen import LazySupervisedDataset
    from qwenvl.models import FAMILIES
    from qwenvl.train.argument import DataArguments
    from tools.build_tiny_model import build_tiny_model

    rows = []
    for model_type, family in FAMILIES.items():
        if not family.uses_processor_items:
            continue
        try:
            folder = build_tiny_model(tmp_path / f"family_{model_type}", model_type=model_type)
        except (ImportError, NotImplementedError) as exc:
            print(f"{model_type}: no tiny checkpoint here ({exc})", file=sys.stderr)
            rows.append((model_type, "skipped", float("nan"), float("nan")))
            continue
        processor = family.load_processor(folder)  # without torchvision: the image-text processor
        args = DataArguments(dataset_use="bench_images")
        dataset = LazySupervisedDataset(processor.tokenizer, args, family.vision_defaults.image_config(),
                                        model_max_length=16384, family=family, processor=processor)
        dataset[0]
        start = time.perf_counter()
        tokens = sum(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
        seconds = time.perf_counter() - start
        rows.append((model_type, "image", seconds / len(dataset) * 1e3, tokens / len(dataset)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--size", default="640x640", help="WIDTHxHEIGHT of the synthetic images")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))

    import numpy as np
    import torch
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.set_num_threads(1)
    import qwenvl.data as registry
    from qwenvl.data.data_qwen import LazySupervisedDataset, parse_conversation
    from qwenvl.data.rope2d import get_rope_index_25
    from qwenvl.data.vision import VisionConfig, num_vision_tokens, open_image, patchify, smart_resize
    from qwenvl.train.argument import DataArguments
    from tools.build_tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = build_tiny_model(tmp_path / "model")
        annotation = make_samples(tmp_path, args.samples, width, height)
        registry.data_dict["bench_images"] = {"annotation_path": str(annotation), "data_path": tmp}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        data_args = DataArguments(dataset_use="bench_images")
        cfg = VisionConfig(min_pixels=data_args.min_pixels, max_pixels=data_args.max_pixels)
        dataset = LazySupervisedDataset(tokenizer, data_args, cfg, model_max_length=8192)
        dataset[0]  # warm up caches (LUT, tokenizer)

        start = time.perf_counter()
        lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        total = time.perf_counter() - start
        per_sample = total / len(dataset)

        # stage breakdown on the same samples
        stages = {"decode": [], "resize": [], "normalise+patchify": [], "tokenise": [], "rope": []}
        reference = Qwen2VLImageProcessorPil(min_pixels=data_args.min_pixels, max_pixels=data_args.max_pixels)
        reference_times = []
        for i, record in enumerate(dataset.records):
            t0 = time.perf_counter()
            image = open_image(record["image"], tmp)
            t1 = time.perf_counter()
            h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
            resized = image.resize((w, h), Image.Resampling.BICUBIC)
            t2 = time.perf_counter()
            _, grid = patchify(np.asarray(resized)[None], cfg)
            t3 = time.perf_counter()
            ids, _ = dataset.encoder.encode(parse_conversation(record), [num_vision_tokens(grid, 2)], [])
            t4 = time.perf_counter()
            get_rope_index_25(2, torch.from_numpy(ids)[None], image_grid_thw=torch.tensor([grid]))
            t5 = time.perf_counter()
            reference(images=[image], return_tensors="np")
            t6 = time.perf_counter()
            for key, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                stages[key].append(value)
            reference_times.append(t6 - t5)

        # Video samples: demo/video.json (one or two clips, one with an image too), end to end, and the
        # share of load_video (probe + decode + resize + patchify); bench/video_pipeline.py splits it further.
        from qwenvl.data.video import load_video

        video_dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use="demo_video"), cfg,
                                              model_max_length=8192)
        video_dataset[0]
        rounds = max(1, args.samples // len(video_dataset))
        start = time.perf_counter()
        for _ in range(rounds):
            for i in range(len(video_dataset)):
                video_dataset[i]
        video_item = (time.perf_counter() - start) / (rounds * len(video_dataset))
        clips = [(c, ref.data_path) for record, ref in zip(video_dataset.records, video_dataset.refs)
                 for c in ([record["video"]] if isinstance(record["video"], str) else record["video"])]
        start = time.perf_counter()
        for _ in range(rounds):
            for clip, folder in clips:
                load_video(clip, folder, video_dataset.data_args, cfg)
        video_load = (time.perf_counter() - start) / (rounds * len(clips))
        families = family_rows(tmp_path, rounds)

    print(f"{len(lengths)} samples, {width}x{height} JPEG, max_pixels {data_args.max_pixels}, "
          f"median {int(statistics.median(lengths))} tokens, torch threads 1\n")
    print("| stage                      | ms / sample | share |")
    print("|----------------------------|-------------|-------|")
    stage_total = sum(sum(v) for v in stages.values()) / len(lengths)
    for key, values in stages.items():
        mean = sum(values) / len(values)
        print(f"| {key:<26} | {mean * 1e3:11.2f} | {100 * mean / stage_total:4.0f}% |")
    print(f"| {'sum of stages':<26} | {stage_total * 1e3:11.2f} |       |")
    print(f"| {'dataset[i] end to end':<26} | {per_sample * 1e3:11.2f} |       |")
    ref = sum(reference_times) / len(reference_times)
    ours_image = (sum(stages["resize"]) + sum(stages["normalise+patchify"])) / len(lengths)
    print(f"\nimage processing (resize+normalise+patchify): ours {ours_image * 1e3:.2f} ms, "
          f"transformers Qwen2VLImageProcessorPil {ref * 1e3:.2f} ms (ratio {ref / ours_image:.2f}x)")
    print(f"throughput: {1 / per_sample:.1f} samples/s on one core")
    print(f"\nvideo (demo/video.json, {len(clips) / len(video_dataset):.2f} clips per sample): "
          f"dataset[i] {video_item * 1e3:.2f} ms ({1 / video_item:.1f} samples/s); load_video {video_load * 1e3:.2f} ms "
          f"per clip ({1 / video_load:.1f} clips/s, {100 * video_load * len(clips) / len(video_dataset) / video_item:.0f}% "
          f"of dataset[i])")
    print("\n| family          | samples | ms / sample | samples / s / core | tokens / sample | us / token |")
    print("|-----------------|---------|-------------|--------------------|-----------------|------------|")
    for model_type, label, ms, tokens in families:
        print(f"| {model_type:<15} | {label:<7} | {ms:11.2f} | {1e3 / ms:18.1f} | {tokens:15.0f} | "
              f"{ms * 1e3 / tokens:10.2f} |".replace("nan", "  -"))


if __name__ == "__main__":
    main()

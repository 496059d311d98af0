"""Answer with a fine-tuned Qwen-VL folder and score exact-match accuracy against the reference answers.

The folder is what ``train_qwen.py`` wrote: a full checkpoint, or a LoRA
adapter (``adapter_config.json``) that is loaded on its base model and merged.
Prompts are built by the same code that builds training samples (``encode_sample``,
``process_image``, ``load_video_plan``, the family's position ids), ending with the assistant prefix
the chat template adds for generation, so the model sees at inference exactly
the format it was trained on (AutoProcessor is not needed: it does not load
without torchvision). Decoding is greedy.

An HF-processor family (LLaVA & co.) is prompted through its processor as training builds its items: its
chat template with the generation prompt (earlier answers closed as in training), images through
``processor(text=..., images=...)``; the pixel flags do not apply there.

For an annotation file each sample is asked everything up to its last answer;
that answer is the reference. A prediction matches when it equals the
reference after stripping surrounding whitespace (``--ignore_case`` also folds
case). Special tokens in answers (grounding boxes) are kept.

Usage:
    python tools/infer.py --model output/demo --annotation demo/single_image.json --data_path demo
    python tools/infer.py --model output/lora --dataset demo_single_image,demo_grounding --output preds.jsonl
    python tools/infer.py --model output/demo --image demo/images/red_circle.jpg --prompt "What shape is this?"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python tools/infer.py` from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from qwenvl.data.chat import (  # noqa: E402
    IMAGE_TAG,
    ChatEncoder,
    Conversation,
    parse_conversation,
    sample_images,
    sample_videos,
)
from qwenvl.data.hf_items import (  # noqa: E402
    answer_spans,
    close_answers,
    conversation_messages,
    prefix_lm_turns,
    render,
)
from qwenvl.data.media_settings import read_media_settings  # noqa: E402
from qwenvl.data.video import load_video_plan  # noqa: E402
from qwenvl.data.vision import VisionConfig, num_vision_tokens, open_image, process_image  # noqa: E402
from qwenvl.models import VisionSettings, family_for  # noqa: E402
from qwenvl.models.loading import load_image_processor  # noqa: E402
from qwenvl.train.argument import DataArguments, PixelCount  # noqa: E402
from tools.common import (  # noqa: E402
    MEDIA_FLAGS,
    ROW_FLAGS,
    ToolInput,
    add_config_flag,
    add_media_flags,
    add_row_flags,
    parse_tool_args,
    resolve_inputs,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Training's settings this tool takes from --config files (media flags: over what the model folder saved).
CONFIG_KEYS = ("dataset_use", "eval_dataset_use", "seed", *MEDIA_FLAGS, *ROW_FLAGS)


@dataclass
class Prediction:
    """One answered sample."""

    source: str  # dataset name or annotation file
    index: int  # position in the annotation file
    prediction: str
    reference: str | None

    def matches(self, ignore_case: bool = False) -> bool:
        """Exact match after stripping whitespace (and folding case with ``ignore_case``)."""
        if self.reference is None:
            return False
        a, b = self.prediction.strip(), self.reference.strip()
        return a.lower() == b.lower() if ignore_case else a == b


class Predictor:
    """A fine-tuned model with its tokenizer and image settings, ready to answer.

    Args:
        model: a loaded Qwen-VL model (any registered family).
        tokenizer: its tokenizer.
        vision_config: patch geometry, normalisation and pixel limits.
        data_args: video frame sampling (``DataArguments`` fields).
        settings: the checkpoint's processor settings (Qwen3-VL video defaults); None = released ones.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, vision_config: VisionConfig,
                 data_args: DataArguments | None = None, settings: VisionSettings | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vision_config = vision_config
        self.data_args = data_args or DataArguments(min_pixels=vision_config.min_pixels,
                                                    max_pixels=vision_config.max_pixels)
        self.family = family_for(model.config)
        self.settings = settings
        self.encoder = ChatEncoder(tokenizer, self.family)
        self.tokens_per_second = getattr(model.config.vision_config, "tokens_per_second", 2)
        self.generation_prefix = np.asarray(
            tokenizer(self.family.generation_prompt(), add_special_tokens=False)["input_ids"], dtype=np.int64)
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.encoder.im_end_id}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base_model: str | None = None,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        media: dict[str, Any] | None = None,
    ) -> "Predictor":
        """Load a training output folder (full or LoRA) with the media settings it was trained with: the pixel
        limits of its ``preprocessor_config.json`` and the rest of ``media_settings.json`` (resize mode, max
        size, video sampling; ``qwenvl/data/media_settings.py``).

        Args:
            path: the folder (``preprocessor_config.json`` and tokenizer files are read from it,
                else from the base model of a LoRA adapter).
            base_model: base checkpoint of a LoRA adapter (default: the one its config names).
            dtype: weight dtype.
            attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
            min_pixels: override the saved minimum pixel count per image.
            max_pixels: override the saved maximum pixel count per image.
            media: other media flags (``MEDIA_FLAGS``) overriding the saved ones; None values keep them.

        Returns:
            the Predictor.

        Raises:
            ValueError: a saved or given media setting that training would refuse.
        """
        from transformers import AutoTokenizer

        from qwenvl.train.lora import base_model_of, is_lora_folder, load_finetuned

        path = Path(path)
        model = load_finetuned(path, base_model=base_model, dtype=dtype, attn_implementation=attn_implementation)
        fallback = str(path)
        if is_lora_folder(path):
            fallback = base_model or base_model_of(path)
        if family_for(model.config).uses_processor_items:  # LLaVA & co.: the checkpoint's processor does it all
            flags = {"min_pixels": min_pixels, "max_pixels": max_pixels, **(media or {})}
            given = [name for name, value in flags.items() if value is not None]
            if given:
                print(f"note: {', '.join('--' + name for name in given)} not used: the "
                      f"{family_for(model.config).model_type} family's processor sizes images itself", file=sys.stderr)
            return ProcessorPredictor.from_model(model, fallback if not (path / "tokenizer_config.json").is_file()
                                                 else str(path))
        tokenizer_dir = str(path) if (path / "tokenizer_config.json").is_file() else fallback
        processor_dir = str(path) if (path / "preprocessor_config.json").is_file() else fallback
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        processor = load_image_processor(processor_dir)
        size = getattr(processor, "size", None) or {}
        saved_min = getattr(processor, "min_pixels", None) or size.get("shortest_edge")
        saved_max = getattr(processor, "max_pixels", None) or size.get("longest_edge")
        values = {**read_media_settings(processor_dir),
                  **{name: value for name, value in (media or {}).items() if value is not None},
                  "min_pixels": int(min_pixels or saved_min), "max_pixels": int(max_pixels or saved_max)}
        data_args = DataArguments(**values)
        vision_config = VisionConfig.from_image_processor(processor, data_args.min_pixels, data_args.max_pixels,
                                                          data_args.image_resize_mode, data_args.image_max_size)
        settings = family_for(model.config).vision_settings(processor_dir)
        return cls(model, tokenizer, vision_config, data_args=data_args, settings=settings)

    def encode_prompt(
        self,
        conversation: Conversation,
        images: Sequence[str] = (),
        videos: Sequence[str] = (),
        data_path: str = "",
    ) -> dict[str, Any]:
        """Model inputs for a conversation that ends with a user turn, plus the assistant prefix.

        Args:
            conversation: system prompt and turns (the last one from the user).
            images: image sources in ``<image>`` order (paths relative to ``data_path``, or base64).
            videos: video sources in ``<video>`` order.
            data_path: folder the media paths are relative to.

        Returns:
            ``input_ids`` (1, L), ``attention_mask`` (1, L), ``position_ids`` (4, 1, L)
            (row 0 text positions, rows 1-3 mrope), and ``pixel_values`` /
            ``image_grid_thw`` / ``pixel_values_videos`` / ``video_grid_thw`` /
            ``second_per_grid_ts`` where there is media.

        Raises:
            ValueError: the tags do not match the media, or the last turn is not the user's.
        """
        if not conversation.turns or conversation.turns[-1][0] != "user":
            raise ValueError("the prompt must end with a user turn")
        cfg = self.vision_config
        image_parts = [process_image(open_image(source, data_path), cfg) for source in images]
        video_parts = [load_video_plan(source, data_path, self.data_args, cfg, family=self.family,
                                       settings=self.settings) for source in videos]
        plans = [plan for _, plan in video_parts]
        ids = self._encode_open(conversation, image_parts, plans)
        input_ids = torch.from_numpy(np.concatenate([ids, self.generation_prefix]))[None]  # (1, L)
        image_grid = torch.tensor([g for _, g in image_parts], dtype=torch.long) if image_parts else None
        video_grid = torch.tensor([p.grid_thw for p in plans], dtype=torch.long) if plans else None
        seconds = [p.second_per_grid_t for p in plans]
        mrope, _ = self.family.position_ids(input_ids, self.encoder.token_ids, cfg.merge_size,
                                            image_grid_thw=image_grid, video_grid_thw=video_grid,
                                            second_per_grid_ts=seconds or None,
                                            tokens_per_second=self.tokens_per_second)  # (3, 1, L)
        text_positions = torch.arange(input_ids.shape[1])[None, None]  # (1, 1, L)
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": torch.cat([text_positions, mrope.to(torch.long)], dim=0),  # (4, 1, L)
            # What the model's own generation step needs to place new tokens (Qwen3-VL).
            "mm_token_type_ids": self.family.mm_token_type_ids(input_ids, self.encoder.token_ids),
        }
        dtype = next(self.model.parameters()).dtype
        if image_parts:
            inputs["pixel_values"] = torch.from_numpy(np.concatenate([p for p, _ in image_parts])).to(dtype)
            inputs["image_grid_thw"] = image_grid
        if video_parts:
            inputs["pixel_values_videos"] = torch.from_numpy(np.concatenate([p for p, _ in video_parts])).to(dtype)
            inputs["video_grid_thw"] = video_grid
            if self.family.uses_second_per_grid_ts:
                inputs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return inputs

    def _encode_open(self, conversation: Conversation, image_parts: list, plans: list) -> np.ndarray:
        """Token ids of a prompt that ends with a user turn: ``ChatEncoder.encode``, as training (no answer to learn, so
        no ``model_max_length`` or label check)."""
        cfg = self.vision_config
        ids, _ = self.encoder.encode(
            conversation,
            [num_vision_tokens(grid, cfg.merge_size) for _, grid in image_parts],
            [self.family.video_block_lengths(plan.grid_thw, cfg.merge_size) for plan in plans],
            [plan.timestamps for plan in plans],
        )
        return ids

    @torch.no_grad()
    def generate_ids(self, inputs: dict[str, Any], max_new_tokens: int = 128) -> list[int]:
        """Greedy answer token ids, cut before the first stop token (``<|im_end|>``, eos)."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        output = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        for position, token in enumerate(new_ids):
            if token in self.stop_ids:
                return new_ids[:position]
        return new_ids

    def answer(self, conversation: Conversation, images: Sequence[str] = (), videos: Sequence[str] = (),
               data_path: str = "", max_new_tokens: int = 128) -> str:
        """The model's answer to the conversation's last user turn (special tokens kept)."""
        ids = self.generate_ids(self.encode_prompt(conversation, images, videos, data_path), max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=False).strip()

    def answer_sample(self, sample: dict, data_path: str = "", max_new_tokens: int = 128) -> tuple[str, str]:
        """(prediction, reference) for an annotation sample: asked everything up to its last answer.

        Raises:
            ValueError: the conversation is malformed (see ``parse_conversation``).
        """
        conversation = parse_conversation(sample)
        reference = conversation.turns[-1][1]
        prompt = Conversation(conversation.system, conversation.turns[:-1])
        prediction = self.answer(prompt, sample_images(sample), sample_videos(sample), data_path, max_new_tokens)
        return prediction, reference


def prompt_text(processor: Any, messages: list[dict[str, Any]], end_of_turn: str | None, family: Any = None) -> str:
    """The checkpoint's chat template on ``messages`` (ending with a user turn) with the generation prompt, each
    earlier answer closed by ``end_of_turn`` exactly as training closes it (``qwenvl.data.hf_items.close_answers``
    with ``family.end_of_turn``: the tokenizer's eos for LLaVA), after ``family.fix_rendered`` where ``family``
    is given.

    Example:
        >>> prompt_text(llava_processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
        ...                                                                              "text": "What?"}]}])
        'USER: <image>\nWhat? ASSISTANT:'
    """
    text = render(processor, messages, add_generation_prompt=True)
    if not any(message["role"] == "assistant" for message in messages):
        return text
    rendered, spans = answer_spans(processor, messages)
    if not text.startswith(rendered):  # a template whose generation prompt rewrites the end: as rendered
        return text
    if family is not None:  # as training reads it (LLaVA-NeXT: a released template's <\s> closing answers is eos)
        fixed, spans = family.fix_rendered(rendered, spans, end_of_turn)
        text, rendered = fixed + text[len(rendered):], fixed
    closed, _ = close_answers(rendered, spans, end_of_turn)
    return closed + text[len(rendered):]


class ProcessorPredictor(Predictor):
    """A fine-tuned model of an HF-processor family (``family.uses_processor_items``: LLaVA & co.), ready to answer.

    The prompt is what training builds, with the generation prompt: the conversation as Hugging Face chat messages
    (``conversation_messages``), the checkpoint's chat template (``apply_chat_template(...,
    add_generation_prompt=True)``, earlier answers closed by the family's end-of-turn token as in training), then
    ``processor(text=..., images=...)`` for the token ids and pixel values. A prefix-LM family (``prefix_lm``:
    PaliGemma) is given its one prompt as the processor's prefix, as its processor is called for generation.
    Generation stops at the model's eos or the family's end-of-turn token.

    Args:
        model (torch.nn.Module): the loaded ``...ForConditionalGeneration``.
        processor (Any): its ``AutoProcessor``.
    """

    def __init__(self, model: torch.nn.Module, processor: Any):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.family = family_for(model.config)
        eos = model.generation_config.eos_token_id
        self.end_of_turn = self.family.end_of_turn(self.tokenizer)
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        if self.end_of_turn:
            self.stop_ids.add(self.tokenizer.convert_tokens_to_ids(self.end_of_turn))
        self.stop_ids.discard(None)

    @classmethod
    def from_model(cls, model: torch.nn.Module, processor_dir: str) -> "ProcessorPredictor":
        """The predictor of ``model`` with the processor saved in ``processor_dir`` (``family.load_processor``)."""
        return cls(model, family_for(model.config).load_processor(processor_dir))

    def encode_prompt(self, conversation: Conversation, images: Sequence[str] = (), videos: Sequence[str] = (),
                      data_path: str = "") -> dict[str, Any]:
        """Model inputs for a conversation that ends with a user turn, plus the generation prompt.

        Returns:
            what the processor returns (``input_ids`` (1, L), ``attention_mask`` (1, L), ``pixel_values``
            (n, 3, H, W) for LLaVA, ...), floating tensors in the model's dtype.

        Raises:
            ValueError: the tags do not match the images, a video, or the last turn is not the user's.
        """
        if not conversation.turns or conversation.turns[-1][0] != "user":
            raise ValueError("the prompt must end with a user turn")
        if videos:
            raise ValueError(f"the {self.family.model_type} family takes images only, but the prompt has "
                             f"{len(videos)} video(s)")
        tags = sum(text.count(IMAGE_TAG) for role, text in conversation.turns if role == "user")
        if tags != len(images):
            raise ValueError(f"{tags} {IMAGE_TAG} tag(s) in the conversation but {len(images)} image(s)")
        opened = [open_image(source, data_path) for source in images]
        if self.family.prefix_lm:  # one prompt, no chat template: the training prefix (no answer)
            prompt, _ = prefix_lm_turns(Conversation(conversation.system, [*conversation.turns, ("assistant", "")]),
                                        self.family.model_type)
            inputs = self.family.prefix_lm_inputs(self.processor, prompt, None, opened)
        else:
            text = prompt_text(self.processor, conversation_messages(conversation), self.end_of_turn, self.family)
            inputs = self.processor(text=[text], images=self.family.processor_images(opened), return_tensors="pt",
                                    **self.family.processor_kwargs())
        dtype = next(self.model.parameters()).dtype
        return {key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                for key, value in inputs.items()}


# ------------------------------------------------------------------- scoring
def accuracy_table(predictions: Sequence[Prediction], ignore_case: bool = False, width: int = 60) -> str:
    """A markdown table per sample, then exact-match accuracy per source and overall.

    Example:
        >>> print(accuracy_table([Prediction("a.json", 0, "Red", "Red"), Prediction("a.json", 1, "x", "Blue")]))
        | source | index | match | prediction | reference |
        |---|---|---|---|---|
        | a.json | 0 | yes | Red | Red |
        | a.json | 1 | no | x | Blue |
        <BLANKLINE>
        | source | samples | exact match | accuracy |
        |---|---|---|---|
        | a.json | 2 | 1 | 50.00% |
        | all | 2 | 1 | 50.00% |
    """
    def cell(text: str | None) -> str:
        text = "" if text is None else text.replace("\n", "\\n").replace("|", "\\|")
        return text if len(text) <= width else text[:width - 3] + "..."

    lines = ["| source | index | match | prediction | reference |", "|---|---|---|---|---|"]
    totals: dict[str, list[int]] = {}
    for p in predictions:
        hit = p.matches(ignore_case)
        lines.append(f"| {p.source} | {p.index} | {'yes' if hit else 'no'} | {cell(p.prediction)} | "
                     f"{cell(p.reference)} |")
        totals.setdefault(p.source, [0, 0])
        totals[p.source][0] += 1
        totals[p.source][1] += int(hit)
    lines += ["", "| source | samples | exact match | accuracy |", "|---|---|---|---|"]
    rows = list(totals.items()) + [("all", [len(predictions), sum(hit for _, hit in totals.values())])]
    for source, (count, hits) in rows:
        lines.append(f"| {source} | {count} | {hits} | {100.0 * hits / max(count, 1):.2f}% |")
    return "\n".join(lines)


def annotation_inputs(args: argparse.Namespace) -> list[ToolInput]:
    """The sources of --annotation or --dataset, resolved and opened as training does (``%N`` by --seed).

    Raises:
        ValueError: what ``resolve_sources`` and ``open_store`` raise (unknown name, unreadable file, ...),
            or a JSONL line that does not parse (naming the file and line).
    """
    if args.annotation:
        data_path = args.data_path if args.data_path is not None else str(Path(args.annotation).parent)
        inputs = resolve_inputs([args.annotation], data_path)
    else:
        inputs = resolve_inputs(args.dataset.split(","), args.data_path or "")
    for item in inputs:
        item.open(args.seed)
        item.store.check_bad_lines()  # a JSONL line that does not parse: "{path}:{line}: invalid JSON line: ..."
    return inputs


def main(argv: list[str] | None = None) -> list[Prediction]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="fine-tuned folder (full checkpoint or LoRA adapter)")
    parser.add_argument("--base_model", default=None, help="base of a LoRA adapter (default: from its config)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--annotation", help="annotation file (.json list or .jsonl)")
    what.add_argument("--dataset", help="what --dataset_use takes: registry names, annotation files, Hugging Face "
                                        "datasets (name%%N keeps a seeded N%%)")
    what.add_argument("--image", action="append", help="image for --prompt (repeat for several)")
    what.add_argument("--text_only", action="store_true", help="answer --prompt without media")
    parser.add_argument("--prompt", help="question for --image / --text_only (<image> tags added if missing)")
    parser.add_argument("--data_path", default=None, help="media folder of --annotation (default: its folder) or of "
                                                          "--dataset entries given by path")
    parser.add_argument("--max_samples", type=int, default=None, help="answer at most this many samples per source")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--ignore_case", action="store_true", help="compare answers case-insensitively")
    parser.add_argument("--output", default=None, help="write one JSON line per sample here")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--min_pixels", default=None, help="override the saved limit, e.g. 4*28*28")
    parser.add_argument("--max_pixels", default=None, help="override the saved limit, e.g. 576*28*28")
    parser.add_argument("--seed", type=int, default=42, help="seed of the name%%N subsets (as in training)")
    add_media_flags(parser, [name for name in MEDIA_FLAGS if name not in ("min_pixels", "max_pixels")], saved=True)
    add_row_flags(parser)
    add_config_flag(parser)
    args = parse_tool_args(parser, argv, CONFIG_KEYS)
    if not (args.annotation or args.dataset or args.image or args.text_only):
        use = args.config_settings.get("eval_dataset_use") or args.config_settings.get("dataset_use")
        if not use:
            parser.error("one of the arguments --annotation --dataset --image --text_only is required (or a "
                         "--config train file's eval_dataset_use / dataset_use)")
        args.dataset = use

    predictor = Predictor.from_pretrained(
        args.model, base_model=args.base_model, dtype=DTYPES[args.dtype], attn_implementation=args.attn_implementation,
        min_pixels=PixelCount(args.min_pixels) if args.min_pixels else None,
        max_pixels=PixelCount(args.max_pixels) if args.max_pixels else None,
        media={name: getattr(args, name) for name in MEDIA_FLAGS if name not in ("min_pixels", "max_pixels")},
    )
    if args.image or args.text_only:
        if not args.prompt:
            parser.error("--image / --text_only need --prompt")
        images = args.image or []
        prompt = args.prompt
        missing = len(images) - prompt.count(IMAGE_TAG)
        if missing > 0:
            prompt = IMAGE_TAG * missing + "\n" + prompt
        answer = predictor.answer(Conversation(None, [("user", prompt)]), images, (), "", args.max_new_tokens)
        print(answer)
        return [Prediction("prompt", 0, answer, None)]

    predictions = []
    for item in annotation_inputs(args):
        source = Path(item.annotation_path).name if args.annotation else item.name
        for index in item.indices[:args.max_samples].tolist():
            try:
                prediction, reference = predictor.answer_sample(item.store[index], item.data_path,
                                                                args.max_new_tokens)
            except ValueError as exc:
                raise ValueError(f"{item.annotation_path}:{index}: {exc}") from None
            predictions.append(Prediction(source, index, prediction, reference))
    print(accuracy_table(predictions, ignore_case=args.ignore_case))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            for p in predictions:
                handle.write(json.dumps({"source": p.source, "index": p.index, "prediction": p.prediction,
                                         "reference": p.reference, "match": p.matches(args.ignore_case)},
                                        ensure_ascii=False) + "\n")
    return predictions


if __name__ == "__main__":
    main()

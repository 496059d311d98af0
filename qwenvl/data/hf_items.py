"""Record -> training example for the HF-processor families (``qwenvl/models/hf_family.py``, e.g. LLaVA).

The conversation becomes Hugging Face chat messages (each ``<image>`` tag an ``{"type": "image"}`` part, the
text between tags a text part), the checkpoint's chat template renders them
(``processor.apply_chat_template``), and ``processor(text=..., images=...)`` expands the image tokens and
makes the pixel values: the item holds exactly what the processor returns. Labels: the tokens of each
assistant turn as the template renders it (the answer and its end-of-turn token), found as character spans of
the rendered text (the text the template renders up to the open assistant turn, then up to the answer's end)
and mapped to tokens by their offsets. A template that closes answers without the tokenizer's eos gets it
inserted after each answer (``close_answers``): the model must learn to stop. ``LazySupervisedDataset.get_item`` calls ``ProcessorItemBuilder.build``
for these families.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qwenvl.data.chat import BAD_SAMPLES_KEY, IGNORE_INDEX, IMAGE_TAG, Conversation, Problem, SampleError, fit_max_length
from qwenvl.models import ModelFamily


def conversation_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """Hugging Face chat messages of a conversation: ``<image>`` tags become image parts, in place.

    The text around a tag is stripped of surrounding whitespace (the template writes the separator, e.g.
    LLaVA's ``<image>\\n``); empty pieces are dropped.

    Example:
        >>> conversation_messages(Conversation(None, [("user", "<image>\\nWhat?"), ("assistant", "A cat.")]))
        [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What?'}]},
         {'role': 'assistant', 'content': [{'type': 'text', 'text': 'A cat.'}]}]
    """
    messages: list[dict[str, Any]] = []
    if conversation.system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": conversation.system}]})
    for role, text in conversation.turns:
        content: list[dict[str, Any]] = []
        for number, piece in enumerate(text.split(IMAGE_TAG)):
            if number:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": content})
    return messages


def render(processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The checkpoint's chat template applied to ``messages`` (text, not tokens)."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_spans(processor: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it.

    A turn's span starts where the text rendered up to that turn with the generation prompt ends, and ends where
    the text rendered through that turn ends: the answer and whatever the template closes it with (eos).

    Returns:
        tuple[str, list[tuple[int, int]]]: the rendered text and (start, end) per assistant turn.

    Raises:
        ValueError: the template renders a conversation's beginning differently from the whole one (its
            answer spans cannot be found by prefix).
    """
    text = render(processor, messages)
    spans = []
    for number, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(processor, messages[:number], add_generation_prompt=True)
        through = render(processor, messages[:number + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template renders the start of a conversation differently from the whole "
                             "conversation; answer spans cannot be found")
        start = len(before) + (len(through[len(before):]) - len(through[len(before):].lstrip()))
        spans.append((start, len(through)))
    return text, spans


def close_answers(text: str, spans: list[tuple[int, int]], eos: str | None) -> tuple[str, list[tuple[int, int]]]:
    """Every answer ends with ``eos``: where the template closes an answer without it (the released llava-hf
    template writes ``answer + ' '``), ``eos`` is inserted right after the answer's last non-space character, so
    the model learns to stop, as LLaVA-1.5 was trained (``</s>`` after each answer).

    Args:
        text (str): the rendered conversation.
        spans (list[tuple[int, int]]): the assistant turns' character spans (``answer_spans``).
        eos (str | None): the tokenizer's eos token; None leaves the text as it is.

    Returns:
        tuple[str, list[tuple[int, int]]]: the text and the spans, each now ending right after its eos.

    Example:
        >>> close_answers("USER: hi ASSISTANT: yo USER: ok ASSISTANT: no ", [(19, 23), (42, 46)], "</s>")
        ('USER: hi ASSISTANT: yo</s> USER: ok ASSISTANT: no</s> ', [(19, 26), (46, 53)])
    """
    if not eos:
        return text, spans
    out, closed, shift, last = [], [], 0, 0
    for start, end in spans:
        answer = text[start:end].rstrip()
        stop = start + len(answer)
        if answer.endswith(eos):
            closed.append((start + shift, stop + shift))
            continue
        out.append(text[last:stop] + eos)
        last = stop
        closed.append((start + shift, stop + shift + len(eos)))
        shift += len(eos)
    out.append(text[last:])
    return "".join(out), closed


def collapse_runs(expanded: np.ndarray, plain: np.ndarray, image_id: int) -> np.ndarray:
    """How many tokens of ``expanded`` each token of ``plain`` became: 1, or the image run an image token became.

    Raises:
        ValueError: ``expanded`` is not ``plain`` with each image token repeated.
    """
    repeats = np.ones(len(plain), dtype=np.int64)
    where = np.flatnonzero(plain == image_id)
    if len(where):
        runs = np.split(np.flatnonzero(expanded == image_id), np.flatnonzero(np.diff(np.flatnonzero(
            expanded == image_id)) != 1) + 1)
        run_lengths = [len(r) for r in runs if len(r)]
        # adjacent image tokens in the text form one run: share it evenly
        groups = np.split(where, np.flatnonzero(np.diff(where) != 1) + 1)
        if len(groups) != len(run_lengths):
            raise ValueError(f"{len(groups)} image token group(s) in the text but {len(run_lengths)} in the "
                             f"processor's output")
        for group, length in zip(groups, run_lengths):
            repeats[group] = length // len(group)
    if not np.array_equal(np.repeat(plain, repeats), expanded):
        raise ValueError("the processor's token ids are not the text's with the image tokens expanded")
    return repeats


@dataclass
class ProcessorItemBuilder:
    """Builds one training example with the checkpoint's processor (see the module docstring).

    Args:
        processor (Any): ``AutoProcessor.from_pretrained(checkpoint)``.
        family (ModelFamily): the checkpoint's family (``uses_processor_items``).
        train_on_prompt (bool): learn every token but the image tokens (``--train_on_prompt``).
    """

    processor: Any
    family: ModelFamily
    train_on_prompt: bool = False

    def __post_init__(self) -> None:
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_id = self.family.tokens.image_id(self.tokenizer)

    def settings(self) -> dict[str, Any]:
        """What the encoding depends on besides the processor (cache key material)."""
        return {"model_type": self.family.model_type, "image_token_id": self.image_id,
                "train_on_prompt": self.train_on_prompt}

    def build(self, conversation: Conversation, images: Sequence[Any], model_max_length: int | None) -> dict[str, Any]:
        """The example: what ``processor(text=template(messages), images=images)`` returns, plus labels.

        Args:
            conversation (Conversation): from ``parse_conversation``.
            images (Sequence[Any]): PIL images, in tag order.
            model_max_length (int | None): longer examples are cut on text only (``fit_max_length``).

        Returns:
            dict[str, Any]: ``input_ids`` (L,), ``attention_mask`` (L,), ``labels`` (L,), and the processor's
            other outputs: per-token ones as (L,), the rest as returned (``pixel_values`` (n, 3, H, W)).

        Raises:
            SampleError: ``tag_mismatch`` (the processor's expansion does not fit the text), ``over_length``,
                ``no_labels``.
        """
        messages = conversation_messages(conversation)
        try:
            text, spans = close_answers(*answer_spans(self.processor, messages), self.tokenizer.eos_token)
            encoded = self.processor(text=[text], images=list(images) or None, return_tensors="pt",
                                     **self.family.processor_kwargs())
            plain = self.tokenizer([text], return_offsets_mapping=True)
            expanded = encoded["input_ids"][0].numpy()
            repeats = collapse_runs(expanded, np.asarray(plain["input_ids"][0]), self.image_id)
        except ValueError as exc:
            raise SampleError("tag_mismatch", str(exc)) from None
        offsets = np.asarray(plain["offset_mapping"][0]).reshape(-1, 2)
        plain_ids = np.asarray(plain["input_ids"][0])
        if self.train_on_prompt:
            learned = plain_ids != self.image_id
        else:
            learned = np.zeros(len(plain_ids), dtype=bool)
            for start, end in spans:  # every token with a character inside the turn's span
                learned |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        labels = np.where(np.repeat(learned, repeats), expanded, IGNORE_INDEX).astype(np.int64)
        input_ids, labels = fit_max_length(expanded.astype(np.int64), labels, self.image_id, model_max_length)
        length = len(input_ids)
        item: dict[str, Any] = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        for key, value in encoded.items():
            if key == "input_ids" or not isinstance(value, torch.Tensor):
                continue
            per_token = value.dim() == 2 and value.shape == encoded["input_ids"].shape
            item[key] = value[0, :length] if per_token else value
        return item


def per_token_keys(item: dict[str, Any]) -> list[str]:
    """Keys of an item that hold one value per token (padded by the collator), ``input_ids`` first."""
    length = len(item["input_ids"])
    return [key for key, value in item.items()
            if isinstance(value, torch.Tensor) and value.dim() == 1 and len(value) == length]


@dataclass
class ProcessorDataCollator:
    """Pad HF-processor items into one batch (right padding); other keys are concatenated on dim 0.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with -100, every other per-token key (the
    ``attention_mask``, ``token_type_ids``) with 0. Skipped bad samples are dropped and listed under
    ``batch["bad_samples"]``; when all are bad the batch is one pad token with nothing to learn
    (``num_items_in_batch`` 1, so its loss is 0).
    """

    pad_token_id: int
    family: ModelFamily | None = None  # how non-per-token keys are batched (``collate_media``); None: dim-0 concat

    def __call__(self, instances: Sequence[Any]) -> dict[str, Any]:
        problems = [x for x in instances if isinstance(x, Problem)]
        items = [x for x in instances if isinstance(x, dict)]
        if not items:
            batch: dict[str, Any] = {
                "input_ids": torch.full((1, 1), self.pad_token_id, dtype=torch.long),
                "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
                "attention_mask": torch.ones((1, 1), dtype=torch.long), "num_items_in_batch": 1,
            }
        else:
            longest = max(len(x["input_ids"]) for x in items)
            fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
            token_keys = per_token_keys(items[0])
            batch = {}
            for key in token_keys:
                padded = torch.full((len(items), longest), fill.get(key, 0), dtype=items[0][key].dtype)
                for row, x in enumerate(items):
                    padded[row, :len(x[key])] = x[key]
                batch[key] = padded
            for key in {k for x in items for k in x} - set(token_keys):
                present = [x[key] for x in items if x.get(key) is not None]
                batch[key] = (self.family.collate_media(key, present) if self.family is not None
                              else torch.cat(present, dim=0))
        if problems:
            batch[BAD_SAMPLES_KEY] = problems
        return batch

"""Record -> training example for the HF-processor families (``qwenvl/models/hf_family.py``, e.g. LLaVA).

The conversation becomes Hugging Face chat messages (each ``<image>`` tag an ``{"type": "image"}`` part, the
text between tags a text part), the checkpoint's chat template renders them
(``processor.apply_chat_template``), and ``processor(text=..., images=...)`` expands the image tokens and
makes the pixel values: the item holds exactly what the processor returns. Labels: the tokens of each
assistant turn as the template renders it (the answer and its end-of-turn token), found as character spans of
the rendered text (the text the template renders up to the open assistant turn, then up to the answer's end)
and mapped to tokens by their offsets. A template that closes answers without the tokenizer's eos gets it
inserted after each answer (``close_answers``): the model must learn to stop. ``LazySupervisedDataset.get_item``
calls ``ProcessorItemBuilder.build`` for these families.

A prefix-LM family (``family.prefix_lm``: PaliGemma) has no chat template: the sample's one prompt is the
processor's prefix and its one answer the suffix (``prefix_lm_turns``, ``family.prefix_lm_inputs``), and the
labels are the suffix tokens (``token_type_ids`` 1: the answer and its eos), as the processor marks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qwenvl.data.chat import BAD_SAMPLES_KEY, IGNORE_INDEX, IMAGE_TAG, Conversation, Problem, SampleError, fit_max_length
from qwenvl.models.hf_family import HFProcessorFamily


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

    A turn's span starts where the text rendered up to that turn with the generation prompt ends (where the
    template opens an answer turn otherwise than its generation prompt: at the answer's text, ``answer_start``),
    and ends where the text rendered through that turn ends: the answer and whatever the template closes it with.

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
        if through.startswith(before) and text.startswith(through):
            start = len(before) + (len(through[len(before):]) - len(through[len(before):].lstrip()))
        else:
            start = answer_start(processor, messages, number, through, text)
        spans.append((start, len(through)))
    return text, spans


def answer_start(processor: Any, messages: list[dict[str, Any]], number: int, through: str, text: str) -> int:
    """Where answer ``number`` starts when the template opens an answer turn otherwise than its generation prompt
    (the released LLaVA-OneVision one: ``<|im_start|>assistant \\n{answer}`` but ``<|im_start|>assistant\\n``):
    at the answer's first text in its turn, the turn being what ``through`` adds to the conversation before it.

    Raises:
        ValueError: the template renders a conversation's beginning differently from the whole one, or the turn
            does not hold the answer's text (its span cannot be found).
    """
    opened = render(processor, messages[:number])
    first = next((c["text"] for c in messages[number]["content"] if c.get("type") == "text"), "")
    at = through.find(first, len(opened)) if first and through.startswith(opened) and text.startswith(through) else -1
    if at < 0:
        raise ValueError("the chat template renders the start of a conversation differently from the whole "
                         "conversation; answer spans cannot be found")
    return at


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


def expand_spans(text: str, spans: list[tuple[int, int]],
                 replacements: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The text the processor tokenizes, the answer spans moved into it, and the span of each replacement.

    Args:
        text (str): the rendered conversation.
        spans (list[tuple[int, int]]): the answers' character spans in ``text``.
        replacements (list[dict[str, Any]]): one sample's ``text_replacement_offsets`` from the processor:
            ``span`` (the image token in ``text``), ``replacement`` (its text), ``new_span`` (where it lands).

    Returns:
        tuple[str, list[tuple[int, int]], list[tuple[int, int]]]: the expanded text, the spans in it, and the
        replacements' spans in it.

    Example:
        >>> expand_spans("a<i>b c", [(6, 7)], [{"span": (1, 4), "replacement": "[III]", "new_span": (1, 6)}])
        ('a[III]b c', [(8, 9)], [(1, 6)])
    """
    pieces, last, shifts = [], 0, []  # shifts: (end of a replacement in text, total shift after it)
    for replacement in replacements:
        start, end = replacement["span"]
        pieces += [text[last:start], replacement["replacement"]]
        last = end
        shifts.append((end, (shifts[-1][1] if shifts else 0) + len(replacement["replacement"]) - (end - start)))

    def move(position: int) -> int:
        return position + next((shift for end, shift in reversed(shifts) if end <= position), 0)

    expanded = "".join(pieces) + text[last:]
    return expanded, [(move(start), move(end)) for start, end in spans], [tuple(r["new_span"]) for r in replacements]


@dataclass
class ProcessorItemBuilder:
    """Builds one training example with the checkpoint's processor (see the module docstring).

    Args:
        processor (Any): ``family.load_processor(checkpoint)`` (``AutoProcessor``, or its image-text variant).
        family (HFProcessorFamily): the checkpoint's family (``uses_processor_items``).
        train_on_prompt (bool): learn every token but the image tokens (``--train_on_prompt``).
    """

    processor: Any
    family: HFProcessorFamily
    train_on_prompt: bool = False

    def __post_init__(self) -> None:
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_id = self.family.tokens.image_id(self.tokenizer)
        if self.train_on_prompt and self.family.prefix_lm:
            raise ValueError(f"--train_on_prompt True: not supported for the {self.family.model_type} family, a "
                             "prefix-LM: its prompt is attended bidirectionally, so each prompt token would see the "
                             "token it is to predict; train on the answers (--train_on_prompt False)")

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
        if self.family.prefix_lm:
            return self.build_prefix_lm(conversation, images, model_max_length)
        messages = conversation_messages(conversation)
        if self.family.expands_image_text:  # Gemma 3, InternVL, Idefics3: labels through the replacement offsets
            return self.build_expanded(messages, images, model_max_length)
        try:
            text, spans = self.rendered(messages)
            encoded = self.processor(text=[text], images=self.family.processor_images(images), return_tensors="pt",
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
            learned = touching(offsets, spans)
        labels = np.where(np.repeat(learned, repeats), expanded, IGNORE_INDEX).astype(np.int64)
        input_ids, labels = fit_max_length(expanded.astype(np.int64), labels, self.image_id, model_max_length)
        return item_from_encoded(encoded, input_ids, labels)

    def rendered(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The chat template's text of ``messages`` as the model is trained on it and its answers' character spans:
        ``answer_spans``, then the family's ``fix_rendered``, then every answer closed by its ``end_of_turn``
        (``close_answers``).

        Raises:
            ValueError: the answer spans cannot be found (``answer_spans``).
        """
        end_of_turn = self.family.end_of_turn(self.tokenizer)
        return close_answers(*self.family.fix_rendered(*answer_spans(self.processor, messages), end_of_turn),
                             end_of_turn)

    def build_prefix_lm(self, conversation: Conversation, images: Sequence[Any],
                        model_max_length: int | None) -> dict[str, Any]:
        """The example of a prefix-LM family (``family.prefix_lm``, PaliGemma): the user turn is the processor's
        prefix, the answer its suffix (``family.prefix_lm_inputs``); labels are the suffix tokens (token type 1:
        the answer and the eos the processor appends), as the processor marks them for training.

        Args:
            conversation (Conversation): one user turn and one assistant answer (``prefix_lm_turns``).
            images (Sequence[Any]): PIL images, in tag order.
            model_max_length (int | None): longer examples are cut at the end, never through the images.

        Returns:
            dict[str, Any]: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels`` (L,) and
            ``pixel_values`` (n, 3, H, W) when there are images.

        Raises:
            SampleError: ``unsupported_layout`` (a system turn, several turns), ``tag_mismatch``,
                ``over_length``, ``no_labels``.
        """
        prompt, answer = prefix_lm_turns(conversation, self.family.model_type)
        try:
            encoded = self.family.prefix_lm_inputs(self.processor, prompt, answer, list(images))
        except ValueError as exc:
            raise SampleError("tag_mismatch", str(exc)) from None
        input_ids = encoded["input_ids"][0].numpy().astype(np.int64)
        labels = np.where(encoded["token_type_ids"][0].numpy() == 1, input_ids, IGNORE_INDEX).astype(np.int64)
        input_ids, labels = fit_max_length(input_ids, labels, self.image_id, model_max_length)
        return item_from_encoded(encoded, input_ids, labels)

    def build_expanded(self, messages: list[dict[str, Any]], images: Sequence[Any],
                       model_max_length: int | None) -> dict[str, Any]:
        """The example of an ``expands_image_text`` family (Gemma 3), whose processor replaces each image token by
        a text (newlines, boi, soft tokens, eoi) that merges with the tokens around it: the answers' character
        spans are moved by the replacements before them (the processor's ``text_replacement_offsets``) and mapped
        to the processor's tokens by the offsets of the expanded text. The tokens of an image block are never
        learned, ``--train_on_prompt`` or not.

        Args:
            messages (list[dict[str, Any]]): ``conversation_messages`` of the sample.
            images (Sequence[Any]): PIL images, in tag order.
            model_max_length (int | None): longer examples are cut on text only, never before the last image
                block's end (``family.image_block_end``).

        Returns:
            dict[str, Any]: as ``build``.

        Raises:
            SampleError: ``tag_mismatch`` (the processor's ids are not its expanded text's), ``over_length``,
                ``no_labels``.
        """
        kwargs = self.family.processor_kwargs()
        try:
            text, spans = self.rendered(messages)
            encoded = self.processor(text=[text], images=self.family.processor_images(images), return_tensors="pt",
                                     return_text_replacement_offsets=True, **kwargs)
            replaced = encoded.pop("text_replacement_offsets", None)  # Idefics3: none without images; InternVL:
            if replaced is None or len(replaced) == 0:  # an empty (1, 0) tensor (its BatchFeature converts [[]])
                replaced = [[]]
            expanded_text, spans, blocks = expand_spans(text, spans, replaced[0])
            plain = self.tokenizer([expanded_text], return_offsets_mapping=True,
                                   add_special_tokens=kwargs.get("add_special_tokens", True))
            ids = encoded["input_ids"][0].numpy()
            if not np.array_equal(np.asarray(plain["input_ids"][0]), ids):
                raise ValueError("the processor's token ids are not those of its expanded text")
        except ValueError as exc:
            raise SampleError("tag_mismatch", str(exc)) from None
        offsets = np.asarray(plain["offset_mapping"][0]).reshape(-1, 2)
        learned = ((np.ones(len(ids), dtype=bool) if self.train_on_prompt else touching(offsets, spans))
                   & ~touching(offsets, blocks))
        labels = np.where(learned, ids, IGNORE_INDEX).astype(np.int64)
        block_end = self.tokenizer.convert_tokens_to_ids(self.family.image_block_end())
        input_ids, labels = fit_max_length(ids.astype(np.int64), labels, block_end, model_max_length)
        return item_from_encoded(encoded, input_ids, labels)


def touching(offsets: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens have a character inside one of ``ranges``.

    Args:
        offsets (np.ndarray): (tokens, 2) character (start, end) of each token.
        ranges (list[tuple[int, int]]): character (start, end) ranges.

    Returns:
        np.ndarray: (tokens,) bool.

    Example:
        >>> touching(np.array([[0, 2], [2, 5], [5, 6]]), [(3, 5)]).tolist()
        [False, True, False]
    """
    hit = np.zeros(len(offsets), dtype=bool)
    for start, end in ranges:
        hit |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    return hit


def item_from_encoded(encoded: dict[str, Any], input_ids: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The item of one processor call: ``input_ids`` and ``labels`` (cut to length by ``fit_max_length``), then
    the processor's other tensors: per-token ones (``attention_mask``, ``token_type_ids``) cut alike to (L,), the
    rest as returned (``pixel_values``, ``image_sizes`` ...). The processor's own ``labels`` (PaliGemma's) are
    replaced by ours.
    """
    length = len(input_ids)
    item: dict[str, Any] = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    for key, value in encoded.items():
        if key in ("input_ids", "labels") or not isinstance(value, torch.Tensor):
            continue
        per_token = value.dim() == 2 and value.shape == encoded["input_ids"].shape
        item[key] = value[0, :length] if per_token else value
    return item


def prefix_lm_turns(conversation: Conversation, model_type: str) -> tuple[str, str]:
    """The prompt (the user turn's text, its ``<image>`` tags removed) and the answer of a prefix-LM sample.

    A prefix-LM (PaliGemma) is trained on one prefix and one suffix: no system prompt, no chat history. The
    images go before the prompt whatever the tags' places (the processor's layout); the text pieces between
    tags are stripped and joined with one space.

    Args:
        conversation (Conversation): from ``parse_conversation``.
        model_type (str): the family, for the messages.

    Returns:
        tuple[str, str]: (prompt, answer).

    Raises:
        SampleError: ``unsupported_layout``, naming what the sample has.

    Example:
        >>> prefix_lm_turns(Conversation(None, [("user", "<image>\nWhat?"), ("assistant", "A cat.")]), "paligemma")
        ('What?', 'A cat.')
    """
    if conversation.system is not None:
        raise SampleError("unsupported_layout", f"a system turn, but the {model_type} family (a prefix-LM: one "
                                                f"prompt, one answer) has no system prompt")
    roles = [role for role, _ in conversation.turns]
    if roles != ["user", "assistant"]:
        raise SampleError("unsupported_layout", f"{len(roles)} turns ({', '.join(roles)}), but the {model_type} "
                                                f"family (a prefix-LM) takes one user prompt and one answer")
    pieces = (piece.strip() for piece in conversation.turns[0][1].split(IMAGE_TAG))
    return " ".join(piece for piece in pieces if piece), conversation.turns[1][1]


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
    family: HFProcessorFamily | None = None  # how non-per-token keys are batched (``collate_media``); None: concat

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
                present = ([x.get(key) for x in items] if self.family is not None and self.family.media_rows_per_item
                           else [x[key] for x in items if x.get(key) is not None])
                batch[key] = (self.family.collate_media(key, present) if self.family is not None
                              else torch.cat(present, dim=0))
        if problems:
            batch[BAD_SAMPLES_KEY] = problems
        return batch

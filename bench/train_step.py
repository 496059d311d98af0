"""Training-step throughput, peak memory and MFU: the model's own loss vs the chunked (or Liger) loss.

Each row trains a randomly initialised Qwen-VL for a few steps on synthetic
long-tail samples (50-1500 tokens, about half with one image of 16-256 image
tokens, the answer's tokens learned) in a fresh subprocess, so its peak memory
is its own. Every micro-batch holds exactly ``--tokens`` real tokens:

- ``padded``: the samples padded to the longest one (``DataCollatorForSupervisedDataset``);
- ``flattened``: the same samples in one row, 4-row position ids, no mask
  (``flatten_instances``, what ``--data_flatten`` and packing train).

Loss: ``model`` = the model's own loss (``model(**batch).loss``: full logits),
``chunked`` / ``liger`` = ``qwenvl.train.loss.compute_lm_loss``. Both are given
the batch's label count as ``num_items_in_batch``, as the Trainer does.

Shapes: ``tiny`` (tools/build_tiny_model.py: hidden 64, 2 layers, the real
151,936-token vocabulary; float32 on CPU) or the published configs of
Qwen2.5-VL-3B / -7B and Qwen3-VL-4B / -8B (numbers written below, nothing
downloaded; bf16 on a GPU, activation checkpointing, AdamW).

Columns: real tokens/s (pads excluded) and its ratio to the model's own loss in
the same mode and to the padded row with the same loss, both measured in the
same run; peak memory (CPU: peak RSS of the row's process, ``resource.getrusage``;
GPU: ``torch.cuda.max_memory_allocated``) and how many times less it is than the
model loss in the same mode; MFU on a GPU. A CPU row runs under an address-space
limit (``--mem_limit_gb`` above what the process held before its first step), so
a row that needs more fails with "OOM" instead of waking the kernel's OOM killer.

    python bench/train_step.py --steps 2 --warmup 0                       # CPU, tiny model, 4k/8k/16k
    python bench/train_step.py --shapes qwen2_5_vl_7b,qwen3_vl_8b --tokens 8192 --steps 8   # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MFU_FORMULA = ("MFU = (6 * N_llm * real_tokens + 12 * layers * heads * head_dim * sum(sample_len^2)) / step_time / "
               "peak FLOP/s; N_llm = parameters of the language model that multiply (decoder layers, final norm, "
               "lm_head; not the input embedding lookup); vision tower and merger excluded; attention counted "
               "without the causal halving; pads and activation recomputation not counted")

# Published configs (config.json of the Hugging Face checkpoints), special token ids included.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2_5_vl_3b": {
        "model_type": "qwen2_5_vl", "tie_word_embeddings": True,
        "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 128000,
                        "tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                            "rope_theta": 1000000.0}},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                          "tokens_per_second": 2, "hidden_act": "silu", "in_channels": 3},
    },
    "qwen2_5_vl_7b": {
        "model_type": "qwen2_5_vl", "tie_word_embeddings": False,
        "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 128000,
                        "tie_word_embeddings": False,
                        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                            "rope_theta": 1000000.0}},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                          "tokens_per_second": 2, "hidden_act": "silu", "in_channels": 3},
    },
    "qwen3_vl_4b": {
        "model_type": "qwen3_vl", "tie_word_embeddings": True,
        "text_config": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
                        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                        "max_position_embeddings": 262144, "attention_bias": False, "tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                            "mrope_interleaved": True, "rope_theta": 5000000.0}},
        "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                          "out_hidden_size": 2560, "patch_size": 16, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "num_position_embeddings": 2304,
                          "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh",
                          "in_channels": 3},
    },
    "qwen3_vl_8b": {
        "model_type": "qwen3_vl", "tie_word_embeddings": False,
        "text_config": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                        "max_position_embeddings": 262144, "attention_bias": False, "tie_word_embeddings": False,
                        "rope_parameters": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                            "mrope_interleaved": True, "rope_theta": 5000000.0}},
        "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                          "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "num_position_embeddings": 2304,
                          "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh",
                          "in_channels": 3},
    },
}
# Dense bf16 peak of the GPU (TFLOP/s), by a substring of its name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


# ------------------------------------------------------------------ the model
def build_config(shape: str, tiny_dir: str) -> Any:
    """The model config of a shape: the tiny checkpoint's, or one of ``SHAPES`` with its vision token ids
    looked up in the real Qwen tokenizer (the tiny checkpoint's) by the family."""
    import transformers

    from qwenvl.models import family_for

    if shape == "tiny":
        return transformers.AutoConfig.from_pretrained(tiny_dir)
    kwargs = json.loads(json.dumps(SHAPES[shape]))  # a deep copy
    model_type = kwargs.pop("model_type")
    ids = family_for(model_type).token_ids(transformers.AutoTokenizer.from_pretrained(tiny_dir))
    kwargs.update(image_token_id=ids.image_pad, video_token_id=ids.video_pad, vision_start_token_id=ids.vision_start,
                  vision_end_token_id=ids.vision_end)
    config_class = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen3_vl": transformers.Qwen3VLConfig}[model_type]
    return config_class(**kwargs)


def build_model(shape: str, tiny_dir: str, device: str, dtype: Any, attn: str) -> Any:
    """A randomly initialised model of ``shape`` on ``device`` (the tiny one: its saved random weights)."""
    import torch
    import transformers

    import qwenvl.train.attention  # noqa: F401  (registers sdpa_packed)
    from qwenvl.models.loading import model_class_for

    config = build_config(shape, tiny_dir)
    config.use_cache = False
    config.get_text_config().use_cache = False
    model_class = model_class_for(config)
    if shape == "tiny":
        model = model_class.from_pretrained(tiny_dir, config=config, dtype=dtype, attn_implementation=attn)
    else:
        with torch.device(device):
            model = model_class._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def llm_matmul_params(model: Any) -> int:
    """Parameters of the language model that take part in matmuls: all but the vision tower and the embedding lookup.

    With tied embeddings the shared matrix is lm_head's, so it counts once; untied, the input embedding is left out.
    """
    names = dict(model.named_parameters())  # tied parameters appear once
    total = sum(p.numel() for name, p in names.items() if ".visual." not in f".{name}")
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    return total - (0 if tied else embed.numel())


def step_flops(config: Any, n_params: int, sample_lengths: list[int]) -> float:
    """Model FLOPs of one training step (forward + backward), per ``MFU_FORMULA``."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention = 12 * text.num_hidden_layers * text.num_attention_heads * head_dim * sum(s * s for s in sample_lengths)
    return 6.0 * n_params * sum(sample_lengths) + attention


# ------------------------------------------------------------------- the data
def synthetic_items(config: Any, tokens: int, seed: int, ordinary: int) -> list[dict]:
    """Dataset-like items (input_ids, labels, position_ids, pixels) whose lengths sum to exactly ``tokens``.

    Lengths follow a long tail (log-normal around 300, clipped to 50-1500); about
    half the samples hold one image of 4x4 to 16x16 merged patches (16-256 tokens)
    after a short prompt; the last 40% of the text is the learned answer. The last
    sample is a text-only filler of whatever length is left. Text ids are drawn below ``ordinary``
    (the tokenizer's ordinary BPE vocabulary; special tokens come after it).
    """
    import numpy as np
    import torch

    from qwenvl.data.rope2d import get_rope_index_25

    rng = np.random.default_rng(seed)
    vision = config.vision_config
    merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    features = vision.in_channels * temporal * patch * patch
    items, used = [], 0
    while used < tokens:
        length = int(np.clip(rng.lognormal(math.log(300), 0.8), 50, 1500))
        grid = None
        if rng.random() < 0.5 and length >= 300:
            side_h, side_w = (int(x) * merge for x in rng.integers(4, 17, size=2))
            grid = (1, side_h, side_w)
            length = max(length, side_h * side_w // merge**2 + 40)
        if used + length > tokens:  # the filler: text only, exactly what is left
            length, grid = tokens - used, None
        image_tokens = grid[1] * grid[2] // merge**2 if grid else 0
        text = length - image_tokens - (2 if grid else 0)
        ids = torch.from_numpy(rng.integers(0, ordinary, size=length)).long()
        labels = torch.full((length,), -100, dtype=torch.long)
        answer = max(1, int(0.4 * text)) if length > 1 else 0
        if answer:
            labels[length - answer:] = ids[length - answer:]
        item: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if grid:
            start = min(8, text - answer)  # a short prompt, then the image
            ids[start] = config.vision_start_token_id
            ids[start + 1:start + 1 + image_tokens] = config.image_token_id
            ids[start + 1 + image_tokens] = config.vision_end_token_id
            item["pixel_values"] = torch.randn(grid[1] * grid[2], features)
            item["image_grid_thw"] = torch.tensor([grid])
        # Images only (one temporal step), so every family's rule gives these ids (SPEC 8).
        position_ids, _ = get_rope_index_25(merge, ids[None], item.get("image_grid_thw"),
                                            image_token_id=config.image_token_id,
                                            video_token_id=config.video_token_id,
                                            vision_start_token_id=config.vision_start_token_id)
        item["position_ids"] = position_ids[:, 0]  # (3, L)
        items.append(item)
        used += length
    return items


def collate(items: list[dict], mode: str, pad_token_id: int) -> dict:
    from qwenvl.data.data_qwen import DataCollatorForSupervisedDataset, flatten_instances

    if mode == "padded":
        return DataCollatorForSupervisedDataset(pad_token_id)(items)
    if mode == "flattened":
        return flatten_instances(items, pad_token_id)
    raise ValueError(f"mode should be one of 'padded' or 'flattened' but found {mode!r}")


# ----------------------------------------------------------------- one row
def _vm_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_row(row: dict) -> dict:
    """Train ``row["steps"]`` (+ warmup) steps in this process and measure them."""
    import torch
    import transformers

    from qwenvl.train.loss import compute_lm_loss

    torch.manual_seed(0)
    device = row["device"]
    cuda = device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(row["threads"])
    dtype = getattr(torch, row["dtype"])
    model = build_model(row["shape"], row["tiny_dir"], device, dtype, row["attn"])
    if row["checkpointing"]:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    config = model.config
    n_params = llm_matmul_params(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=True if cuda else None, foreach=None if cuda else False)
    pad_id = config.get_text_config().pad_token_id or 0
    ordinary = transformers.AutoTokenizer.from_pretrained(row["tiny_dir"]).vocab_size
    steps = []
    for step in range(row["warmup"] + row["steps"]):
        items = synthetic_items(config, row["tokens"], seed=step, ordinary=ordinary)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(items, row["mode"], pad_id).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        steps.append((batch, [len(x["input_ids"]) for x in items]))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:  # from here on, at most mem_limit_gb more address space: a failed allocation, not the OOM killer
        limit = _vm_size_bytes() + int(row["mem_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss_before = _rss_bytes()
    times, losses = [], []
    try:
        for index, (batch, _) in enumerate(steps):
            start = time.perf_counter()
            count = int((batch["labels"][..., 1:] != -100).sum())
            if row["loss"] == "model":
                loss = model(**batch, num_items_in_batch=count).loss
            else:
                loss, _ = compute_lm_loss(model, batch, count, impl=row["loss"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if index >= row["warmup"]:
                times.append(time.perf_counter() - start)
            losses.append(float(loss))
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        text = str(error)
        if isinstance(error, MemoryError) or "memory" in text.lower():
            return {"ok": False, "error": "OOM", "detail": text.splitlines()[0][:200]}
        raise
    measured = steps[row["warmup"]:]
    real_tokens = sum(sum(lengths) for _, lengths in measured)
    positions = sum(batch["input_ids"].numel() for batch, _ in measured)
    flops = sum(step_flops(config, n_params, lengths) for _, lengths in measured)
    result = {"ok": True, "seconds": sum(times), "tokens_per_s": real_tokens / sum(times),
              "pad_fraction": 1 - real_tokens / positions, "flops_per_s": flops / sum(times),
              "losses": losses, "n_params_llm": n_params}
    if cuda:
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["device_name"] = torch.cuda.get_device_name()
    else:
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        result["before_gb"] = rss_before / 2**30
    return result


def run_in_subprocess(row: dict, timeout: float) -> dict:
    """``run_row`` in a fresh Python process, so peak memory is the row's own."""
    env = dict(os.environ, OMP_NUM_THREADS=str(row["threads"]), TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([sys.executable, __file__, "--_row", json.dumps(row)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout {timeout:.0f}s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    error = "OOM (killed)" if done.returncode in (-9, 137) else f"exit {done.returncode}: {tail[0][:160]}"
    return {"ok": False, "error": error}


# ------------------------------------------------------------------ the table
def format_table(rows: list[dict], peak_tflops: float | None) -> str:
    """The result table; ratios against rows of the same shape and size measured in the same run."""

    def find(row: dict, **where: str) -> dict | None:
        match = {"shape": row["shape"], "tokens": row["tokens"], "mode": row["mode"], "loss": row["loss"], **where}
        return next((x["result"] for x in rows if all(x[k] == v for k, v in match.items())), None)

    def ratio(value: float, other: dict | None, key: str, invert: bool = False) -> str:
        if other is None:
            return "n/a"
        if not other["ok"]:
            return other["error"].split()[0]
        return f"{(other[key] / value) if invert else (value / other[key]):.2f}"

    header = ["shape", "mode", "tokens", "loss", "pad %", "tokens/s", "vs model loss", "vs padded", "peak GB",
              "less memory than model loss", "MFU"]
    lines = [header]
    for row in rows:
        r = row["result"]
        cells = [row["shape"], row["mode"], str(row["tokens"]), row["loss"]]
        if not r["ok"]:
            cpu_oom = r["error"] == "OOM" and not row["device"].startswith("cuda")
            lines.append(cells + ["", r["error"] + (f" > {row['mem_limit_gb']:g} GB" if cpu_oom else "")] + [""] * 5)
            continue
        model_row, padded_row = find(row, loss="model"), find(row, mode="padded")
        less = ratio(r["peak_gb"], model_row, "peak_gb", invert=True)
        if model_row and not model_row["ok"] and model_row["error"] == "OOM" and "before_gb" in r:
            # it needed more than what the process held before its first step + the limit: a lower bound
            less = f"> {(r['before_gb'] + row['mem_limit_gb']) / r['peak_gb']:.2f}"
        mfu = f"{100 * r['flops_per_s'] / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"
        lines.append(cells + [f"{100 * r['pad_fraction']:.0f}", f"{r['tokens_per_s']:,.0f}",
                              ratio(r["tokens_per_s"], model_row, "tokens_per_s"),
                              ratio(r["tokens_per_s"], padded_row, "tokens_per_s"), f"{r['peak_gb']:.2f}", less, mfu])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help="comma-separated: tiny, " + ", ".join(SHAPES)
                        + " (default: tiny on CPU, all real shapes on a GPU)")
    parser.add_argument("--tokens", default="4096,8192,16384", help="real tokens per micro-batch")
    parser.add_argument("--modes", default="padded,flattened")
    parser.add_argument("--losses", default=None, help="model,chunked (+ liger on CUDA when installed)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (GPU: allocator, kernels)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--attn", default=None, help="attention implementation (default: flash_attention_2 when "
                        "installed, else sdpa_packed, as training; also sdpa, eager)")
    parser.add_argument("--checkpointing", default=None, choices=("on", "off"),
                        help="activation checkpointing (default: on for real shapes, off for tiny)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per row")
    parser.add_argument("--mem_limit_gb", type=float, default=11.0,
                        help="CPU: address space a row may add to what it holds before its first step")
    parser.add_argument("--peak_tflops", type=float, default=None, help="GPU dense bf16 peak (default: by name)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    parser.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._row:
        print(json.dumps(run_row(json.loads(args._row))), flush=True)
        return

    import torch

    from qwenvl.train.loss import liger_available

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    shapes = (args.shapes or ("tiny" if not cuda else ",".join(SHAPES))).split(",")
    losses = (args.losses or ("model,chunked" + (",liger" if cuda and liger_available() else ""))).split(",")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.attn is None:
        from qwenvl.train.argument import _default_attn

        args.attn = _default_attn()
    peak_tflops = args.peak_tflops
    if cuda and peak_tflops is None:
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else os.cpu_count()} "
          f"{'' if cuda else 'CPUs'}), dtype {dtype}, attention {args.attn}, {args.steps} measured steps "
          f"after {args.warmup} warmup, {args.threads if not cuda else '-'} threads per CPU row", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from tools.build_tiny_model import build_tiny_model

        # The tiny checkpoint, also for the real shapes: its tokenizer (the real Qwen one) gives the token ids.
        tiny_dir = str(build_tiny_model(Path(tmp) / "tiny", model_type="qwen2_5_vl", seed=0))
        for shape in shapes:
            if shape != "tiny" and shape not in SHAPES:
                raise ValueError(f"shape should be tiny or one of {list(SHAPES)} but found {shape!r}")
            checkpointing = (args.checkpointing or ("off" if shape == "tiny" else "on")) == "on"
            for tokens in (int(t) for t in args.tokens.split(",")):
                for mode in args.modes.split(","):
                    for loss in losses:
                        row = {"shape": shape, "tokens": tokens, "mode": mode, "loss": loss, "device": device,
                               "dtype": dtype, "attn": args.attn, "checkpointing": checkpointing,
                               "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                               "mem_limit_gb": args.mem_limit_gb, "tiny_dir": tiny_dir}
                        start = time.perf_counter()
                        row["result"] = run_in_subprocess(row, args.timeout)
                        r = row["result"]
                        status = (f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gb']:.2f} GB, "
                                  f"loss {r['losses'][-1]:.4f}") if r["ok"] else r["error"]
                        print(f"  {shape} {mode} {tokens} {loss}: {status} ({time.perf_counter() - start:.0f}s)",
                              flush=True)
                        rows.append(row)
    print()
    print(format_table(rows, peak_tflops))
    print()
    print("ratios against rows of the same shape and tokens in this run: 'vs model loss' = tokens/s over the model's "
          "own loss in the same mode, 'vs padded' = over the padded row with the same loss, 'less memory' = the model "
          "loss row's peak over this row's ('> x': the model loss row ran out of its limit, a lower bound); "
          "pad % = padding positions of the micro-batch")
    if cuda:
        print(f"{MFU_FORMULA}; peak {peak_tflops} TFLOP/s")
    else:
        print("CPU peak memory: peak RSS of the row's process (model, optimizer, batch included)")


if __name__ == "__main__":
    main()

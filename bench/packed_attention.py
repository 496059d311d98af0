"""Flattened rows on sdpa: transformers' dense T x T mask vs ``sdpa_packed`` (per-sample SDPA, no mask).

    python bench/packed_attention.py                      # tiny Qwen2.5-VL, rows of 4k / 8k / 16k tokens
    python bench/packed_attention.py --tokens 4096 32768 --sample 1024

Each row of the table is measured in a fresh subprocess (so its peak RSS is its own): one
flattened row of ``--tokens`` text tokens made of samples of ``--sample`` tokens, forward and
backward through the language model (the backbone only: the logits are the same for both
paths and would dominate memory; bench/train_step.py measures the whole step). Ratios are
against the dense-mask ``sdpa`` row of the same length, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def run_row(model_dir: str, attn: str, tokens: int, sample: int, steps: int) -> dict:
    """Forward + backward of the backbone on one flattened row; seconds per step and peak RSS (child)."""
    import torch
    import transformers

    import qwenvl.train.attention  # noqa: F401  (registers sdpa_packed)

    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = model.config.text_config.use_cache = False
    backbone = model.model.language_model
    vocab = model.config.text_config.vocab_size
    input_ids = torch.randint(1000, vocab - 1000, (1, tokens))
    text = torch.cat([torch.arange(min(sample, tokens - start)) for start in range(0, tokens, sample)])[None]
    position_ids = torch.cat([text[None], text[None].expand(3, 1, -1)], dim=0)  # (4, 1, tokens)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        hidden.float().pow(2).mean().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"attn": attn, "tokens": tokens, "seconds": min(times[1:]), "peak_mb": peak / 1024,
            "growth_mb": (peak - rss_before) / 1024}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--sample", type=int, default=512, help="tokens per sample in the row")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", default=None, help="a Qwen2.5-VL folder (default: a tiny one built here)")
    parser.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._row:
        spec = json.loads(args._row)
        print(json.dumps(run_row(**spec)))
        return
    model_dir = args.model
    if model_dir is None:
        from tools.build_tiny_model import build_tiny_model

        model_dir = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", model_type="qwen2_5_vl"))
    rows = []
    for tokens in args.tokens:
        for attn in ("sdpa", "sdpa_packed"):
            spec = {"model_dir": model_dir, "attn": attn, "tokens": tokens, "sample": args.sample,
                    "steps": args.steps}
            done = subprocess.run([sys.executable, __file__, "--_row", json.dumps(spec)], capture_output=True,
                                  text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            if done.returncode != 0:
                rows.append({"attn": attn, "tokens": tokens, "error": done.stderr.strip().splitlines()[-1]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"one flattened row of samples of {args.sample} tokens, language model forward+backward, float32, "
          "1 thread")
    print(f"{'tokens':>7} {'attention':<12} {'s/step':>8} {'tokens/s':>9} {'vs sdpa':>8} {'peak MB':>8} "
          f"{'growth MB':>10} {'vs sdpa':>8}")
    baseline: dict[int, dict] = {}
    for row in rows:
        if "error" in row:
            print(f"{row['tokens']:>7} {row['attn']:<12} failed: {row['error']}")
            continue
        base = baseline.setdefault(row["tokens"], row)
        speed = row["tokens"] / row["seconds"]
        print(f"{row['tokens']:>7} {row['attn']:<12} {row['seconds']:>8.2f} {speed:>9.0f} "
              f"{base['seconds'] / row['seconds']:>7.2f}x {row['peak_mb']:>8.0f} {row['growth_mb']:>10.0f} "
              f"{row['growth_mb'] / max(base['growth_mb'], 1e-9):>7.2f}x")


if __name__ == "__main__":
    main()

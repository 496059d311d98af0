"""Training an HF-processor family (``family.uses_processor_items``; tested on the tiny LLaVA-1.5) like a Qwen one:
FSDP, DeepSpeed ZeRO-2 / ZeRO-3 with the dummy vision pass, LoRA and merging, the start-up summary's names.

Oracles, none of them the code under test:
- distributed runs: one process over the same global batches (2 samples per step; the 2-rank runs take 1 per
  rank, the Trainer's seeded sampler sharded by accelerate), 10 SGD steps in float32; its checkpoint after
  step 4 is what the 4-step FSDP (DDP on CPU) and ZeRO-2 runs must equal, its final weights what the 10-step
  ZeRO-3 run must equal, within 1e-5, and the per-step losses within 1e-5. The vision tower and the projector
  train, the LLM is frozen (half the step time; the LLM's training is LoRA's and the DDP test's in
  tests/models/test_llava_family.py);
- the dummy pass: the vision tower's calls counted by a forward pre-hook, a dummy told apart by its all-zero input;
- LoRA targets: the names of the LLM's projections written here from the config (layers x q/k/v/o/gate/up/down);
- merging: the unmerged peft model's logits.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from qwenvl.data.chat import Conversation
from qwenvl.models import LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.train.argument import ModelArguments, TrainingArguments
from qwenvl.train.lora import apply_lora, load_finetuned, lora_target_regex, modules_to_save, quantization_skip_modules
from qwenvl.train.train_qwen import train
from qwenvl.train.trainer import describe_trainable
from tests.conftest import PYTHON, REPO_ROOT, free_port, python_env
from tools.infer import Predictor

IMAGES = REPO_ROOT / "demo" / "images"
RUNS = {"fsdp": 4, "zero2": 4, "zero3": 10}  # ZeRO-3 records its module trace in step 1, checks it from step 2 on
ATOL = 1e-5
COMMON = ["--dataset_use", "demo_single_image,demo_text_only", "--use_cpu", "True", "--report_to", "none",
          "--learning_rate", "0.05", "--optim", "sgd", "--lr_scheduler_type", "constant", "--max_grad_norm", "0",
          "--weight_decay", "0", "--logging_steps", "1", "--model_max_length", "4096", "--tune_mm_llm", "False",
          "--tune_mm_mlp", "True", "--tune_mm_vision", "True", "--seed", "3", "--dataloader_num_workers", "0",
          # No --ddp_find_unused_parameters: the tower's last layer, which LLaVA never reads (vision_feature_layer
          # -2), is frozen at start-up (freeze_unread_vision), so DDP sees no unused parameter.
          "--attn_implementation", "sdpa"]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llava"), model_type="llava", seed=0)


@pytest.fixture(scope="module")
def oracle(llava_dir, tmp_path_factory) -> Path:
    """One process, 2 samples per step, 10 steps; checkpoint-4 holds the weights after step 4."""
    out = tmp_path_factory.mktemp("hf_oracle") / "one"
    train(["--model_name_or_path", str(llava_dir), *COMMON, "--max_steps", "10", "--per_device_train_batch_size", "2",
           "--save_strategy", "steps", "--save_steps", "4", "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def distributed(llava_dir, tmp_path_factory) -> tuple[Path, str]:
    """FSDP, ZeRO-2 and ZeRO-3 of 1 sample per rank in one torchrun launch of 2 CPU processes (gloo)."""
    root = tmp_path_factory.mktemp("hf_distributed")
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "tests/train/hf_family_driver.py", str(root), *(f"{name}={steps}" for name, steps in RUNS.items()),
               "--", "--model_name_or_path", str(llava_dir), *COMMON, "--per_device_train_batch_size", "1",
               "--ddp_backend", "gloo", "--save_strategy", "no"]
    env = python_env() | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    (root / "torchrun.log").write_text(log)
    assert result.returncode == 0, log[-6000:]
    return root, log


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of a saved folder as ``from_pretrained`` loads it (every weight found, none left over).

    Loaded rather than read from the file: under ZeRO-3 transformers writes the consolidated weights under other
    key names (``language_model.model.model.layers...``) that its loader maps back.
    """
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), (folder, info)
    return model.state_dict()


@pytest.mark.parametrize("run", list(RUNS))
def test_each_backend_trains_the_weights_of_one_process(distributed, oracle, llava_dir, run):
    root, _ = distributed
    steps = RUNS[run]
    reference = weights(oracle if steps == 10 else oracle / f"checkpoint-{steps}")
    trained, start = weights(root / run), weights(llava_dir)
    assert trained.keys() == reference.keys() == start.keys()
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], rtol=0, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    moved = {family_for("llava").classify_parameter(n) for n in start if not torch.equal(trained[n], start[n])}
    assert moved == {PROJECTOR, VISION_TOWER}  # the tower trains (so the dummy pass matters); the LLM is frozen
    assert losses(root / run) == pytest.approx(losses(oracle)[:steps], abs=ATOL, rel=0)


def test_a_text_only_rank_runs_the_tower_on_the_dummy_image(distributed):
    """Every micro-batch calls the tower exactly once on every rank: its images, or the dummy on a text-only one."""
    root, _ = distributed
    for run, steps in RUNS.items():
        ranks = json.loads((root / f"{run}.json").read_text())
        assert [rank["real"] + rank["dummy"] for rank in ranks] == [steps, steps], (run, ranks)
    zero3 = json.loads((root / "zero3.json").read_text())
    assert sum(rank["dummy"] for rank in zero3) >= 1 and sum(rank["real"] for rank in zero3) >= 1, zero3


def test_the_logs_name_the_family_s_modules_and_what_fsdp_became(distributed):
    _, log = distributed
    for line in ("model: ", "vision tower (vision_tower): blocks trainable [0] frozen [1]; patch_embed trainable",
                 "projector (multi_modal_projector): trainable",
                 "llm (language_model): layers trainable [] frozen [0, 1]; embed_tokens frozen; lm_head frozen",
                 "FSDP2 wraps ['CLIPEncoderLayer', 'CLIPVisionEmbeddings', 'Qwen2DecoderLayer']",
                 "--fsdp was requested but accelerate runs MULTI_CPU, not FSDP"):
        assert line in log, line
    summaries = re.findall(r"start-up summary\n((?:  .*\n)+)", log)
    assert len(summaries) == len(RUNS) and not any("merger" in summary for summary in summaries)
    assert re.findall(r"distributed: (\w+), 2 process\(es\)", log) == ["MULTI_CPU", "DEEPSPEED", "DEEPSPEED"]


# ------------------------------------------------------------------------ LoRA
def llm_projections(config) -> set[str]:
    """The LLM's linear projections, by hand from the config (the released LLaVA layout: model.language_model)."""
    names = set()
    for layer in range(config.text_config.num_hidden_layers):
        names |= {f"model.language_model.layers.{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names |= {f"model.language_model.layers.{layer}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    return names


def test_lora_targets_are_the_llm_s_linears_and_the_tune_flags_pick_the_rest(llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    expected = llm_projections(model.config)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert any(".vision_tower." in n and n.endswith("q_proj") for n in linears)  # same short names in the tower
    for targets in ("auto", "all-linear", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"):
        regex = lora_target_regex(model, targets)
        assert {name for name in linears if re.fullmatch(regex, name)} == expected, targets
    assert modules_to_save(model, tune_mm_mlp=False, tune_mm_vision=False) == []
    assert modules_to_save(model, tune_mm_mlp=True, tune_mm_vision=False) == ["model.multi_modal_projector"]
    assert modules_to_save(model, tune_mm_mlp=False, tune_mm_vision=True) == ["model.vision_tower"]
    assert modules_to_save(model, tune_mm_mlp=True, tune_mm_vision=True) == ["model.vision_tower",
                                                                            "model.multi_modal_projector"]
    # QLoRA (CUDA only) leaves the tower, the projector and lm_head unquantised: the names peft/bnb match
    assert quantization_skip_modules(model.config) == ["vision_tower", "multi_modal_projector", "lm_head"]
    assert {"model.vision_tower", "model.multi_modal_projector", "lm_head"} <= dict(model.named_modules()).keys()


def test_the_summary_of_a_lora_model_names_the_family_s_modules(llava_dir, tmp_path):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    peft_model = apply_lora(model, ModelArguments(tune_mm_mlp=True), TrainingArguments(
        output_dir=str(tmp_path), lora_enable=True, lora_r=4, use_cpu=True, report_to=[]))
    report = describe_trainable(peft_model)
    for line in ("vision tower (vision_tower): blocks trainable [] frozen [0, 1]; patch_embed frozen",
                 "projector (multi_modal_projector): trainable",
                 "llm (language_model): layers trainable [0, 1] frozen []; embed_tokens frozen; lm_head frozen"):
        assert line in report, report


@pytest.fixture(scope="module")
def lora_run(llava_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_lora") / "lora"
    train(["--model_name_or_path", str(llava_dir), "--dataset_use", "demo_single_image", "--use_cpu", "True",
           "--report_to", "none", "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "0.05",
           "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear",
           "--tune_mm_mlp", "True", "--model_max_length", "4096", "--save_strategy", "no", "--seed", "0",
           "--dataloader_num_workers", "0", "--output_dir", str(out)])
    return out


def test_lora_trains_the_llm_adapters_and_the_projector(lora_run, llava_dir):
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.multi_modal_projector"] and config["r"] == 4
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    adapted = {name for name, _ in model.named_modules() if re.fullmatch(config["target_modules"], name)}
    assert adapted == llm_projections(model.config)
    saved = load_file(lora_run / "adapter_model.safetensors")
    lora_modules = {re.sub(r"^base_model\.model\.|\.lora_[AB]\.weight$", "", k) for k in saved if ".lora_" in k}
    assert lora_modules == llm_projections(model.config)
    projector = {k for k in saved if ".multi_modal_projector." in k}
    assert projector and not any(".vision_tower." in k for k in saved)


def test_merged_lora_loads_with_the_auto_classes_and_equals_the_adapter(lora_run, llava_dir, tmp_path):
    from tools.merge_lora import main as merge_main

    merged_dir = merge_main(["--lora", str(lora_run), "--output_dir", str(tmp_path / "merged")])
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    assert isinstance(merged, LlavaForConditionalGeneration)
    assert processor.chat_template == AutoProcessor.from_pretrained(lora_run).chat_template
    unmerged = load_finetuned(lora_run, merge=False).eval()
    assert type(unmerged).__name__ == "PeftModelForCausalLM"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=[Image.open(IMAGES / "red_circle.jpg").convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, unmerged(**inputs).logits, rtol=0, atol=1e-5)
    start, after = LlavaForConditionalGeneration.from_pretrained(llava_dir).state_dict(), merged.state_dict()
    assert after.keys() == start.keys()
    moved = {name for name in start if not torch.equal(after[name], start[name])}
    assert {f"{m}.weight" for m in llm_projections(merged.config)} <= moved  # the adapters, folded in
    assert {family_for("llava").classify_parameter(name) for name in moved} == {LLM, PROJECTOR}  # tower frozen
    generated = merged.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated[0, :inputs["input_ids"].shape[1]], inputs["input_ids"][0])
    # tools/infer.py on the LoRA folder (merged on load) asks and answers as the merged checkpoint does
    predictor = Predictor.from_pretrained(lora_run)
    prompt = predictor.encode_prompt(Conversation(None, [("user", "<image>\nWhat shape is this?")]),
                                     [str(IMAGES / "red_circle.jpg")])
    assert torch.equal(prompt["input_ids"], inputs["input_ids"])
    free = merged.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    assert predictor.generate_ids(prompt, max_new_tokens=3) == (free[:free.index(eos)] if eos in free else free)

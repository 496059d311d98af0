"""qwenvl/train/guards.py: a run whose loss or weights stop being finite stops there, names its samples, saves no NaN.

Real runs through ``train_qwen.train(argv)`` (one process, CPU, tiny Qwen2.5-VL). The
NaN is injected by a test-only callback that writes NaN into ``lm_head`` at a chosen
moment (the model then really computes a NaN loss); it is added by a subclass of
``QwenVLTrainer`` that train_qwen builds in place of the real one. Two ranks stopping
together is tested in test_rank_sync.py (the ``nan_guard`` runs).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

import qwenvl.train.train_qwen as train_qwen
from qwenvl.data.data_qwen import DataCollatorForSupervisedDataset, LazySupervisedDataset
from qwenvl.data.data_qwen_packed import PackedSupervisedDataset
from qwenvl.data.vision import VisionConfig
from qwenvl.train.argument import DataArguments
from qwenvl.train.guards import SAMPLE_REFS_KEY, NonFiniteError, SampleRefsCollator, WithSampleRefs, describe_ref
from qwenvl.train.trainer import QwenVLTrainer

DATASETS = "demo_single_image,demo_text_only"
PIXELS = {"max_pixels": 16 * 28 * 28, "min_pixels": 4 * 28 * 28}


class PoisonLmHead(TrainerCallback):
    """Test-only: fill ``lm_head``'s first row with NaN at ``event`` of step ``step`` (1-based)."""

    def __init__(self, step: int, event: str):
        self.step, self.event = step, event

    def _poison(self, state, model) -> None:
        with torch.no_grad():
            model.lm_head.weight[0].fill_(float("nan"))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.event == "step_begin" and state.global_step + 1 == self.step:
            self._poison(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.event == "step_end" and state.global_step == self.step:
            self._poison(state, model)


def run_with_poison(monkeypatch, model_dir, output_dir, step: int, event: str) -> list[tuple[torch.Tensor, list]]:
    """``train()`` with ``PoisonLmHead(step, event)``; returns (input_ids, sample refs) of every micro-batch trained."""
    seen: list[tuple[torch.Tensor, list]] = []

    class PoisonedTrainer(QwenVLTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(PoisonLmHead(step, event))  # before train_qwen adds the guard

        def compute_loss(self, model, inputs, *args, **kwargs):
            seen.append((inputs["input_ids"].clone(), list(inputs.get(SAMPLE_REFS_KEY) or [])))
            return super().compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(train_qwen, "QwenVLTrainer", PoisonedTrainer)
    argv = ["--model_name_or_path", str(model_dir), "--dataset_use", DATASETS, "--output_dir", str(output_dir),
            "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "True",
            "--max_steps", "5", "--save_steps", "2", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "True",
            "--attn_implementation", "sdpa", "--dataloader_num_workers", "0", "--seed", "0",
            "--model_max_length", "1024", "--max_pixels", str(PIXELS["max_pixels"]),
            "--min_pixels", str(PIXELS["min_pixels"])]
    with pytest.raises(NonFiniteError) as error:
        train_qwen.train(argv)
    return seen, str(error.value)


def assert_no_non_finite_weights(output_dir) -> None:
    for path in output_dir.rglob("*.safetensors"):
        for name, tensor in load_file(path).items():
            assert torch.isfinite(tensor).all(), f"{path} {name} is not finite"


@pytest.mark.slow
def test_nan_loss_stops_the_run_at_that_step_and_names_the_samples_of_its_batch(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    output_dir = tmp_path / "out"
    seen, message = run_with_poison(monkeypatch, tiny_model_dir, output_dir, step=3, event="step_begin")
    assert len(seen) == 3, "stopped at step 3: no later batch was trained"
    input_ids, refs = seen[2]
    assert len(refs) == 2
    assert message.startswith("loss and gradient norm not finite at step 3 (gradient norm nan); stopped before the "
                              "optimizer step's result is saved, nothing non-finite was written. The step's batch:\n"
                              f"  rank 0: loss [nan]; samples: {describe_ref(refs[0])}, {describe_ref(refs[1])}\n")

    # The named samples are the batch: rebuilt from their file and index, collated, they give its input_ids.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vision = VisionConfig.from_image_processor(train_qwen.load_image_processor(str(tiny_model_dir)), **PIXELS)
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use=DATASETS, **PIXELS), vision,
                                    model_max_length=1024, seed=0)
    items = [dataset[dataset.refs.index(ref)] for ref in refs]
    expected = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)["input_ids"]
    assert torch.equal(input_ids, expected)

    # Nothing non-finite on disk: the step-2 checkpoint (before the NaN), no later one, no final model.
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (output_dir / "model.safetensors").exists()
    assert list(output_dir.rglob("*.safetensors"))
    assert_no_non_finite_weights(output_dir)


@pytest.mark.slow
def test_weights_turned_non_finite_by_an_update_are_never_checkpointed(tiny_model_dir, tmp_path, monkeypatch):
    """Finite loss and gradients, NaN weights after step 2's update: stopped before checkpoint-2 is written."""
    output_dir = tmp_path / "out"
    seen, message = run_with_poison(monkeypatch, tiny_model_dir, output_dir, step=2, event="step_end")
    assert len(seen) == 2
    assert message.startswith("weights not finite after step 2; stopped before saving the checkpoint, nothing "
                              "non-finite was written. The step's batch:\n  rank 0: loss [")
    assert "nan" not in message.splitlines()[1]  # step 2's loss itself was finite
    assert not list(output_dir.glob("checkpoint-*"))
    assert_no_non_finite_weights(output_dir)


def test_batches_name_their_samples_for_plain_and_packed_datasets(tokenizer, tmp_path):
    """``WithSampleRefs`` + ``SampleRefsCollator``: a packed group lists every sample with its place in the group."""
    import qwenvl.data as registry
    from tests.train.rank_sync_driver import PACK_GROUPS, PACK_NAME, register_pack, write_pack_file

    pack = write_pack_file(tmp_path / "mixed_pack.json")
    register_pack(pack)
    try:
        vision = VisionConfig(**PIXELS)
        packed = PackedSupervisedDataset(tokenizer, DataArguments(**PIXELS), vision, dataset_use=PACK_NAME)
        plain = LazySupervisedDataset(tokenizer, DataArguments(**PIXELS), vision, dataset_use="demo_text_only")
    finally:
        registry.data_dict.pop(PACK_NAME, None)
    group = 1  # two text samples: cheap to load
    assert [name for name, _ in PACK_GROUPS[group]] == ["demo_text_only", "demo_text_only"]
    batch = SampleRefsCollator(lambda items: {"n": len(items)})([WithSampleRefs(packed)[group],
                                                                 WithSampleRefs(plain)[5]])
    assert batch["n"] == 2
    assert [describe_ref(r) for r in batch[SAMPLE_REFS_KEY]] == [
        f"{pack}:{group} (sample 0 of the group)", f"{pack}:{group} (sample 1 of the group)",
        f"{plain.refs[5].annotation_path}:5"]
    assert len(WithSampleRefs(packed)) == len(packed) and WithSampleRefs(plain).lengths == plain.lengths

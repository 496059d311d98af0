"""Ranks holding different media stay in step for 10 optimizer steps, and train exactly like one process.

One torchrun launch (2 CPU processes, gloo; tests/train/rank_sync_driver.py) runs the
whole matrix one run after the other: DDP, DeepSpeed ZeRO-2 and ZeRO-3, each on
text+image, image+video and a packed file of mixed samples, plus ZeRO-3 with offload
(packed) and DDP with ``find_unused_parameters`` (text+image). Every run is 10 SGD
steps of the tiny Qwen2.5-VL, vision tower trainable; at most steps the two ranks
hold different media (text vs image, image vs video, an image and a video vs none,
the all-bad placeholder batch, packed rows).

Before the fix, ZeRO-3 failed at the first step after its module trace was
recorded ("Detected a disagreement on list length between rank0 and rank1"): the
dummy tower pass ran after DeepSpeed's hook on ``language_model`` (so a text-only
rank entered ``language_model`` before the tower, an image rank after it), and it
used the tower's unused ``last_hidden_state`` too (one more backward entry into the
tower than a real pass). With image+video it hung. A one-step run cannot see it: the
trace is recorded in step 1 and compared across ranks at the start of step 2.

The oracle is one process over the same global batches, its loss computed by hand from
the full logits (``step_loss``): at each step the token mean over both ranks' learned
tokens (``--loss_average token``, the default: one big batch), or, for the
``ddp_micro_batch`` run, the mean of the two micro-batch means (the original's
weighting: Qwen2.5-VL sets ``accepts_loss_kwargs = False``, so a plain Trainer averages
each micro-batch on its own); then one ``torch.optim.SGD`` step over the same per-module
groups (``build_parameter_groups``: the vision tower at ``VISION_TOWER_LR``).

Tolerance: float32, atol 1e-6, rtol 0. The distributed runs add the two ranks'
gradients in an all-reduce (DDP, ZeRO-2) or a reduce-scatter over flattened
partitions (ZeRO-3) instead of inside one backward pass, so sums of the same terms
are rounded in another order: a few ulps per step. Measured after 10 steps: DDP and
ZeRO-2 are bit-identical on text+image, every run is within 1.2e-7 (1 ulp of a
weight near 1.0). 1e-6 leaves 8x headroom; a rank training the wrong batch, or a
dummy pass leaking into the gradients, moves the weights by more than 1e-3 (the
vision tower moves by more than 1e-3 over the run, asserted below).
"""

from __future__ import annotations

import json
import subprocess

from safetensors.torch import load_file

import pytest
import torch

from qwenvl.train.trainer import build_parameter_groups, decay_parameter_names
from tests.conftest import PYTHON, REPO_ROOT, free_port, kill_tree, python_env
from tests.train.rank_sync_driver import (
    LEARNING_RATE,
    NAN_STEP,
    PACK_NAME,
    SCENARIOS,
    STEPS,
    VISION_TOWER_LR,
    batch_signature,
    collator,
    load_model,
    scenario_items,
    step_loss,
    write_pack_file,
)

DRIVER = REPO_ROOT / "tests" / "train" / "rank_sync_driver.py"
RUNS = [f"{backend}:{scenario}" for backend in ("ddp", "zero2", "zero3") for scenario in SCENARIOS]
RUNS += ["zero3_offload:packed", "ddp_find_unused:text_image", "ddp_micro_batch:text_image"]
GUARD_BACKENDS = ["ddp", "zero3"]  # + one run each with a NaN loss on rank 1 (qwenvl/train/guards.py)
ATOL = 1e-6
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def pack_file(tmp_path_factory):
    path = write_pack_file(tmp_path_factory.mktemp("rank_sync_pack") / "mixed_pack.json")
    yield path
    import qwenvl.data as registry

    registry.data_dict.pop(PACK_NAME, None)


@pytest.fixture(scope="module")
def launch(tiny_model_dir, pack_file, tmp_path_factory):
    """The whole matrix in one torchrun launch; returns the output folder."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("rank_sync")
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(DRIVER), str(tiny_model_dir), str(out), str(pack_file), *RUNS,
               *(f"{backend}:nan_guard" for backend in GUARD_BACKENDS), "ddp_default:unused_param"]
    env = python_env() | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                          "PYTHONWARNINGS": "ignore::FutureWarning"}  # DeepSpeed's all_gather_into_tensor, per call
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        done = sorted(p.stem for p in out.glob("*.json"))
        pytest.fail(f"torchrun hung (over {TIMEOUT_S} s): ranks out of step; finished runs: {done}")
    (out / "torchrun.log").write_text(log)
    assert process.returncode == 0, log[-6000:]
    return out


@pytest.fixture(scope="module")
def items(tiny_model_dir, pack_file) -> dict[str, list]:
    return {scenario: scenario_items(str(tiny_model_dir), scenario, pack_file) for scenario in SCENARIOS}


def average_of(backend: str) -> str:
    return "micro_batch" if backend == "ddp_micro_batch" else "token"


@pytest.fixture(scope="module")
def references(tiny_model_dir, items) -> dict[tuple[str, str], tuple[dict, dict]]:
    """Per (scenario, loss average): trainable parameters before and after STEPS steps of one process over the same
    global batches."""
    out = {}
    wanted = {(run.split(":")[1], average_of(run.split(":")[0])) for run in RUNS}
    for scenario, average in sorted(wanted):
        scenario_list = items[scenario]
        model = load_model(str(tiny_model_dir))
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        before = {name: p.detach().clone() for name, p in trainable.items()}
        groups = build_parameter_groups(model.named_parameters(), decay_parameter_names(model), LEARNING_RATE, 0.0,
                                        vision_tower_lr=VISION_TOWER_LR)
        optimizer = torch.optim.SGD(groups, lr=LEARNING_RATE)
        collate = collator(scenario)
        for step in range(STEPS):
            loss = step_loss(model, [collate([scenario_list[2 * step + rank]]) for rank in range(2)], average)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        out[(scenario, average)] = before, {name: p.detach().clone() for name, p in trainable.items()}
    return out


def test_the_two_loss_averages_train_differently(references):
    """The token-mean and micro-batch-mean references differ by far more than the tolerance (text+image)."""
    _, token = references[("text_image", "token")]
    _, micro = references[("text_image", "micro_batch")]
    assert max(float((token[name] - micro[name]).abs().max()) for name in token) > 300 * ATOL


def media(batch: dict) -> tuple[bool, bool]:
    return batch.get("pixel_values") is not None, batch.get("pixel_values_videos") is not None


def test_scenarios_give_the_ranks_different_media(items):
    """The matrix tests what it claims: the ranks disagree on images, on videos, and one holds the placeholder."""
    for scenario, scenario_list in items.items():
        collate = collator(scenario)
        steps = [[collate([scenario_list[2 * s + r]]) for r in range(2)] for s in range(STEPS)]
        pairs = [(media(b0), media(b1)) for b0, b1 in steps]
        assert any(m0[0] != m1[0] for m0, m1 in pairs), f"{scenario}: ranks never differ on images"
        if scenario != "text_image":
            assert any(m0[1] != m1[1] for m0, m1 in pairs), f"{scenario}: ranks never differ on videos"
            assert any(m0 == (True, True) and m1 != (True, True) for m0, m1 in pairs + [p[::-1] for p in pairs])
        else:
            assert sum(b["input_ids"].shape == (1, 1) for pair in steps for b in pair) == 2  # placeholder batches
        if scenario == "packed":
            assert all(b["position_ids"].shape[0] == 4 for pair in steps for b in pair)  # flattened rows


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_run_trains_the_planned_batches_and_runs_the_tower_alike(launch, items, run):
    backend, scenario = run.split(":")
    ranks = json.loads((launch / f"{backend}-{scenario}.json").read_text())
    collate = collator(scenario)
    for rank, report in enumerate(ranks):
        expected = [batch_signature(collate([items[scenario][2 * step + rank]])) for step in range(STEPS)]
        assert report["seen"] == expected, f"{run} rank {rank}"
        assert report["vision_calls"] == 2 * STEPS, f"{run} rank {rank}: the tower runs twice per step on every rank"
        assert report["partitioned"] == backend.startswith("zero3")
        assert report["engine"] == ("DistributedDataParallel" if backend.startswith("ddp") else "DeepSpeedEngine")


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_parameters_equal_one_process_after_ten_steps(launch, references, run):
    backend, scenario = run.split(":")
    before, expected = references[(scenario, average_of(backend))]
    params = torch.load(launch / f"{backend}-{scenario}.pt")
    assert params.keys() == expected.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=ATOL, msg=lambda m, n=name: f"{run} {n}: {m}")
    # The runs did train the tower's first block and the merger, by far more than the tolerance.
    for name in ("model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight"):
        assert (params[name] - before[name]).abs().max() > 300 * ATOL, f"{run} {name}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", GUARD_BACKENDS)
def test_nan_loss_on_one_rank_stops_every_rank_at_that_step_and_saves_nothing_non_finite(launch, backend):
    """Rank 1's loss turns NaN at step 3: both ranks raise NonFiniteError there (no hang), nothing NaN on disk."""
    ranks = json.loads((launch / f"{backend}-nan_guard.json").read_text())
    assert [r["engine"] for r in ranks] == ["DistributedDataParallel" if backend == "ddp" else "DeepSpeedEngine"] * 2
    assert [r["global_step"] for r in ranks] == [NAN_STEP - 1] * 2, "every rank stops at the NaN step"
    assert ranks[0]["error"] == ranks[1]["error"], "same message on every rank"
    message = ranks[0]["error"]
    assert message.startswith(f"loss and gradient norm not finite at step {NAN_STEP} (gradient norm "), message
    rank0, rank1 = (line.strip() for line in message.splitlines()[1:3])
    assert rank1.startswith("rank 1: loss [nan]; samples: ")
    assert rank0.startswith("rank 0: loss [") and "nan" not in rank0
    run_dir = launch / f"{backend}-nan_guard"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    weights = sorted(run_dir.rglob("*.safetensors"))
    assert weights, f"no weights saved in {run_dir}"
    for path in weights:
        for name, tensor in load_file(path).items():
            assert torch.isfinite(tensor).all(), f"{path} {name}"


@pytest.mark.slow
def test_find_unused_parameters_is_decided_false_and_an_unused_weight_is_named(launch):
    """Left unset, ``find_unused_parameters`` is False (every trainable weight takes part, the dummy vision passes
    included: the text_image runs above train that way); a weight the forward never uses then stops both ranks
    after the first backward, naming it, instead of DDP's failure one step later with parameter indices only."""
    ranks = json.loads((launch / "ddp_default-unused_param.json").read_text())
    assert [r["engine"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert [r["find_unused_parameters"] for r in ranks] == [False, False]
    assert [r["global_step"] for r in ranks] == [0, 0]
    for report in ranks:
        assert report["error"] == ("2 trainable parameter(s) got no gradient in the first step: unused_head.weight, "
                                   "unused_head.bias. Pass --ddp_find_unused_parameters True to train a model whose "
                                   "forward leaves trainable weights unused.")

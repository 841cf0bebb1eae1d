"""torchrun support: shares, seeds, devices, and 2-process runs on the CPU with gloo.

The multi-process tests launch ``python -m torch.distributed.run --standalone``,
which rendezvouses on a free loopback port, and compare against one process.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from distributed_worker import run_step
from fdiv_eval.distributed import (
    Runtime,
    map_sharded,
    rank_seed,
    resolve_device,
    sample_sharded,
    share,
    share_bounds,
)
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.sequences import load_model, load_tokenizer, sample

TESTS = Path(__file__).parent
# Guards against a deadlocked process group hanging CI; not a speed limit.
DEADLOCK_GUARD_SECONDS = 900


def _torchrun(arguments: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               *arguments]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=DEADLOCK_GUARD_SECONDS)


def _fdiv(arguments: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    result = _torchrun(["-m", "fdiv_eval.cli", "--no-progress", *arguments], cwd, processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@given(st.integers(0, 500), st.integers(1, 9))
def test_shares_cover_every_item_once(total, world_size):
    bounds = [share_bounds(total, rank, world_size) for rank in range(world_size)]
    assert bounds[0][0] == 0
    assert bounds[-1][1] == total
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        assert stop == start
    sizes = [share(total, rank, world_size) for rank in range(world_size)]
    assert max(sizes) - min(sizes) <= 1


def test_rank_seeds_distinct_across_ranks():
    assert rank_seed(1234, 0, 1) == 1234
    seeds = {rank_seed(1234, rank, 4) for rank in range(4)}
    assert len(seeds) == 4
    assert rank_seed(1234, 1, 4) == rank_seed(1234, 1, 4)
    assert rank_seed(1234, 1, 4) != rank_seed(1234, 1, 2)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    with pytest.raises(InvalidInputError, match="unknown device 'tpu'; choose auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available here; use --device cpu"):
            resolve_device("cuda:0")


def test_one_process_helpers_are_the_plain_functions():
    tokenizer = load_tokenizer("embedded:austen")
    model = load_model("embedded:austen")
    prompt = torch.tensor([tokenizer.bos_token_id])
    plain = sample(model, prompt, 10, 6, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=4)
    shared = sample_sharded(model, prompt, 10, 6, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=4,
                            runtime=Runtime())
    assert torch.equal(plain.sequences, shared.sequences)
    assert np.array_equal(map_sharded(lambda texts: [len(t) for t in texts], ["a", "bb"], Runtime()), [1, 2])


@pytest.mark.parametrize("baseline, per_prompt, prompts", [
    ("mean", 12, None),
    ("none", 9, None),  # shares of 5 and 4 rows
    ("leave_one_out", 7, ["She", "He was"]),  # two prompts, each split 4 + 3
])
def test_two_process_step_equals_one_process_step(tmp_path, baseline, per_prompt, prompts):
    output = tmp_path / "two.pt"
    result = _torchrun([str(TESTS / "distributed_worker.py"), str(output), baseline, str(per_prompt), *(prompts or [])],
                       tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two_processes = torch.load(output, weights_only=True)
    one_process = run_step(None, baseline, per_prompt, prompts)

    # The same rows in the same order, the same running log Ẑ (float64 sums), the same loss.
    assert two_processes["texts"] == one_process["texts"]
    assert two_processes["log_z_counts"] == one_process["log_z_counts"]
    assert two_processes["log_z_sums"] == pytest.approx(one_process["log_z_sums"], abs=1e-12)
    assert two_processes["loss"] == pytest.approx(one_process["loss"], abs=1e-9)
    scale = max(float(gradient.abs().max()) for gradient in one_process["gradients"].values())
    assert scale > 0.01, "the fixed samples must give a nonzero gradient, or the comparison proves nothing"
    for name, gradient in one_process["gradients"].items():
        # float32 gradients of order 1; DDP sums two partial gradients, so the
        # summation order differs from one process: a few ulps, below 1e-6.
        torch.testing.assert_close(two_processes["gradients"][name], gradient, rtol=0, atol=1e-6, msg=name)


AUDIT_SUITE = """
name: twoproc
base_model: embedded:austen
max_new_tokens: 8
target:
  type: word_list
  words: [she, her, he]
  epsilon: 0.001
train:
  methods: [gdc]
  steps: 4
  batch_size: 16
  checkpoint_every: 2
  log_partition_samples: 128
audit:
  samples: 384
  base_samples: 512
  batch_size: 128
  self_bleu_samples: 40
  bootstrap_resamples: 50
  seed: 77
runs_dir: runs
report_dir: reports
"""


@pytest.fixture(scope="module")
def trained_suite(tmp_path_factory):
    """A suite folder with a gdc checkpoint trained by one process."""
    from fdiv_eval.cli import main

    folder = tmp_path_factory.mktemp("twoproc")
    (folder / "suite.yaml").write_text(AUDIT_SUITE)
    current = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["--no-progress", "train", "suite.yaml"]) == 0
    finally:
        os.chdir(current)
    return folder


def _metrics(report: dict) -> dict[tuple[str, str], dict]:
    return {(model["name"], name): metric for model in report["models"] for name, metric in model["metrics"].items()}


def _read(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_two_process_audit_reproducible(trained_suite):
    for output, processes in (("two-a", 2), ("two-b", 2), ("one", 1)):
        _fdiv(["audit", "suite.yaml", "--output", output], trained_suite, processes)
    first, second, single = (_read(trained_suite / name) for name in ("two-a", "two-b", "one"))
    assert first["settings"]["processes"] == 2
    assert single["settings"]["processes"] == 1

    # A fixed seed and process count give the same report, value for value.
    assert _metrics(first) == _metrics(second)
    assert first["log_partition"] == second["log_partition"]
    assert first["pairwise"] == second["pairwise"]

    # The two ranks drew different rows, and not the rows of one process.
    from datasets import Dataset

    two_rows = Dataset.from_parquet(str(trained_suite / "two-a" / "samples" / "gdc.parquet"))["token_ids"]
    one_rows = Dataset.from_parquet(str(trained_suite / "one" / "samples" / "gdc.parquet"))["token_ids"]
    assert len(two_rows) == len(one_rows) == 384
    assert two_rows[:192] != two_rows[192:]
    assert two_rows != one_rows

    # Independent samples of one audit: every metric's 95% intervals overlap.
    compared = 0
    for key, metric in _metrics(single).items():
        other = _metrics(first)[key]
        bounds = [metric["ci_low"], metric["ci_high"], other["ci_low"], other["ci_high"]]
        if not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds):
            continue
        assert other["ci_low"] <= metric["ci_high"], (key, metric, other)
        assert metric["ci_low"] <= other["ci_high"], (key, metric, other)
        compared += 1
    assert compared >= 40


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_two_process_training_resumes_to_the_uninterrupted_result(trained_suite):
    _fdiv(["train", "suite.yaml", "--output", "runs-whole"], trained_suite)
    _fdiv(["train", "suite.yaml", "--output", "runs-split", "--steps", "2"], trained_suite)
    result = _fdiv(["train", "suite.yaml", "--output", "runs-split", "--resume"], trained_suite)
    assert "resumed from step 2" in result.stdout

    whole, split = trained_suite / "runs-whole" / "gdc", trained_suite / "runs-split" / "gdc"
    for name, tensor in _weights(whole / "final").items():
        assert torch.equal(_weights(split / "final")[name], tensor), name

    # Rank 0 alone wrote the log: one record per step.
    steps = [json.loads(line)["step"] for line in (whole / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    state = json.loads((whole / "final" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    tensors = torch.load(whole / "final" / "optimizer_and_rng.pt", weights_only=True)
    assert len(tensors["random_states_per_rank"]) == 2
    assert not torch.equal(tensors["random_states_per_rank"][0]["torch_rng"],
                           tensors["random_states_per_rank"][1]["torch_rng"])


def test_resuming_with_another_process_count_warns(trained_suite):
    from fdiv_eval.cli import main

    _fdiv(["train", "suite.yaml", "--output", "runs-mixed", "--steps", "2"], trained_suite)
    current = os.getcwd()
    os.chdir(trained_suite)
    try:
        import logging

        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("trainers.fdpg").addHandler(handler)
        try:
            assert main(["--no-progress", "train", "suite.yaml", "--output", "runs-mixed"]) == 0
        finally:
            logging.getLogger("trainers.fdpg").removeHandler(handler)
    finally:
        os.chdir(current)
    messages = [record.getMessage() for record in records]
    assert any("was written by 2 processes and this run has 1" in message for message in messages), messages
    assert json.loads((trained_suite / "runs-mixed" / "gdc" / "final" / "trainer_state.json").read_text())["step"] == 4


def test_too_few_samples_per_process(trained_suite):
    suite = AUDIT_SUITE.replace("batch_size: 16", "batch_size: 2")
    (trained_suite / "small.yaml").write_text(suite.replace("name: twoproc", "name: small"))
    result = _torchrun(["-m", "fdiv_eval.cli", "--no-progress", "train", "small.yaml", "--output", "runs-small"],
                       trained_suite, processes=3)
    # Each worker exits with 2 after one error line. torchrun itself then exits
    # with 1 and prints its own summary of the failed workers, with its own traceback.
    assert result.returncode == 1
    assert "exitcode  : 2" in result.stderr
    assert "each step draws 2 samples, fewer than the 3 processes that share them" in result.stderr
    assert "raise train.batch_size to at least 3" in result.stderr
    assert "InvalidInputError" not in result.stderr
    assert "fdiv_eval/" not in result.stderr
    assert not (trained_suite / "runs-small").exists()


PROMPTED_SUITE = """
name: prompted
base_model: embedded:austen
max_new_tokens: 8
prompts:
  file: prompts.txt
target:
  type: reward
  reward: {type: vader, field: compound}
  beta: 0.5
train:
  methods: [js]
  steps: 2
  batch_size: 16
  prompts_per_step: 2
  checkpoint_every: 2
  log_partition_samples: 60
audit:
  samples: 60
  base_samples: 120
  batch_size: 64
  self_bleu_samples: 20
  bootstrap_resamples: 20
runs_dir: runs
report_dir: reports
"""


def test_two_process_prompted_run(tmp_path):
    (tmp_path / "prompts.txt").write_text("It was the\nShe had been\nThe house of\n")
    (tmp_path / "suite.yaml").write_text(PROMPTED_SUITE)
    _fdiv(["run", "suite.yaml"], tmp_path)

    report = _read(tmp_path / "reports")
    assert report["settings"]["processes"] == 2
    assert [model["name"] for model in report["models"]] == ["base", "js"]
    for model in report["models"]:
        assert len(model["info"]["per_prompt"]) == 3
        assert model["metrics"]["kl_to_base"]["n"] > 0
    assert report["models"][0]["metrics"]["kl_to_base"]["value"] == 0.0
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs" / "js" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += [int(child) for child in (task / "children").read_text().split()]
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker process ids from /proc (Linux)")
def test_workers_stop_when_launcher_killed(trained_suite):
    import signal
    import time

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "fdiv_eval.cli", "--no-progress", "train", "suite.yaml", "--output", "runs-orphan",
               "--steps", "400"]
    launcher = subprocess.Popen(command, cwd=trained_suite, env=environment, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    log = trained_suite / "runs-orphan" / "gdc" / "train_log.jsonl"
    waited = 0.0
    while not (log.exists() and log.read_text().strip()) and waited < DEADLOCK_GUARD_SECONDS:
        assert launcher.poll() is None, "the training run ended before it could be killed"
        time.sleep(0.1)
        waited += 0.1
    workers = _children(launcher.pid)
    assert len(workers) == 2

    # SIGKILL reaches the launcher alone: torchrun gives each worker a session of its own.
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    waited = 0.0
    while any(_alive(pid) for pid in workers) and waited < DEADLOCK_GUARD_SECONDS:
        time.sleep(0.1)
        waited += 0.1
    assert not any(_alive(pid) for pid in workers)

    # The folder is free again, and a rerun resumes from what the killed run left.
    result = _fdiv(["train", "suite.yaml", "--output", "runs-orphan", "--steps", "6"], trained_suite)
    assert "gdc:" in result.stdout
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(set(steps))
    assert steps[-1] >= 6

"""Kill training with SIGKILL at random moments, resume it, and compare with an uninterrupted run.

Each trial starts `fdiv train` in a fresh folder, kills it once at a random
moment, then reruns the same command, which resumes from the last complete
checkpoint. A trial passes when the final weights equal those of the
uninterrupted run bit for bit and the training log has each step exactly once.

With ``--processes N`` (N > 1) every run goes through ``torchrun
--standalone --nproc-per-node N``, and a kill sends SIGKILL to the launcher
and all its workers at once, as when a machine fails. torchrun starts each
worker in a session of its own, so the workers are found through /proc
(Linux only) rather than through the launcher's process group.

Usage::

    python benchmarks/kill_resume.py --trials 10
    python benchmarks/kill_resume.py --trials 10 --processes 2 --output docs/reliability-torchrun.md

Writes docs/reliability.md (or --output). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

SUITE = """
name: reliability
base_model: embedded:austen
max_new_tokens: 16
target:
  type: word_list
  words: [mother, father, sister, brother, daughter]
  epsilon: 0.001
train:
  methods: [js]
  steps: 16
  batch_size: 32
  checkpoint_every: 2
  log_partition_samples: 256
"""


def _train(suite: Path, output: Path, processes: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "fdiv_eval.cli", "--no-progress", "train", str(suite), "--output", str(output)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   *command[1:]]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # A session of its own, so that one killpg reaches the launcher and every worker.
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Return the process ids of every descendant of ``pid``, read from /proc (Linux)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return [grandchild for child in children for grandchild in [child, *_descendants(child)]]


def _kill_everything(process: subprocess.Popen) -> list[int]:
    """SIGKILL a run's launcher and all its descendants at once; return their process ids."""
    targets = [process.pid, *_descendants(process.pid)]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return targets


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def _same_weights(first: Path, second: Path) -> bool:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _log_steps(run: Path) -> list[int]:
    lines = (run / "js" / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="processes per run (torchrun when over 1)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        suite = folder / "suite.yaml"
        suite.write_text(SUITE)

        started = time.perf_counter()
        reference = _train(suite, folder / "reference", args.processes)
        if reference.wait() != 0:
            raise SystemExit(f"the uninterrupted run failed: {reference.stderr.read().decode()}")
        duration = time.perf_counter() - started

        rows = []
        for trial in range(1, args.trials + 1):
            run = folder / f"trial-{trial}"
            # A random moment during the run: after a random number of logged
            # steps (0 means still loading or estimating log Z), plus a random delay.
            after_steps = rng.randint(0, 15)
            extra = rng.uniform(0.0, 0.5)
            process = _train(suite, run, args.processes)
            log = run / "js" / "train_log.jsonl"
            while process.poll() is None:
                logged = len(log.read_text().splitlines()) if log.exists() else 0
                if logged >= after_steps:
                    break
                time.sleep(0.02)
            time.sleep(extra)
            delay = after_steps + extra
            killed = process.poll() is None
            targets = _kill_everything(process) if killed else []
            process.wait()
            # Wait for every killed worker to be gone (or a zombie) before the rerun starts.
            while any(_state(pid) != "Z" for pid in targets[1:]):
                time.sleep(0.05)
            signalled = len(targets)
            checkpoints = sorted(p.name for p in (run / "js").glob("step-*")) if (run / "js").exists() else []
            resumed = _train(suite, run, args.processes)
            code = resumed.wait()
            error = resumed.stderr.read().decode().strip().splitlines()
            same = code == 0 and _same_weights(folder / "reference" / "js" / "final", run / "js" / "final")
            steps_ok = code == 0 and _log_steps(run) == list(range(1, 17))
            rows.append((trial, delay, signalled, checkpoints[-1] if checkpoints else "none", code, same, steps_ok,
                         error[-1] if error and code else ""))
            print(rows[-1], flush=True)

    passed = sum(1 for row in rows if row[5] and row[6])
    command = f"python benchmarks/kill_resume.py --trials {args.trials} --seed {args.seed}"
    launcher = "`fdiv train`"
    if args.processes > 1:
        output = args.output.resolve()
        output_name = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output.name
        command += f" --processes {args.processes} --output {output_name}"
        launcher = (f"`torchrun --standalone --nproc-per-node {args.processes} -m fdiv_eval.cli train` "
                    "(the launcher and every worker at once, found through /proc)")
    lines = [
        "# Kill-and-resume reliability" + (f" under torchrun, {args.processes} processes" if args.processes > 1 else ""),
        "",
        f"Generated by `{command}` on a 2-core CPU.",
        "",
        "Training: the embedded Austen model, JS preset, 16 steps of 32 samples, a checkpoint every 2 steps, "
        f"one thread per process. The uninterrupted run took {duration:.1f} s (process start included). Each "
        f"trial kills {launcher} with SIGKILL once a random number of steps (0–15) is logged plus a random "
        "0–0.5 s, then reruns the same command.",
        "",
        f"**{passed} of {len(rows)} trials** ended with final weights bitwise equal to the uninterrupted run "
        "and a training log with steps 1–16 exactly once.",
        "",
        "| trial | killed after step + seconds | processes killed | newest checkpoint at kill | rerun exit | same weights | log steps 1–16 once |",
        "|---|---|---|---|---|---|---|",
    ]
    for trial, delay, signalled, checkpoint, code, same, steps_ok, _ in rows:
        lines.append(f"| {trial} | {delay:.2f} | {signalled} | {checkpoint} | {code} | {same} | {steps_ok} |")
    lines.append("")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.output}: {passed}/{len(rows)} passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Distillation under torch.distributed: 2 gloo ranks on the CPU must train what one process trains.

One torchrun launch (2 processes) runs three jobs; the single-process halves run in this process. All of them
share one global batch of 4 rows, so each rank's share is 2 rows (1 per micro-batch in one job).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from export.distill import distill
from export.distill import train as dtrain
from export.distill.domains import CHAT_PROMPTS, TEXT_STARTS

ROOT = Path(__file__).resolve().parents[1]
STEPS, PAUSE = 6, 3


def common(tmp: Path) -> dict:
    text = tmp / "train.txt"
    if not text.exists():
        text.write_text("\n".join(TEXT_STARTS + CHAT_PROMPTS) * 2, encoding="utf-8")
    return {"teacher_source": "tiny:llama", "layers": 1, "data": [str(text)], "steps": STEPS, "seq_len": 32,
            "top_k": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "alpha": 1.0, "checkpoint_every": 100,
            "cache_dir": str(tmp / "cache"), "progress": False}


def torchrun(jobs: list[dict]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "distill_ddp_worker.py"), json.dumps(jobs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-12000:]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def history(out: Path) -> list[list[float]]:
    return torch.load(out / dtrain.CHECKPOINT, weights_only=True)["history"]


def assert_same_run(a: Path, b: Path) -> None:
    ha, hb = history(a), history(b)
    assert [h[0] for h in ha] == [h[0] for h in hb] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor(ha), torch.tensor(hb), rtol=1e-5, atol=1e-6)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run of the module: one process whole, 2 ranks whole, and the paused / resumed halves."""
    tmp = tmp_path_factory.mktemp("ddp")
    base = common(tmp)
    torch.manual_seed(0)
    distill(**base, out_dir=tmp / "one")
    distill(**base, out_dir=tmp / "one_then_two", stop_after=PAUSE)
    torchrun([{**base, "out_dir": str(tmp / "two"), "cache_dir": str(tmp / "cache_two")},
              {**base, "out_dir": str(tmp / "two_micro"), "micro_batch": 1},
              {**base, "out_dir": str(tmp / "two_then_one"), "stop_after": PAUSE},
              {**base, "out_dir": str(tmp / "one_then_two")}])
    distill(**base, out_dir=tmp / "two_then_one")
    return tmp


def test_two_ranks_train_what_one_process_trains(runs):
    assert json.loads((runs / "two" / "distill.json").read_text())["world_size"] == 2
    assert_same_run(runs / "one", runs / "two")


def test_two_ranks_build_the_same_teacher_cache(runs):
    one, two = (json.loads((runs / r / "distill.json").read_text())["cache"] for r in ("one", "two"))
    assert Path(two).parent == runs / "cache_two" and Path(one).name == Path(two).name
    for name in ("tokens.npy", "top_ids.npy", "top_logp.npy"):
        a, b = (np.load(Path(c) / name, allow_pickle=False) for c in (one, two))
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert np.load(Path(two) / "done.npy", allow_pickle=False).all()


def test_micro_batches_accumulate_to_the_same_step(runs):
    assert_same_run(runs / "one", runs / "two_micro")


def test_a_checkpoint_resumes_at_another_world_size(runs):
    for name in ("two_then_one", "one_then_two"):
        plan = json.loads((runs / name / "distill.json").read_text())
        assert plan["steps_done"] == STEPS
        assert_same_run(runs / "one", runs / name)


def test_training_moves_the_weights(runs):
    from export.distill import load_teacher
    from export.sources import load_source

    start = load_teacher("tiny:llama").model.state_dict()
    keep = json.loads((runs / "one" / "distill.json").read_text())["keep"]
    trained = weights(runs / "one")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(trained[name], start[name.replace("layers.0", f"layers.{keep[0]}")], atol=1e-4)
    assert load_source(str(runs / "one")).config.num_hidden_layers == 1

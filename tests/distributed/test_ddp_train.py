"""A real 2-process CPU (gloo) `accelerate launch` of the tiny default, as a user would run it."""

import json
import math

import pytest
import torch

from tests.helpers import QUICK_TRAIN_FLAGS, accelerate_launch


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_cpu_ddp_run(tmp_path):
    out = tmp_path / "ddp"
    proc = accelerate_launch([
        "-m", "hf_gradext.train",
        "--output_dir", str(out), *QUICK_TRAIN_FLAGS, "--max_steps", "6",
        "--eval_strategy", "steps", "--eval_steps", "3", "--log_level", "warning",
    ])  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # Both ranks trained: 6 steps x 2 ranks x 8 blocks = 96 of the 64 blocks = 1.5 epochs (one rank: 0.75).
    # (accelerate/torchrun exit non-zero if either rank fails, so returncode 0 means both finished.)
    assert state["log_history"][-1]["epoch"] == pytest.approx(1.5)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["The little fox found a red ball in the park."], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert math.isfinite(loss.item())
    evals = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(evals["eval_loss"])

"""2-process CPU (gloo) ``accelerate launch`` GQC run: both ranks take the same decisions, no hang."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from tests.helpers import accelerate_launch

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from hf_gradext.arguments import GradExtArguments
    from hf_gradext.process_group import end_process_group
    from hf_gradext.trainer import GradExtTrainer

    out = sys.argv[1]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(64):
        ids = torch.randint(0, 64, (16,), generator=g)
        labels = ids.clone()
        labels[: (i * 3) % 12] = -100  # ranks see different label-token counts
        data.append({"input_ids": ids, "labels": labels})
    args = GradExtArguments(
        output_dir=out, per_device_train_batch_size=2, learning_rate=1e-3, num_train_epochs=1, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, gqc="gnts",
        gqc_threshold_start=1.1, gqc_max_microbatches=4, max_grad_norm=1.0, ddp_find_unused_parameters=False,
    )
    trainer = GradExtTrainer(model, args=args, train_dataset=data)
    trainer.train()
    steps = [[e["step"], e["gqc/microbatches"], round(e["gqc/grad_norm"], 6), e["gqc/window_tokens"]]
             for e in trainer.state.log_history if "gqc/microbatches" in e]
    checksum = float(sum(p.double().sum() for p in trainer.model.parameters()))
    with open(os.path.join(out, f"rank{args.process_index}.json"), "w") as fh:
        json.dump({"steps": steps, "checksum": checksum, "world": args.world_size}, fh)
    del trainer, model  # the DDP wrapper owns gloo's threads: drop it so end_process_group frees them
    end_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_gqc_run_same_decisions(tmp_path):
    script = tmp_path / "run_gqc.py"
    script.write_text(SCRIPT)
    proc = accelerate_launch([str(script), str(tmp_path)])  # a hang fails here (timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == 2
    assert r0["steps"] == r1["steps"] and len(r0["steps"]) >= 2
    assert any(s[1] > 1 for s in r0["steps"])  # some windows accumulated
    assert sum(s[1] for s in r0["steps"]) == 16  # 64 samples / (2 ranks x 2) microbatches per rank
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9)
    print(sys.version, r0["steps"])

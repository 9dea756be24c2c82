"""2-process CPU (gloo) ``--gqc gns_sample``: per-sample statistics summed over ranks, identical decisions.

Oracle per rank: the first microbatch's per-sample norms from ``per_sample_grad_norms`` (a separate
measurement pass, one process, no DDP loss scaling) on a copy of the initial model; the statistics the
controller sees must be the sum of both ranks' local ones.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.helpers import accelerate_launch

SCRIPT = textwrap.dedent(
    """
    import copy, json, os, sys
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from hf_gradext.arguments import GradExtArguments
    from hf_gradext.gqc.controllers import GNSSample
    from hf_gradext.gqc.sample_norms import SampleNormCapture
    from hf_gradext.grad import per_sample_grad_norms
    from hf_gradext.process_group import end_process_group
    from hf_gradext.trainer import GradExtTrainer

    out = sys.argv[1]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    init = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    pats = [torch.randint(0, 64, (16,), generator=g) for _ in range(3)]
    data = []
    for i in range(48):
        ids = pats[i % 3] if i % 4 else torch.randint(0, 64, (16,), generator=g)
        labels = ids.clone()
        labels[: (i * 3) % 12] = -100  # ranks see different label-token counts
        data.append({"input_ids": ids, "labels": labels})
    local, reduced, first = [], [], {}
    real_vector, real_sq, real_decide = SampleNormCapture.vector, SampleNormCapture.sq_norms, GNSSample.decide

    def vector(self, weights):
        v = real_vector(self, weights)
        local.append(v.tolist())
        return v

    def sq_norms(self):
        sq = real_sq(self)
        first.setdefault("sq", sq.tolist())
        return sq

    def decide(self, obs):
        reduced.append([obs.sample_stats.count, obs.sample_stats.sq_sum, obs.sample_stats.weight_sum,
                        obs.sample_stats.weight_sq_sum])
        return real_decide(self, obs)

    SampleNormCapture.vector, SampleNormCapture.sq_norms, GNSSample.decide = vector, sq_norms, decide

    class FirstBatch:
        def before_microbatch(self, trainer, inputs, n):
            if "oracle" not in first:
                batch = {k: v.detach().clone() for k, v in inputs.items()}
                first["oracle"] = per_sample_grad_norms(init, batch).pow(2).tolist()

        def after_microbatch(self, trainer, inputs, loss):
            pass

    args = GradExtArguments(
        output_dir=out, per_device_train_batch_size=2, learning_rate=1e-3, num_train_epochs=1, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, gqc="gns_sample",
        gqc_threshold_start=0.5, gqc_max_microbatches=4, max_grad_norm=1.0, ddp_find_unused_parameters=False,
    )
    trainer = GradExtTrainer(model, args=args, train_dataset=data)
    trainer.add_microbatch_observer(FirstBatch())
    trainer.train()
    steps = [[e["step"], e["gqc/microbatches"]] for e in trainer.state.log_history if "gqc/microbatches" in e]
    with open(os.path.join(out, f"rank{args.process_index}.json"), "w") as fh:
        json.dump({"steps": steps, "local": local, "reduced": reduced, "first": first, "world": args.world_size}, fh)
    del trainer, model
    end_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_gns_sample_sums_statistics_over_ranks(tmp_path):
    script = tmp_path / "run_gns_sample.py"
    script.write_text(SCRIPT)
    proc = accelerate_launch([str(script), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == 2 and r0["steps"] == r1["steps"] and len(r0["steps"]) >= 2
    assert sum(s[1] for s in r0["steps"]) == 12  # 48 samples / (2 ranks x 2)
    assert len(r0["local"]) == len(r0["reduced"]) == 12
    for a, b, red0, red1 in zip(r0["local"], r1["local"], r0["reduced"], r1["reduced"], strict=True):
        assert red0 == red1  # every rank decides from the same numbers
        assert red0 == pytest.approx([x + y for x, y in zip(a, b, strict=True)], rel=1e-12)
    for r in (r0, r1):  # the DDP loss scale is inverted: same norms as a one-process measurement
        assert r["first"]["sq"] == pytest.approx(r["first"]["oracle"], rel=1e-4, abs=1e-9)

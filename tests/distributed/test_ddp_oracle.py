"""2-process CPU (gloo) DDP runs checked against oracles, not only against each other.

One ``accelerate launch`` of ``ddp_oracle_script.py`` trains three float64 tiny-GPT-2 runs (see its
``RUNS``); the tests here compare what the ranks wrote with oracles computed in the test process:

* GQC under DDP == ONE process drawing the union of both ranks' microbatches
  (:func:`test_two_rank_gqc_equals_one_process_over_the_union`);
* per-sample gradients captured from the DDP *training* backward == a float64 per-sample loop on the
  samples each rank drew, at the weights of the step they were drawn for
  (:func:`test_per_sample_gradients_from_ddp_training_equal_float64_loop`).

Runs use SGD (no Adam, which would normalize a wrong gradient scale away) and a clipping bound that only
some steps exceed, so a world-size factor that is off shows up in the weights, not only in the decisions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_gradext.analysis import load_gradients
from hf_gradext.grad import SparseRowGrad
from tests.distributed.ddp_oracle_script import (
    COLLECT_EVERY,
    RANK_BATCH,
    RUNS,
    make_model,
    make_rows,
    params_of,
    run_one,
)
from tests.helpers import accelerate_launch

WORLD = 2
# float64 weights: the only differences between the 2-rank and the 1-process run are the order of float64
# sums (DDP's all-reduce vs one batched matmul); decisions compare float32 norms (total_norm is float32).
WEIGHT_RTOL, WEIGHT_ATOL = 1e-9, 1e-12
NORM_RTOL = 1e-6
# Stored per-sample gradients are float32 (the widest --gradient_collection_dtype), the oracle float64:
# max |stored - oracle| over a parameter, relative to max |oracle| of that parameter and sample.
PER_SAMPLE_REL = 2e-6  # measured <= 4e-7; a world-size slip gives 0.5 or 1


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    """The launch's output folder (one subfolder per run of ``RUNS``)."""
    out = tmp_path_factory.mktemp("ddp_oracle")
    proc = accelerate_launch(["-m", "tests.distributed.ddp_oracle_script", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _ranks(run_dir: Path) -> list[dict]:
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["world"] == WORLD for r in ranks)
    return ranks


def _assert_params_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> float:
    """assert_close per parameter; returns the largest absolute difference."""
    assert set(got) == set(want), label
    worst = 0.0
    for name, w in want.items():
        torch.testing.assert_close(
            got[name], w, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=lambda m, name=name: f"{label} {name}: {m}"
        )
        worst = max(worst, float((got[name] - w).abs().max()))
    return worst


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", ["gqc_avg", "gqc_noavg"])
def test_two_rank_gqc_equals_one_process_over_the_union(ddp_out, tmp_path, run):
    """A 2-rank GQC run equals one process whose every microbatch is the union of the ranks' microbatches.

    The oracle. Under DDP every microbatch's backward all-reduces (GQC needs the global gradient for its
    decision), so after microbatch ``j`` each rank's ``.grad`` is ``c * sum over ranks of the token-sum
    gradients`` (``c = 1`` with ``average_tokens_across_devices``: loss x world, DDP divides by world;
    ``c = 1 / world`` without), and the loop divides the window by ``world / (loss_mult * N)`` with ``N``
    the window's label tokens over both ranks. That is exactly the token-mean gradient of all the samples
    both ranks drew in the window -- what ONE process computes when its microbatch ``j`` is
    ``rank0_j + rank1_j`` (per-device batch ``2 x 2``; the seeded sampler hands the same index order to
    both set-ups, and accelerate gives rank r the r-th sub-batch, which the test checks).
    Same per-step mean gradient -> same tested norm -> same decision, same clipping, same SGD update.

    Compared: the union per microbatch, the step each microbatch belongs to (the decisions: microbatches
    per optimizer step), the logged norm / window tokens, and the final weights (float64).
    Not comparable by design: per-rank quantities (the gns controller's per-rank microbatch norms, mht's
    per-rank losses) have 2 entries per microbatch under DDP and 1 in one process; gnts uses none.
    """
    ranks = _ranks(ddp_out / run)
    oracle_dir = tmp_path / "oracle"
    trainer = run_one(str(oracle_dir), run, WORLD * RANK_BATCH)
    oracle = json.loads((oracle_dir / "rank0.json").read_text())
    assert oracle["world"] == 1

    # Same data: oracle microbatch j == rank 0's microbatch j followed by rank 1's, for every j.
    mb0, mb1, mbo = ranks[0]["microbatches"], ranks[1]["microbatches"], oracle["microbatches"]
    assert len(mb0) == len(mb1) == len(mbo) == len(make_rows()) // (WORLD * RANK_BATCH)
    assert [a[1] + b[1] for a, b in zip(mb0, mb1)] == [o[1] for o in mbo]
    # Same decisions: every microbatch went into the same optimizer step (on both ranks and the oracle).
    assert [a[0] for a in mb0] == [b[0] for b in mb1] == [o[0] for o in mbo]
    k_per_step = [[m[0] for m in mbo].count(s) for s in range(1, mbo[-1][0] + 1)]
    assert len(set(k_per_step)) >= 2, k_per_step  # the controller really varied the window

    # Same logged records (step, k, tested norm, window label tokens over ranks) on both ranks and the oracle.
    assert ranks[0]["steps"] == ranks[1]["steps"]
    assert len(ranks[0]["steps"]) == len(oracle["steps"])
    for got, want in zip(ranks[0]["steps"], oracle["steps"]):
        assert got[0] == want[0] and got[1] == want[1] and got[3] == want[3], (got, want)
        assert got[2] == pytest.approx(want[2], rel=NORM_RTOL), (got, want)
    norm_err = max(abs(g[2] / w[2] - 1) for g, w in zip(ranks[0]["steps"], oracle["steps"]))
    # The clipping bound is exceeded on some steps, not all (so the stepped gradient's scale matters).
    norms = [s[2] for s in oracle["steps"]]
    bound = RUNS[run]["max_grad_norm"]
    assert min(norms) < bound < max(norms), norms

    # Same weights: both ranks bit-identical (all-reduced grads), and equal to the oracle's.
    w0 = load_file(ddp_out / run / "rank0_final.safetensors")
    w1 = load_file(ddp_out / run / "rank1_final.safetensors")
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    want = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert all(t.dtype == torch.float64 for t in want.values())
    worst = _assert_params_close(w0, want, run)
    moved = max(float((p - q).abs().max()) for p, q in zip(want.values(), params_of(make_model()).values()))
    assert moved > 1e6 * max(worst, WEIGHT_ATOL)  # training moved the weights far beyond the tolerance
    print(
        f"{run}: k per step {k_per_step}, max |w_ddp - w_oracle| = {worst:.3g}, moved {moved:.3g}, "
        f"max rel norm diff {norm_err:.3g}"
    )


def _oracle_per_sample(
    weights: dict[str, torch.Tensor], row: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Float64 gradient of the sample's own HF causal-LM loss (its token mean), one forward/backward."""
    model = make_model()
    model.load_state_dict(weights, strict=False)  # named_parameters: the tied lm_head follows wte
    params = dict(model.named_parameters())
    assert set(params) == set(weights)
    assert all(torch.equal(params[n], w) for n, w in weights.items())
    loss = model(input_ids=row["input_ids"][None], labels=row["labels"][None]).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", ["gqc_avg", "ga_avg"])
def test_per_sample_gradients_from_ddp_training_equal_float64_loop(ddp_out, run):
    """Per-sample gradients captured in each rank's DDP training backward == a float64 per-sample loop.

    What the library stores (``hf_gradext/grad/loss_scaling.py``): the gradient of sample i's *own* mean
    token loss over its valid (shifted) labels, whatever the backwarded loss's normalization -- HF's
    ``S_mb / num_items_in_batch x world`` (``ga_avg``: fixed accumulation of 2, items counted over both
    ranks) or GQC's token sum ``x world`` (``gqc_avg``). The capture happens on each rank's local graph,
    before DDP averages ``.grad``, so the world-size factor must be undone exactly once.

    The oracle: for every collected sample (found by ``example_id`` in the deterministic rows), a float64
    forward/backward of that sample alone (HF's batch-of-one loss is its own token mean) at the weights
    the rank held when the step began (saved by the script at ``on_step_begin``). Also checked: each rank
    stored exactly the samples it drew for the collected steps, and nothing of the other rank's.
    """
    run_dir = ddp_out / run
    ranks = _ranks(run_dir)
    rows = make_rows()
    got = load_gradients(run_dir / "gradients")
    cap = RUNS[run]["gradient_collection_max_samples"]
    last_step = ranks[0]["microbatches"][-1][0]
    collected_steps = list(range(COLLECT_EVERY, last_step + 1, COLLECT_EVERY))
    assert got.steps == collected_steps

    # Each rank stored what it drew for the collected steps (in draw order, at most `cap` per step).
    for r, rank in enumerate(ranks):
        for s in collected_steps:
            drawn = [i for step, ids in rank["microbatches"] if step == s for i in ids][:cap]
            stored = [x for x in got.samples if x["rank"] == r and x["step"] == s]
            assert [int(x["example_id"]) for x in sorted(stored, key=lambda x: x["sample"])] == drawn, (r, s)
    assert {x["rank"] for x in got.samples} == set(range(WORLD))

    names = [n for n, _ in make_model().named_parameters()]
    assert set(got.grads) == set(names)
    dense = {n: g.to_dense() if isinstance(g, SparseRowGrad) else g for n, g in got.grads.items()}
    weights: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    worst = 0.0
    for i, sample in enumerate(got.samples):
        r, s = sample["rank"], sample["step"]
        if (r, s) not in weights:
            weights[(r, s)] = load_file(run_dir / f"rank{r}_before_step{s}.safetensors")
        ref = _oracle_per_sample(weights[(r, s)], rows[int(sample["example_id"])])
        for n in names:
            stored = dense[n][i].double()
            scale = float(ref[n].abs().max())
            err = float((stored - ref[n]).abs().max()) / scale
            worst = max(worst, err)
            assert err <= PER_SAMPLE_REL, (run, sample, n, err)
    # The weights moved between collected steps: the oracle really used each step's own parameters.
    first, last = weights[(0, collected_steps[0])], weights[(0, collected_steps[-1])]
    assert max(float((first[n] - last[n]).abs().max()) for n in names) > 1e-3
    print(f"{run}: {len(got.samples)} samples, max relative error {worst:.3g}")

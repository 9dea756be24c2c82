"""``--gqc gns_sample`` inside GradExtTrainer: per-sample norms from the training backward vs a float64 oracle.

Oracle: a float64 copy of the initial model; each sample's own mean-token-loss gradient by a separate
backward per sample (no capture engine), its squared norm, and the window's token-mean gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _gqc_tiny import (
    SEQ,
    VOCAB,
    assert_same_decisions_after,
    gqc_args,
    pattern_dataset,
    tiny_model,
    token_dataset,
)

from hf_gradext.gqc import noise
from hf_gradext.gqc.controllers import GNSSample
from hf_gradext.gqc.sample_norms import SampleNormCapture
from hf_gradext.trainer import GradExtTrainer


class _Recorder:
    """Microbatch observer keeping every training microbatch's inputs."""

    def __init__(self):
        self.inputs = []

    def before_microbatch(self, trainer, inputs, num_items_in_batch):
        self.inputs.append({k: v.detach().clone() for k, v in inputs.items()})

    def after_microbatch(self, trainer, inputs, loss):
        pass


def _train(tmp_path, data, model=None, observers=(), **overrides):
    kw = dict(gqc="gns_sample", gqc_max_microbatches=4, max_grad_norm=0.0)
    trainer = GradExtTrainer(
        model or tiny_model(), args=gqc_args(tmp_path, **{**kw, **overrides}), train_dataset=data
    )
    for obs in observers:
        trainer.add_microbatch_observer(obs)
    trainer.train()
    return trainer


def _windows(trainer):
    return [e["gqc/microbatches"] for e in trainer.state.log_history if "gqc/microbatches" in e]


def _oracle_per_sample(model64, mb, keep=lambda name: True):
    """(B, P) float64 gradients of each sample's own mean token loss over the parameters whose name
    ``keep`` accepts (default: all); (B,) label counts."""
    params = [p for n, p in model64.named_parameters() if p.requires_grad and keep(n)]
    rows, counts = [], []
    for i in range(mb["input_ids"].shape[0]):
        ids, labels = mb["input_ids"][i : i + 1], mb["labels"][i : i + 1]
        out = model64(input_ids=ids, attention_mask=mb["attention_mask"][i : i + 1])
        logits = out.logits[:, :-1]  # (1, T-1, V)
        target = labels[:, 1:]
        n = int(target.ne(-100).sum())
        counts.append(n)
        if n == 0:  # no label token: the sample's gradient is 0 by the loss convention
            rows.append(torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
            continue
        token_sum = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss = token_sum / n
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows), torch.tensor(counts, dtype=torch.float64)


LAYER_SUBSETS = {
    "all": lambda name: True,
    "norm": lambda name: ".ln_" in name or name.startswith("transformer.ln_f"),  # GPT-2's LayerNorms
    r"h\.1\.mlp": lambda name: ".h.1.mlp." in name,  # a regex: one block's MLP (weights and biases)
}


@pytest.mark.parametrize("layers", list(LAYER_SUBSETS))
def test_loop_per_sample_norms_and_window_statistics_equal_a_float64_oracle(tmp_path, monkeypatch, layers):
    data = token_dataset(24, ragged=True)
    data[2]["labels"][:] = -100  # a sample without label tokens: weight 0, not counted
    init = tiny_model()
    seen_sq, seen_obs, seen_est = [], [], []
    real_sq, real_decide = SampleNormCapture.sq_norms, GNSSample.decide

    def record_sq(self):
        sq = real_sq(self)
        seen_sq.append(sq.detach().clone())
        return sq

    def record_decide(self, obs):
        seen_obs.append(obs)
        out = real_decide(self, obs)
        seen_est.append(self._window_estimate)
        return out

    monkeypatch.setattr(SampleNormCapture, "sq_norms", record_sq)
    monkeypatch.setattr(GNSSample, "decide", record_decide)
    rec = _Recorder()
    # threshold 0: never passes on noisy data, so the first window runs to the cap at the initial weights
    trainer = _train(
        tmp_path,
        data,
        model=copy.deepcopy(init),
        observers=[rec],
        gqc_threshold_start=0.0,
        gqc_max_microbatches=3,
        max_steps=1,
        gqc_sample_norm_layers=layers,
    )
    assert _windows(trainer) == [3]
    keep = LAYER_SUBSETS[layers]
    covered = {n for n, p in trainer.model.named_parameters() if keep(n)}
    assert covered and {id(p) for p in trainer._gqc_sample_capture.params} == {
        id(p) for n, p in trainer.model.named_parameters() if n in covered
    }
    model64 = copy.deepcopy(init).double()
    window_grads, window_counts = [], []
    for j, mb in enumerate(rec.inputs[:3]):
        grads, counts = _oracle_per_sample(model64, mb, keep)  # (B, P), (B,)
        torch.testing.assert_close(seen_sq[j].double(), grads.pow(2).sum(1), rtol=2e-4, atol=1e-7)
        window_grads.append(grads)
        window_counts.append(counts)
        mb_stats = seen_obs[j].sample_stats  # this microbatch's four numbers (after the reduction)
        assert mb_stats.count == int(counts.gt(0).sum())  # the label-less sample is not a draw
        assert mb_stats.weight_sum == float(counts.sum())
        assert mb_stats.weight_sq_sum == float(counts.pow(2).sum())
        assert mb_stats.sq_sum == pytest.approx(float(grads.pow(2).sum()), rel=2e-4)
        stats = sum((o.sample_stats for o in seen_obs[1 : j + 1]), seen_obs[0].sample_stats)  # the window's
        g = torch.cat(window_grads)  # (N, P) every sample of the window so far
        n = torch.cat(window_counts)  # (N,)
        g_w = (n[:, None] * g).sum(0) / n.sum()  # (P,) the window's token-mean gradient
        # the window norm the noise estimate uses: over the same parameters as the per-sample norms
        window_norm = seen_obs[j].mean_grad_norm if layers == "all" else seen_obs[j].sample_mean_grad_norm
        assert (seen_obs[j].sample_mean_grad_norm is None) == (layers == "all")
        assert window_norm == pytest.approx(float(g_w.norm()), rel=1e-4)
        # the estimate the controller decided on, against the closed form from explicit gradients
        est = noise.estimate_noise(stats, window_norm**2)
        decided = seen_est[j]  # what the controller itself computed from the same inputs
        assert decided.trace_sigma == pytest.approx(est.trace_sigma, rel=1e-9)
        assert decided.signal_sq == pytest.approx(est.signal_sq, rel=1e-9)
        real = n.gt(0)
        s, m, w2 = float(g[real].pow(2).sum(1).mean()), float(g_w @ g_w), float((n**2).sum() / n.sum() ** 2)
        assert est.trace_sigma == pytest.approx((s - m) / (1 - w2), rel=1e-3)
        assert est.signal_sq == pytest.approx((m - w2 * s) / (1 - w2), rel=1e-3)


def test_steps_on_the_first_draw_when_per_sample_noise_is_low_and_grows_windows_when_high(tmp_path):
    # Low noise: every sample is the same sequence, so every per-sample gradient is the same: tr(Sigma) ~ 0.
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(3))
    same = [
        {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(SEQ, dtype=torch.long)}
    ] * 24
    low = _train(tmp_path / "low", same, gqc_threshold_start=0.5)
    assert _windows(low) == [1] * 6
    assert all(e["gqc/b_simple"] < 1e-2 for e in low.state.log_history if "gqc/b_simple" in e)
    # High noise: random sequences at a tight tolerance: windows grow (here to the cap).
    high = _train(tmp_path / "high", token_dataset(48), gqc_threshold_start=0.05)
    assert sum(_windows(high)) == 12 and max(_windows(high)) == 4 and len(_windows(high)) < 12


def test_gns_sample_resumes_with_identical_decisions(tmp_path):
    kw = dict(
        gqc_threshold_start=0.3, gqc_gns_ema=0.5, save_strategy="steps", save_steps=2, num_train_epochs=2
    )
    full = _train(tmp_path / "full", pattern_dataset(), **kw)
    args = gqc_args(tmp_path / "resumed", gqc="gns_sample", gqc_max_microbatches=4, max_grad_norm=0.0, **kw)
    resumed = GradExtTrainer(tiny_model(), args=args, train_dataset=pattern_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    assert_same_decisions_after(full, resumed, 2, rel=1e-4)


def test_gns_sample_needs_labels_for_its_capture(tmp_path):
    from hf_gradext.errors import UserFacingError

    data = [{"input_ids": r["input_ids"]} for r in token_dataset(8)]
    with pytest.raises(UserFacingError, match="labels"):
        _train(tmp_path, data, gqc_threshold_start=1.0)


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        (
            {"gqc": "gnts", "gqc_sample_norm_layers": "norm"},
            r"--gqc_sample_norm_layers norm applies to --gqc gns_sample",
        ),
        ({"gqc": "gns_sample", "gqc_sample_norm_layers": " , "}, r"--gqc_sample_norm_layers is empty"),
    ],
)
def test_layers_flag_refused_at_parse_time_in_one_line(tmp_path, kw, pattern):
    from hf_gradext.arguments import GradExtArguments
    from hf_gradext.errors import UserFacingError

    with pytest.raises(UserFacingError, match=pattern) as info:
        GradExtArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
    assert "\n" not in str(info.value)


def test_layers_matching_no_module_are_refused_before_the_first_microbatch(tmp_path):
    from hf_gradext.errors import UserFacingError

    rec = _Recorder()
    with pytest.raises(UserFacingError, match="'nothing_here' matches no module") as info:
        _train(tmp_path, token_dataset(8), observers=[rec], gqc_sample_norm_layers="nothing_here")
    assert "\n" not in str(info.value) and rec.inputs == []

"""Per-sample squared gradient norms of every GQC training microbatch (what ``--gqc gns_sample`` decides on).

The norms come from the training backward itself: a :class:`~hf_gradext.grad.capture.CaptureEngine` on
every module that owns a trainable parameter (selection ``"all"``; a trainable module without per-sample
math is refused when the trainer starts) is armed around each microbatch by a
:class:`~hf_gradext.grad.observer.TrainingCaptureObserver`, which rescales the captured output gradients
so that sample ``i``'s gradient is that of *its own* mean token loss (the package's loss convention).
After the backward the ghost identity gives ``|g_i|^2`` without building any ``g_i``.

Because selection ``"all"`` hooks every module owning a trainable parameter, the per-sample norms cover
exactly the parameters of the loop's tested mean-gradient norm (every parameter with
``requires_grad``), as :func:`hf_gradext.gqc.noise.estimate_noise` requires.

``--gqc_sample_norm_layers SPEC`` (a :mod:`hf_gradext.grad.selection` spec, e.g. ``norm``) hooks only those
modules: the noise scale is then that of their parameters alone, ``tr(Sigma_S) / |G_S|^2``, so the loop
also measures the window's mean-gradient norm over exactly :attr:`SampleNormCapture.params`
(Gray et al. 2024 find the LayerNorm parameters' noise scale tracks the whole model's).

Weights (the samples' raw weights in the window's mean gradient, see :mod:`hf_gradext.gqc.noise`):

* token-sum loss (the loop's default, ``num_items_in_batch=1``): the window gradient is the token mean
  over the window, ``G_w = sum_i n_i g_i / sum_i n_i``: weight ``n_i`` (label tokens of sample ``i``);
* models whose forward takes no ``num_items_in_batch``: the window gradient is the mean of microbatch
  token means: weight ``n_i / n_mb`` (each microbatch weighs 1).

``--gqc_sample_norm_every N`` (N > 1): the loop arms the capture only on the run's microbatches
``0, N, 2N, ...`` (:meth:`hf_gradext.gqc.controllers.GNSSample.measures`; the index is the checkpointed
global microbatch count, so every rank and a resumed run measure the same ones). The others run with the
hooks disarmed (no records, no ghost math) and send :func:`hf_gradext.gqc.noise.weight_vector`: their exact
count and weights (from the labels: the window's ``W2`` stays exact) with ``sum |g_i|^2`` left to the
controller, which imputes ``count x`` the last measured ``mean |g_i|^2``. The window's tested norm ``M`` is
measured on every microbatch as before. Approximation: ``S = E|g_i|^2 = |G|^2 + tr(Sigma)`` is taken from up
to N - 1 microbatches back (stale by that much training) and from other samples than ``M`` (noisier, not
biased); see :mod:`hf_gradext.gqc.noise`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from hf_gradext.gqc.noise import sample_norm_vector
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.factors import total_sq_norms
from hf_gradext.grad.loss_scaling import valid_token_counts
from hf_gradext.grad.observer import TrainingCaptureObserver

# Numbers per microbatch in the loop's post-backward reduction (count, sum |g_i|^2, sum w, sum w^2).
VECTOR_SIZE = 4


def sample_weights(inputs: Mapping[str, Any], shift: bool, token_sum_loss: bool) -> torch.Tensor | None:
    """(B,) raw weight of each sample of ``inputs`` in the window's mean gradient (module docstring).

    Args:
        inputs: the microbatch.
        shift: the loss predicts ``labels[..., 1:]`` (:func:`hf_gradext.integrations.loss.shifts_labels`).
        token_sum_loss: the loop backwards token sums (else microbatch token means).

    ``None`` (equal weights) without labels; the capture itself refuses such a batch.
    """
    if "shift_labels" in inputs:
        counts = valid_token_counts(inputs["shift_labels"], shift=False)
    elif "labels" in inputs:
        counts = valid_token_counts(inputs["labels"], shift=shift)
    else:
        return None
    counts = counts.to(torch.float64)  # (B,)
    return counts if token_sum_loss else counts / counts.sum().clamp_min(1.0)


class SampleNormCapture:
    """Capture hooks on ``model`` and the (4,) statistics vector of each captured microbatch.

    Args:
        model: the trained model (plain or wrapped; hooks go on its inner modules and survive DDP wrapping).
        layers: which modules (:mod:`hf_gradext.grad.selection`); ``"all"``: every module owning a trainable
            parameter.

    Attributes:
        params: the trainable parameters the per-sample norms cover (each once, in model order).
        covers_all: ``params`` are all of the model's trainable parameters.
    """

    def __init__(self, model: torch.nn.Module, layers: str = "all") -> None:
        self.engine = CaptureEngine(model, layers, keep=True)
        self._observer = TrainingCaptureObserver(self.engine)
        owned = {id(p) for m in self.engine.modules.values() for p in m.parameters(recurse=False)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.params: list[torch.nn.Parameter] = [p for p in trainable if id(p) in owned]
        self.covers_all = len(self.params) == len(trainable)

    @contextmanager
    def microbatch(
        self, trainer: Any, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> Iterator[None]:
        """Arm the hooks for the ``training_step`` run inside the block (one forward + backward)."""
        self._observer.before_microbatch(trainer, inputs, num_items_in_batch)
        try:
            yield
        finally:
            self._observer.after_microbatch(trainer, inputs, None)  # disarms, also after an exception

    def sq_norms(self) -> torch.Tensor:
        """(B,) squared norms of the captured per-sample gradients, summed over every parameter; frees the records."""
        contribs = self.engine.contributions()
        self.engine.records = {}  # the (a, g) pairs hold activation-sized memory until the next capture
        if not contribs:
            raise RuntimeError("gns_sample: the capture recorded no layer in this microbatch's backward")
        # (B,); each parameter's term clipped at 0 (the ghost identity can round a tiny norm below 0)
        return total_sq_norms(contribs)

    def vector(self, weights: torch.Tensor | None) -> torch.Tensor:
        """:func:`hf_gradext.gqc.noise.sample_norm_vector` of this microbatch, float64 (4,) on the device."""
        return sample_norm_vector(self.sq_norms(), weights)

    def remove(self) -> None:
        self.engine.remove()

"""Token accuracy: the fraction of positions whose predicted token equals the reference token.

A local ``evaluate`` module (loaded by path, so it works offline): ``evaluate.load("accuracy")``
would fetch its script from the Hub and also needs scikit-learn. Positions whose reference equals
``ignore_index`` (default -100, HF's label padding) are left out of both numerator and denominator.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of (non-ignored) token positions where prediction == reference."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted token ids (flattened).
    references (list of int): reference token ids (flattened), same length.
    ignore_index (int): references equal to this value are skipped. Default -100.
Returns:
    accuracy (float): in [0, 1]; 0.0 when every position is ignored.
Example:
    >>> metric = evaluate.load("hf_gradext/metrics/token_accuracy")
    >>> metric.compute(predictions=[1, 2, 3], references=[1, 0, -100])
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, ignore_index=-100):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        keep = references != ignore_index
        total = int(keep.sum())
        if total == 0:
            return {"accuracy": 0.0}
        return {"accuracy": float((predictions[keep] == references[keep]).sum() / total)}

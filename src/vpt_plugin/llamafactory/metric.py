"""Token accuracy at evaluation, with one figure per VPT token (``compute_classwise_accuracy``).

``<|B_action|>`` tokens are left out of every figure: the model never predicts them (their
labels are ignored in the loss; generation writes them). LLaMA-Factory builds its metric
with no arguments after loading the tokenizer, so the loader hands the token ids over
(:func:`vpt_plugin.llamafactory.metric_tokens.configure_metric`) for the run.
"""

from dataclasses import dataclass

import numpy as np
from llamafactory.extras.misc import numpify
from llamafactory.train.sft.metric import ComputeAccuracy
from transformers import EvalPrediction

from ..modeling_vpt import IGNORE_INDEX
from .metric_tokens import _ACTION_IDS, _CLASS_TOKENS


@dataclass
class VPTTokenAccuracy(ComputeAccuracy):
    """LLaMA-Factory's token accuracy, plus ``accuracy_<token>`` for each VPT token that occurs
    in the labels and ``accuracy_vpt_tokens`` over all of them."""

    def __call__(self, eval_preds, compute_result: bool = True):
        if _ACTION_IDS:
            labels = numpify(eval_preds.label_ids).copy()
            labels[np.isin(labels, list(_ACTION_IDS))] = IGNORE_INDEX
            eval_preds = EvalPrediction(predictions=eval_preds.predictions, label_ids=labels)
        if _CLASS_TOKENS:
            preds, labels = numpify(eval_preds.predictions), numpify(eval_preds.label_ids)
            preds, labels = preds[:, :-1], labels[:, 1:]
            kept = labels != IGNORE_INDEX
            preds, labels = preds[kept], labels[kept]
            in_class = np.isin(labels, list(_CLASS_TOKENS.values()))
            if in_class.any():
                self.score_dict.setdefault("accuracy_vpt_tokens", []).append(np.mean(preds[in_class] == labels[in_class]))
            for name, token_id in _CLASS_TOKENS.items():
                hit = labels == token_id
                if hit.any():
                    self.score_dict.setdefault(name, []).append(np.mean(preds[hit] == labels[hit]))
        return super().__call__(eval_preds, compute_result)

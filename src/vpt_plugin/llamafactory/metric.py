"""Token accuracy at evaluation, with one figure per VPT token (``compute_classwise_accuracy``).

``<|B_action|>`` tokens are left out of every figure: the model never predicts them (their
labels are ignored in the loss; generation writes them). LLaMA-Factory builds its metric
with no arguments after loading the tokenizer, so the loader hands the token ids over
(:func:`configure_metric`) for the run.
"""

from dataclasses import dataclass

import numpy as np
from transformers import EvalPrediction
from llamafactory.extras.misc import numpify
from llamafactory.train.sft.metric import ComputeAccuracy

from ..branches import get_branch
from ..modeling_vpt import IGNORE_INDEX
from ..vocabulary import region_tokens

# For the current run: metric name -> token id, and the ids of the <|B_action|> tokens.
_CLASS_TOKENS: dict[str, int] = {}
_ACTION_IDS: set[int] = set()


def configure_metric(tokenizer, vpt_args, branch_names) -> None:
    """Choose the tokens reported one by one (``class_set``, or every VPT token the model predicts)."""
    _CLASS_TOKENS.clear()
    vocab = tokenizer.get_vocab()
    actions = [get_branch(name).tokens.action for name in branch_names]
    _ACTION_IDS.clear()
    _ACTION_IDS.update(vocab[token] for token in actions if token in vocab)
    if not vpt_args.compute_classwise_accuracy:
        return
    tokens = vpt_args.class_tokens
    if not tokens:
        tokens = region_tokens()
        for name in branch_names:
            branch_tokens = get_branch(name).tokens
            tokens += [branch_tokens.action_start, branch_tokens.action_end]
    unknown = [token for token in tokens if token not in vocab]
    if unknown:
        raise ValueError(f"recipe key class_set: {unknown} are not tokens of this tokenizer")
    for token in tokens:
        if token not in actions:
            _CLASS_TOKENS["accuracy_" + token.strip("<|>")] = vocab[token]


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

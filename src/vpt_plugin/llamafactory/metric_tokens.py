"""The VPT tokens evaluation reports one by one, chosen when the tokenizer loads.

Kept apart from :mod:`.metric` (which subclasses LLaMA-Factory's training metric) so that
loading a tokenizer for chat or serving does not import LLaMA-Factory's training package.
"""

from ..branches import get_branch
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

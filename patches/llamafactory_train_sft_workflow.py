"""Patch of ``llamafactory.train.sft.workflow``: evaluation reports accuracy on the VPT tokens.

What changes: ``run_sft`` builds its ``compute_accuracy`` metric from
:class:`vpt_plugin.llamafactory.metric.VPTTokenAccuracy`, which reports LLaMA-Factory's
``accuracy`` as before plus, under ``compute_classwise_accuracy``, one accuracy per token of
``class_set`` (the published recipes' evaluation).

Why no public hook serves: ``run_sft`` constructs ``ComputeAccuracy()`` itself; a recipe
cannot name another metric.
"""

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.train.sft.workflow"
CHECKED_AGAINST = {"run_sft": "6b178bd3accf3754"}


def apply_sft_workflow_patch(workflow) -> None:
    check_upstream(workflow, CHECKED_AGAINST, __name__)
    from vpt_plugin.llamafactory.metric import VPTTokenAccuracy

    workflow.ComputeAccuracy = VPTTokenAccuracy

"""Patch of ``llamafactory.train.sft.workflow``: VPT token accuracy; a broken checkpoint to resume from is named.

What changes: ``run_sft`` builds its ``compute_accuracy`` metric from
:class:`vpt_plugin.llamafactory.metric.VPTTokenAccuracy`, which reports LLaMA-Factory's
``accuracy`` as before plus, under ``compute_classwise_accuracy``, one accuracy per token of
``class_set`` (the published recipes' evaluation). Before it runs, the checkpoint it will resume
from (``resume_from_checkpoint``, or the last one LLaMA-Factory found in ``output_dir``) has its
safetensors files checked: a truncated or corrupted one is named before the model is built,
rather than by the Trainer's loader after it.

Why no public hook serves: ``run_sft`` constructs ``ComputeAccuracy()`` itself; a recipe
cannot name another metric; the Trainer reads the checkpoint inside ``train``, with no hook before.
The tuner's ``from .sft import run_sft`` runs after this patch, so it binds the wrapped function.
"""

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.train.sft.workflow"
CHECKED_AGAINST = {"run_sft": "6b178bd3accf3754"}


def apply_sft_workflow_patch(workflow) -> None:
    check_upstream(workflow, CHECKED_AGAINST, __name__)
    from vpt_plugin.checkpoint import check_safetensors_folder
    from vpt_plugin.llamafactory.metric import VPTTokenAccuracy

    workflow.ComputeAccuracy = VPTTokenAccuracy
    upstream_run_sft = workflow.run_sft

    def run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
        if training_args.do_train and training_args.resume_from_checkpoint:
            check_safetensors_folder(training_args.resume_from_checkpoint, "resume_from_checkpoint")
        return upstream_run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)

    workflow.run_sft = run_sft

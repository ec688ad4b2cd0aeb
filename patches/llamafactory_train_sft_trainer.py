"""Patch of ``llamafactory.train.sft.trainer``: predictions carry the VPT perception trace.

What changes: with ``predict_with_generate``, ``CustomSeq2SeqTrainer.prediction_step`` keeps
the trace the VPT model's one-call generation left (``model.vpt_last_traces``: the perception
tokens, boxes in pixels, branch, and why tokens were not acted on), gathered across processes
in the order the predictions are; ``save_predictions`` adds it to each line of
``generated_predictions.jsonl`` as ``vpt_trace``. Other models' predictions are unchanged.

Why no public hook serves: the Seq2SeqTrainer's generate call returns token ids only, and
``save_predictions`` writes a fixed set of fields.
"""

import json
import os

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.train.sft.trainer"
CHECKED_AGAINST = {
    "CustomSeq2SeqTrainer.prediction_step": "960641928105a0bc",
    "CustomSeq2SeqTrainer.save_predictions": "e18c978582e96d26",
}


def apply_sft_trainer_patch(trainer_module) -> None:
    check_upstream(trainer_module, CHECKED_AGAINST, __name__)
    trainer_class = trainer_module.CustomSeq2SeqTrainer
    upstream_prediction_step = trainer_class.prediction_step
    upstream_save_predictions = trainer_class.save_predictions

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        result = upstream_prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        traces = getattr(self.accelerator.unwrap_model(model), "vpt_last_traces", None)
        if self.args.predict_with_generate and traces is not None:
            gathered = self.accelerator.gather_for_metrics(traces, use_gather_object=True)
            self.vpt_traces = getattr(self, "vpt_traces", []) + list(gathered)
        return result

    def save_predictions(self, dataset, predict_results, skip_special_tokens=True):
        upstream_save_predictions(self, dataset, predict_results, skip_special_tokens)
        traces = getattr(self, "vpt_traces", None)
        path = os.path.join(self.args.output_dir, "generated_predictions.jsonl")
        if not self.is_world_process_zero() or not traces or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as lines:
            records = [json.loads(line) for line in lines]
        if len(records) != len(traces):
            raise RuntimeError(f"{len(traces)} VPT traces for {len(records)} predictions in {path}")
        with open(path, "w", encoding="utf-8") as out:
            for record, trace in zip(records, traces):
                out.write(json.dumps({**record, "vpt_trace": trace}, ensure_ascii=False) + "\n")

    trainer_class.prediction_step = prediction_step
    trainer_class.save_predictions = save_predictions

"""Patch of ``llamafactory.train.sft.trainer``: predictions carry the VPT perception trace; logs carry the loss's parts.

What changes: with ``predict_with_generate``, ``CustomSeq2SeqTrainer.prediction_step`` keeps
the trace the VPT model's one-call generation left (``model.vpt_last_traces``: the perception
tokens, boxes in pixels, branch, and why tokens were not acted on), gathered across processes
in the order the predictions are; ``save_predictions`` adds it to each line of
``generated_predictions.jsonl`` as ``vpt_trace``. Other models' predictions are unchanged.
In training, ``compute_loss`` keeps the parts of a VPT model's loss (``lm_loss``, ``box_l1``,
``box_giou``, ``mask_bce``, ``mask_dice``: the model output's fields) and ``log`` adds them beside ``loss``,
each summed over the logging interval's micro-batches (this process's) and divided by their number, a
micro-batch without boxes or masks adding 0: ``loss = lm_loss + w_box * (box_l1 + box_giou) + w_mask *
(mask_bce + mask_dice)`` holds for the logged means too. ``_save`` of a LoRA adapter on a VPT model
also writes the model's VPT settings beside it (``vpt_adapter_settings.json``), which loading the
adapter on the plain base reads (vpt_plugin.llamafactory.model_loading.apply_adapter_settings).

Why no public hook serves: the Seq2SeqTrainer's generate call returns token ids only, and
``save_predictions`` writes a fixed set of fields; the Trainer logs the total loss only, and a
callback never sees the model's outputs; ``on_save`` callbacks run only for checkpoints, not for the
final save, and know no output folder of their own.
"""

import json
import os

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.train.sft.trainer"
CHECKED_AGAINST = {
    "CustomSeq2SeqTrainer.prediction_step": "960641928105a0bc",
    "CustomSeq2SeqTrainer.save_predictions": "e18c978582e96d26",
    "CustomSeq2SeqTrainer.compute_loss": "c1102bcaea311b8c",
    "CustomSeq2SeqTrainer.log": "73b8e3acd21a7b73",  # transformers' Trainer.log (5.6.0)
    "CustomSeq2SeqTrainer._save": "bf720120f407bab3",  # transformers' Trainer._save (5.6.0)
}
LOSS_PARTS = ("lm_loss", "box_l1", "box_giou", "mask_bce", "mask_dice")


def apply_sft_trainer_patch(trainer_module) -> None:
    check_upstream(trainer_module, CHECKED_AGAINST, __name__)
    trainer_class = trainer_module.CustomSeq2SeqTrainer
    upstream_prediction_step = trainer_class.prediction_step
    upstream_save_predictions = trainer_class.save_predictions
    upstream_compute_loss = trainer_class.compute_loss
    upstream_log = trainer_class.log
    upstream_save = trainer_class._save

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = upstream_compute_loss(self, model, inputs, return_outputs=True, **kwargs)
        loss, outputs = result if isinstance(result, tuple) else (result, None)
        if model.training and outputs is not None and hasattr(outputs, "get") and outputs.get("lm_loss") is not None:
            parts = getattr(self, "vpt_loss_parts", {})
            for name in LOSS_PARTS:
                if outputs.get(name) is not None:
                    parts[name] = parts.get(name, 0.0) + float(outputs[name].detach())
            self.vpt_loss_parts = parts
            self.vpt_loss_micro_batches = getattr(self, "vpt_loss_micro_batches", 0) + 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        parts = getattr(self, "vpt_loss_parts", None)
        if "loss" in logs and parts:
            logs.update({name: round(total / self.vpt_loss_micro_batches, 4) for name, total in parts.items()})
            self.vpt_loss_parts, self.vpt_loss_micro_batches = {}, 0
        upstream_log(self, logs, start_time)

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

    def _save(self, output_dir=None, state_dict=None):
        upstream_save(self, output_dir, state_dict)
        from vpt_plugin.llamafactory.model_loading import ADAPTER_SETTINGS_FILE

        model = self.accelerator.unwrap_model(self.model)
        settings = getattr(model, "vpt_adapter_settings", None)  # a PeftModel reads it from the model it wraps
        if settings is not None and hasattr(model, "peft_config"):
            path = os.path.join(output_dir or self.args.output_dir, ADAPTER_SETTINGS_FILE)
            with open(path, "w", encoding="utf-8") as out:
                json.dump(settings, out, indent=1)

    trainer_class.prediction_step = prediction_step
    trainer_class.save_predictions = save_predictions
    trainer_class.compute_loss = compute_loss
    trainer_class.log = log
    trainer_class._save = _save

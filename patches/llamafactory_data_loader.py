"""Patch of ``llamafactory.data.loader``: the ``vpt_sharegpt`` converter learns each row's index.

What changes: for datasets with ``formatting: vpt_sharegpt``, ``align_dataset`` maps the
converter with ``with_indices=True``, so a bad row's error names its index, and with
``predict_with_generate`` tells the converter to keep each row's question and final answer
only (the model runs its own perception turns). Other formattings go through upstream
``align_dataset`` unchanged. Any formatting: ``streaming: true`` on a local file with
``dataloader_num_workers: 0`` (LLaMA-Factory's default) is refused with what to set, rather than
ending in a bare ``StopIteration``: ``_load_single_dataset`` splits the file into that many shards,
and zero shards is an empty stream.

Why no public hook serves: converters are called one example at a time by
``llamafactory.data.converter.align_dataset`` with no index; ``_load_single_dataset`` calls
it through this module's globals, which is where the index can be added.
"""

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.data.loader"
CHECKED_AGAINST = {"_load_single_dataset": "832a51bcf55bc509"}
CONVERTER_TARGET = "llamafactory.data.converter"
CONVERTER_CHECKED_AGAINST = {"align_dataset": "b1410ac6622d147d"}


def apply_data_loader_patch(loader) -> None:
    check_upstream(loader, CHECKED_AGAINST, __name__)
    from llamafactory.data import converter

    check_upstream(converter, CONVERTER_CHECKED_AGAINST, __name__)
    from vpt_plugin.llamafactory.converter import FORMATTING

    upstream_align_dataset = loader.align_dataset

    def align_dataset(dataset, dataset_attr, data_args, training_args):
        if data_args.streaming and dataset_attr.load_from == "file" and not training_args.dataloader_num_workers:
            raise ValueError(
                f"dataset {dataset_attr.dataset_name}: `streaming: true` reads a local file as "
                "`dataloader_num_workers` shards (LLaMA-Factory 0.9.5), and with 0 workers the stream is empty; "
                "set `dataloader_num_workers: 1` or more, or `streaming: false`")
        if dataset_attr.formatting != FORMATTING:
            return upstream_align_dataset(dataset, dataset_attr, data_args, training_args)
        # upstream align_dataset, plus with_indices
        column_names = list(next(iter(dataset)).keys())
        kwargs = {}
        if not data_args.streaming:
            kwargs = dict(
                num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=(not data_args.overwrite_cache) or (training_args.local_process_index != 0),
                desc="Converting format of dataset",
            )
        dataset_converter = converter.get_dataset_converter(dataset_attr.formatting, dataset_attr, data_args)
        dataset_converter.question_only = bool(getattr(training_args, "predict_with_generate", False))
        return dataset.map(dataset_converter, batched=False, with_indices=True, remove_columns=column_names, **kwargs)

    loader.align_dataset = align_dataset

"""Patch of ``llamafactory.data.parser``: dataset_info.json maps branch image and box columns.

What changes: ``DatasetAttr.join`` also reads the branch image columns (``detection_images``,
``seg_images``, ``clip_images``) and the ``boxes`` and ``masks`` columns from an entry's ``columns``, as it reads
``images``, and the entry's ``box_units`` (``normalized``, the default, or ``pixels``).
``get_dataset_list``, which knows each entry's key, then reads an entry that maps them with
``"formatting": "sharegpt"`` (the released dataset_info.json) as ``vpt_sharegpt``, with one notice,
and refuses another formatting, which would drop them, naming the key.

Why no public hook serves: ``join`` copies a fixed list of column names and does not know the
entry's key; the converter registry lets us add a formatting but not the columns it reads.
The loader's ``from .parser import get_dataset_list`` runs after this patch, so it binds the patched function.
"""

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.data.parser"
CHECKED_AGAINST = {"DatasetAttr.join": "2ed7cd79b70943c4", "get_dataset_list": "bcba272caa1d2c47"}


def apply_data_parser_patch(parser_module) -> None:
    check_upstream(parser_module, CHECKED_AGAINST, __name__)
    from vpt_plugin.llamafactory.converter import vpt_columns_of, vpt_formatting

    dataset_attr = parser_module.DatasetAttr
    upstream_join = dataset_attr.join
    upstream_get_dataset_list = parser_module.get_dataset_list

    def join(self, attr):
        upstream_join(self, attr)
        self.vpt_columns = vpt_columns_of(attr.get("columns", {}))
        for column, key in self.vpt_columns.items():
            setattr(self, column, key)
        self.box_units = attr.get("box_units", "normalized")

    def get_dataset_list(dataset_names, dataset_dir):
        attrs = upstream_get_dataset_list(dataset_names, dataset_dir)
        for name, attr in zip(dataset_names or [], attrs):
            attr.formatting = vpt_formatting(attr.formatting, getattr(attr, "vpt_columns", {}), name)
        return attrs

    dataset_attr.join = join
    parser_module.get_dataset_list = get_dataset_list

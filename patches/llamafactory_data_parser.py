"""Patch of ``llamafactory.data.parser``: dataset_info.json maps branch image and box columns.

What changes: ``DatasetAttr.join`` also reads the branch image columns (``detection_images``,
``seg_images``, ``clip_images``) and the ``boxes`` and ``masks`` columns from an entry's ``columns``, as it reads
``images``, and the entry's ``box_units`` (``normalized``, the default, or ``pixels``); it refuses
them under a formatting other than ``vpt_sharegpt`` (which would drop them).

Why no public hook serves: ``join`` copies a fixed list of column names; the converter
registry lets us add a formatting but not the columns it reads.
"""

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.data.parser"
CHECKED_AGAINST = {"DatasetAttr.join": "2ed7cd79b70943c4"}


def apply_data_parser_patch(parser_module) -> None:
    check_upstream(parser_module, CHECKED_AGAINST, __name__)
    from vpt_plugin.llamafactory.converter import branch_columns_for

    dataset_attr = parser_module.DatasetAttr
    upstream_join = dataset_attr.join

    def join(self, attr):
        upstream_join(self, attr)
        columns = branch_columns_for(self.formatting, attr.get("columns", {}), self.dataset_name)
        for column, key in columns.items():
            setattr(self, column, key)
        self.box_units = attr.get("box_units", "normalized")

    dataset_attr.join = join

"""Patch of ``llamafactory.hparams.parser``: recipes may carry the VPT keys and the published keys.

What changes: ``_parse_args`` (the one function every ``get_*_args`` parses through) first
takes the VPT keys out of the recipe and renames the published fork's keys
(:func:`vpt_plugin.llamafactory.arguments.split_vpt_arguments`), lets LLaMA-Factory parse
the rest as before, and attaches the VPT keys to the parsed ``ModelArguments`` as ``.vpt``.

Why no public hook serves: LLaMA-Factory's argument dataclasses are fixed lists inside this
module and ``HfArgumentParser`` rejects unknown keys; there is no registry of extra arguments.
"""

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.hparams.parser"
CHECKED_AGAINST = {"_parse_args": "9be0738ee0227b8e"}


def apply_hparams_parser_patch(parser_module) -> None:
    check_upstream(parser_module, CHECKED_AGAINST, __name__)
    from llamafactory.hparams import ModelArguments

    from vpt_plugin.llamafactory.arguments import split_vpt_arguments

    upstream_parse_args = parser_module._parse_args

    def _parse_args(parser, args=None, allow_extra_keys=False):
        if ModelArguments not in parser.dataclass_types:  # e.g. get_ray_args
            return upstream_parse_args(parser, args, allow_extra_keys)
        args, vpt_args = split_vpt_arguments(parser_module.read_args(args))
        parsed = upstream_parse_args(parser, args, allow_extra_keys)
        for arguments in parsed:
            if isinstance(arguments, ModelArguments):
                arguments.vpt = vpt_args
        return parsed

    parser_module._parse_args = _parse_args

"""Evaluate VPT models: ``python evaluation/evaluation.py --config evaluation/evaluation.yaml``.

Runs from the repository root or from inside ``evaluation/``: paths in the YAML are relative
to the repository root. See ``vpt_plugin.evaluation.runner`` for what it writes.
"""

from pathlib import Path

from vpt_plugin.evaluation.runner import main

if __name__ == "__main__":
    main(repo=Path(__file__).resolve().parent.parent)

"""lm-evaluation-harness task files on local JSON lines, for the tests that evaluate LLMs."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_task(
    folder: Path, name: str, rows: Sequence[dict[str, Any]], *, multiple_choice: bool = True
) -> Path:
    """Write ``<name>.jsonl`` and ``<name>.yaml`` (task ``mf_<name>``, test split) in ``folder``.

    Multiple choice: rows of ``question``, ``choices``, ``label``, scored by ``acc``; otherwise
    rolling log-likelihood of each row's ``text``, scored by ``word_perplexity``.
    """
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    if multiple_choice:
        kind = """\
            output_type: multiple_choice
            doc_to_text: "{{question}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: label
            metric_list:
              - metric: acc"""
    else:
        kind = """\
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity"""
    head = f"""\
            task: mf_{name}
            dataset_path: json
            dataset_kwargs:
              data_files: {{test: {data}}}
            test_split: test
"""
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(head + kind) + "\n")
    return path

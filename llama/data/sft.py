"""Supervised fine-tuning records: ``{"input", "output"}`` -> tokens + a loss mask that is 1 on the answer only.

The prompt template holds ``{output}`` exactly once; everything before it (formatted with the record's fields,
NeMo's ``prompt_template "{input} {output}"`` convention) is the prompt, which gets no loss; the output, the rest of
the template and the end-of-document token are the answer, which does. Prompt and answer are tokenized separately
(so the answer's first token starts with sentencepiece's word-start piece, as at inference after the prompt).
Records are then packed several per sequence by ``PackedDataset`` (concat-then-split); mask 0 becomes label -100.
"""
from __future__ import annotations

import string

from llama.data.errors import DataError

DEFAULT_PROMPT_TEMPLATE = "{input}\n{output}"
# GLUE QNLI labels: 0 = entailment, 1 = not_entailment (the GLUE/HF datasets convention).
QNLI_LABELS = ("entailment", "not_entailment")


def split_template(template: str) -> tuple[str, str, tuple[str, ...]]:
    """(prompt part, answer suffix, the record fields the prompt needs); DataError for an unusable template."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"prompt template {template!r}: {e}") from None
    if fields.count("output") != 1:
        raise DataError(f"prompt template {template!r} must contain {{output}} exactly once")
    prompt, suffix = template.split("{output}", 1)
    if any(f for _, f, _, _ in string.Formatter().parse(suffix) if f):
        raise DataError(f"prompt template {template!r}: no field may follow {{output}}")
    needed = tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(prompt) if f))
    if any(not f.isidentifier() for f in needed):
        raise DataError(f"prompt template {template!r}: fields must be plain names, got {needed}")
    return prompt, suffix, needed


def format_qnli(record: dict, where: str = "record") -> dict:
    """QNLI (``question``, ``sentence``, ``label``) -> ``{"input", "output"}`` in NeMo's GLUE wording
    (``qnli question: ... sentence: ...``); label an int (0/1) or the label name."""
    for key in ("question", "sentence", "label"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{where}: label must be 0, 1, 'entailment' or 'not_entailment', got {label!r}")
    if isinstance(label, int):
        if label not in (0, 1):
            raise DataError(f"{where}: label must be 0 (entailment) or 1 (not_entailment), got {label}")
        label = QNLI_LABELS[label]
    elif label not in QNLI_LABELS:
        raise DataError(f"{where}: label must be one of {QNLI_LABELS}, got {label!r}")
    return {"input": f"qnli question: {record['question']} sentence: {record['sentence']}", "output": label}


def prompt_and_answer(record: dict, template_parts, where: str) -> tuple[str, str]:
    prompt_t, suffix, needed = template_parts
    for key in needed + ("output",):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    return prompt_t.format_map({k: record[k] for k in needed}), record["output"] + suffix


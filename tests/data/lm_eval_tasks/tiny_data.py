"""Datasets of the tiny offline lm-eval tasks, read from the jsonl files beside this module, and one
process_results function (tiny_gen_text.yaml).

Task YAMLs name them as `custom_dataset: !function tiny_data.NAME`: lm-eval imports this file from the
YAML's folder, so the tasks load from any working directory, with no network and no datasets cache.
"""

import json
import zlib
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _split(name: str) -> datasets.DatasetDict:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def tiny_mc(**metadata) -> datasets.DatasetDict:
    return _split("tiny_mc.jsonl")


def tiny_gen(**metadata) -> datasets.DatasetDict:
    return _split("tiny_gen.jsonl")


def generated_text(doc, results) -> dict:
    """Metrics that see the generated text itself (a model that is still random matches no answer):
    its length, and its CRC-32 as a fraction, so that any other string gives another mean."""
    (text,) = results
    return {"chars": len(text), "text_crc": zlib.crc32(text.encode("utf-8")) / 2**32}

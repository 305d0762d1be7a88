"""The embedded default corpus: text already on every machine, so ``python train.py`` trains with no download.

Two sources, built once under ``cache_dir`` and reused:
- ``stdlib``: the source files of this Python's standard library (sorted paths under ``sysconfig``'s stdlib,
  without tests, ``site-packages``, ``idlelib``, ``turtledemo``, ``lib2to3``, the codec tables of
  ``encodings``, and files that are not UTF-8), an evenly strided
  subset of about ``corpus_bytes`` bytes, one document per file. The standard library differs between Python
  versions, so this corpus (and every exact loss on it) depends on the Python version; the manifest records it.
- ``qnli``: a generated QNLI-style task (question / sentence / entailment label over invented facts), formatted by
  ``format_qnli`` and stored as SFT data (loss on the answer only).
A sentencepiece tokenizer with Llama 2's settings (``DEFAULT_VOCAB_SIZE`` pieces) is trained on both. A manifest
(``manifest.json``: parameters, Python version, sha256 of every file) validates the cache; concurrent first calls
(several ranks) serialise on an ``fcntl`` lock and the later ones reuse the result.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import sys
import sysconfig

from llama.data.errors import DataError
from llama.data.prepare import prepare
from llama.data.sft import DEFAULT_PROMPT_TEMPLATE, format_qnli
from llama.data.tokenizer import sha256_file, train_tokenizer, write_json_atomic

DEFAULT_VOCAB_SIZE = 2048
DEFAULT_CORPUS_BYTES = 4_000_000
DEFAULT_QNLI_RECORDS = 20_000
DEFAULT_WEIGHTS = {"stdlib": 0.8, "qnli": 0.2}
MANIFEST_VERSION = 2      # bump whenever the corpus rules change: older caches are rebuilt
_SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "turtledemo", "__pycache__", "lib2to3",
              "encodings"}


def stdlib_files(corpus_bytes: int = DEFAULT_CORPUS_BYTES) -> list[tuple[str, str]]:
    """(relative path, text) of the chosen standard-library files, in sorted path order."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("test"))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                path = os.path.join(folder, name)
                found.append((os.path.relpath(path, root), path))
    found.sort()
    total = sum(os.path.getsize(p) for _, p in found)
    stride = max(1, round(total / max(1, corpus_bytes)))
    chosen = []
    for rel, path in found[::stride]:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            chosen.append((rel, text))
    if not chosen:
        raise DataError(f"{root}: no Python sources found for the default corpus")
    return chosen


_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zen", "dar", "bel", "qui", "sor", "fa", "gri", "hal", "mo")
_ATTRIBUTES = {
    "capital": ("city", ["Arden", "Belmor", "Corvi", "Dunhal", "Estra", "Fenwick", "Galto", "Hirsa", "Ilmor",
                         "Jastre"]),
    "colour of the flag": ("colour", ["red", "blue", "green", "white", "black", "gold", "purple", "orange"]),
    "river": ("river", ["Amber", "Silt", "Nareth", "Ovel", "Prane", "Quill", "Rosk", "Tamber"]),
    "founding year": ("year", [str(y) for y in range(1100, 1900, 37)]),
    "largest export": ("good", ["wool", "copper", "tea", "salt", "timber", "glass", "silk", "grain"]),
}


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def qnli_records(n: int, seed: int = 0) -> list[dict]:
    """Deterministic QNLI-style records: does the sentence answer the question? About half are entailment."""
    rng = random.Random(seed)
    countries = sorted({_name(rng) for _ in range(400)})
    facts = {(c, a): rng.choice(values) for c in countries for a, (_, values) in _ATTRIBUTES.items()}
    attrs = sorted(_ATTRIBUTES)
    out = []
    for _ in range(n):
        country, attr = rng.choice(countries), rng.choice(attrs)
        question = rng.choice([f"What is the {attr} of {country}?", f"Which {_ATTRIBUTES[attr][0]} is the {attr} "
                                                                    f"of {country}?"])
        if rng.random() < 0.5:
            c2, a2, label = country, attr, 0
        elif rng.random() < 0.5:
            c2, a2, label = rng.choice(countries), attr, 1
            if c2 == country:
                label = 0
        else:
            c2, a2, label = country, rng.choice([a for a in attrs if a != attr]), 1
        sentence = rng.choice([f"The {a2} of {c2} is {facts[(c2, a2)]}.",
                               f"{c2} is known for its {a2}, {facts[(c2, a2)]}."])
        out.append({"question": question, "sentence": sentence, "label": label})
    return out


def _write_jsonl(path: str, records) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _valid_manifest(cache_dir: str, params: dict):
    path = os.path.join(cache_dir, "manifest.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("params") != params:
        return None
    for rel, digest in manifest.get("files", {}).items():
        p = os.path.join(cache_dir, rel)
        if not os.path.isfile(p) or sha256_file(p) != digest:
            return None
    return manifest


def prepare_default_data(cache_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE,
                         corpus_bytes: int = DEFAULT_CORPUS_BYTES, qnli_count: int = DEFAULT_QNLI_RECORDS,
                         workers: int = 1, seed: int = 0) -> dict:
    """Build (once) and return ``{"tokenizer": path, "sources": [(prefix, weight), ...], "vocab_size": N, ...}``."""
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    params = {"version": MANIFEST_VERSION, "vocab_size": vocab_size, "corpus_bytes": corpus_bytes,
              "qnli_count": qnli_count, "seed": seed, "python": sys.version.split()[0]}
    manifest = _valid_manifest(cache_dir, params)
    if manifest is None:
        os.makedirs(cache_dir, exist_ok=True)
        with open(os.path.join(cache_dir, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = _valid_manifest(cache_dir, params) or _build(cache_dir, params, workers)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return _result(cache_dir, manifest)


def _result(cache_dir: str, manifest: dict) -> dict:
    return {"tokenizer": os.path.join(cache_dir, manifest["tokenizer"]),
            "sources": [(os.path.join(cache_dir, p), w) for p, w in manifest["sources"]],
            "vocab_size": manifest["params"]["vocab_size"], "python": manifest["params"]["python"],
            "manifest": os.path.join(cache_dir, "manifest.json")}


def _build(cache_dir: str, params: dict, workers: int) -> dict:
    manifest_path = os.path.join(cache_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.unlink(manifest_path)       # stale: whatever follows must not look valid until complete
    files = stdlib_files(params["corpus_bytes"])
    stdlib_jsonl = os.path.join(cache_dir, "stdlib.jsonl")
    _write_jsonl(stdlib_jsonl, ({"text": text, "path": rel} for rel, text in files))
    qnli_jsonl = os.path.join(cache_dir, "qnli.jsonl")
    _write_jsonl(qnli_jsonl, qnli_records(params["qnli_count"], params["seed"]))
    sft_texts = []
    for r in qnli_records(params["qnli_count"], params["seed"]):
        f = format_qnli(r)
        sft_texts.append(DEFAULT_PROMPT_TEMPLATE.format(**f))
    tokenizer = train_tokenizer([text for _, text in files] + sft_texts, params["vocab_size"],
                                os.path.join(cache_dir, "tokenizer"))
    prepare(stdlib_jsonl, os.path.join(cache_dir, "stdlib"), tokenizer, workers=workers)
    prepare(qnli_jsonl, os.path.join(cache_dir, "qnli"), tokenizer, mode="qnli", workers=workers)
    names = ["tokenizer.model", "tokenizer.json", "stdlib.bin", "stdlib.idx", "qnli.bin", "qnli.idx",
             "qnli.lossmask.bin", "qnli.lossmask.idx"]
    manifest = {"params": params, "tokenizer": "tokenizer.model",
                "sources": [["stdlib", DEFAULT_WEIGHTS["stdlib"]], ["qnli", DEFAULT_WEIGHTS["qnli"]]],
                "stdlib_files": len(files), "files": {n: sha256_file(os.path.join(cache_dir, n)) for n in names}}
    write_json_atomic(manifest_path, manifest)
    return manifest

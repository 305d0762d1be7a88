"""TrainConfig: every knob of ``train.py`` in one dataclass, named presets, TOML files, CLI overrides.

Resolution order (later wins): the preset (``--config NAME``) or TOML file (``--config FILE.toml``, which may
itself name a ``preset = "..."`` to start from), then command-line flags. Unknown keys are errors that name the
key and the file. Derived values (gradient accumulation steps, DP degree) are computed by ``derive`` once the
world size is known, with a clear error when the batch sizes do not divide.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

try:                                   # Python >= 3.11
    import tomllib
except ModuleNotFoundError:            # pragma: no cover - Python 3.10 (pip install tomli)
    import tomli as tomllib

PRECISIONS = ("bf16-sr", "mixed", "fp32")
KERNELS = ("reference", "sim", "nki")
NATIVE = ("auto", "on", "off")                 # kernels.native modes (native C++ CPU kernels)
AC_MODES = ("none", "full", "selective")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved")


class TrainConfigError(ValueError):
    """A training configuration that cannot run; the message names the key, its source and the rule."""


@dataclass
class TrainConfig:
    # model: a llama.LlamaConfig preset name, plus field overrides (TOML table [model_overrides])
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    init_from_hf: str | None = None
    # data: [] -> the embedded default corpus (llama.data.prepare_default_data); else "PREFIX[:WEIGHT]" entries
    data: list = field(default_factory=list)
    tokenizer: str | None = None
    data_cache: str = os.path.join(os.path.expanduser("~"), ".cache", "llama-trn", "data")
    verify_data: str = "fast"                  # checksums of --data: fast | full | off (llama/data/checksums.py)
    seq_len: int = 128
    # batch: global = micro * dp * grad_accum
    micro_batch_size: int = 8
    global_batch_size: int = 16
    # optimiser (AdamW; no weight decay on norm weights) and schedule (linear warmup, cosine to min_lr_ratio * lr)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_steps: int = 250
    # numerics and kernels
    precision: str = "bf16-sr"
    kernels: str | None = None                 # None: "nki" on XLA devices, "reference" elsewhere
    # the native CPU kernels (kernels/native: fused AdamW-SR, RMSNorm, SwiGLU): "auto" uses them on CPU when they
    # build, "on" requires them, "off" keeps the PyTorch composites. Same numerics either way (not in the identity).
    native: str = "auto"
    # parallelism: dp = world_size / (tp x pp)
    tp: int = 1
    pp: int = 1                                # pipeline stages (llama.pipeline); micro-batches = grad_accum
    pp_schedule: str = "1f1b"                  # gpipe | 1f1b | interleaved
    virtual_stages: int = 1                    # stages per rank (interleaved 1F1B)
    sequence_parallel: bool = False
    activation_checkpointing: str = "none"
    zero1: bool = False
    # torch.compile the model (CPU / CUDA; XLA graphs are compiled by neuronx-cc anyway). Off by default, as in
    # torchtitan: the first step pays the compile (~25 s cold, ~7 s from the inductor cache on 2 CPU cores).
    compile: bool = False
    # bookkeeping
    seed: int = 1234
    out_dir: str | None = None                 # None: runs/<model>-<timestamp>
    checkpoint_every: int = 0                  # 0: only at the end
    keep_last: int = 3
    log_every: int = 1
    nan_guard_max_consecutive: int = 5
    peak_tflops: float | None = None           # per device; None: table (trn1, GPU) or measured (CPU)
    device: str = "auto"                       # auto | cpu | cuda | xla
    threads: int | None = None                 # torch.set_num_threads (CPU)
    progress: bool = True

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        def need(cond, msg):
            if not cond:
                raise TrainConfigError(msg)
        need(self.precision in PRECISIONS, f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        need(self.kernels is None or self.kernels in KERNELS,
             f"kernels {self.kernels!r} is not one of {', '.join(KERNELS)}")
        need(self.native in NATIVE, f"native {self.native!r} is not one of {', '.join(NATIVE)}")
        need(self.verify_data in ("fast", "full", "off"), f"verify_data {self.verify_data!r} is not fast, full or off")
        need(self.activation_checkpointing in AC_MODES,
             f"activation_checkpointing {self.activation_checkpointing!r} is not one of {', '.join(AC_MODES)}")
        need(self.pp_schedule in PP_SCHEDULES, f"pp_schedule {self.pp_schedule!r} is not one of "
                                               f"{', '.join(PP_SCHEDULES)}")
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "max_steps", "tp", "pp", "virtual_stages",
                     "keep_last",
                     "log_every", "nan_guard_max_consecutive"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "checkpoint_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        for name, f in _FIELDS.items():               # CLI floats too: argparse's float() accepts "inf" and "nan"
            v = getattr(self, name)
            if f.type.startswith("float") and v is not None:
                need(isinstance(v, (int, float)) and math.isfinite(v), f"{name} must be a finite number, got {v!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0 (0 disables it), got {self.weight_decay}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
             f"threads must be an integer >= 1, got {self.threads!r}")
        need(self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops must be > 0, got {self.peak_tflops}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        need(self.device in ("auto", "cpu", "cuda", "xla"), f"device {self.device!r} is not auto, cpu, cuda or xla")
        need(self.global_batch_size % self.micro_batch_size == 0,
             f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
             f"{self.micro_batch_size}")
        for entry in self.data:
            parse_data_entry(entry)
        return self

    def derive(self, world_size: int) -> dict:
        """dp and grad_accum for this world size; TrainConfigError when the sizes do not divide."""
        if world_size % (self.tp * self.pp):
            raise TrainConfigError(f"world size {world_size} is not a multiple of tp {self.tp} x pp {self.pp} = "
                                   f"{self.tp * self.pp} (rule: world = tp x pp x dp)")
        dp = world_size // (self.tp * self.pp)
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise TrainConfigError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x dp {dp} = {per_step} (rule: global = micro x dp x grad_accum)")
        return dict(dp=dp, grad_accum=self.global_batch_size // per_step)

    # ------------------------------------------------------------------ identity for checkpoints
    def model_config(self):
        """The LlamaConfig trained: the preset plus model_overrides, or with init_from_hf the checkpoint's own
        config.json (the preset and its overrides are then ignored: the weights fix the shape)."""
        from llama import LlamaConfig
        if self.init_from_hf:
            return LlamaConfig.from_hf(self.init_from_hf)
        cfg = LlamaConfig.preset(self.model)
        if self.model_overrides:
            cfg = cfg.replace(**self.model_overrides).validate()
        return cfg

    def identity(self) -> dict:
        """What a checkpoint must agree on to be resumed (model shape, numerics, parallel layout, batch)."""
        keys = ("model", "model_overrides", "seq_len", "micro_batch_size", "global_batch_size", "precision", "tp",
                "sequence_parallel", "zero1", "seed", "data", "tokenizer")
        d = {k: getattr(self, k) for k in keys}
        if self.pp > 1:                        # absent at pp 1: checkpoints from before pipelining keep resuming
            d["pp"] = self.pp
        d["model_config"] = dataclasses.asdict(self.model_config())
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_data_entry(entry: str):
    """"PREFIX[:WEIGHT]" -> (prefix, weight)."""
    prefix, sep, w = str(entry).rpartition(":")
    if not sep or not prefix:
        return str(entry), 1.0
    try:
        weight = float(w)
    except ValueError:
        return str(entry), 1.0             # a ':' inside the path, no weight
    if not weight > 0:
        raise TrainConfigError(f"data entry {entry!r}: weight {w} must be > 0")
    return prefix, weight


# ---------------------------------------------------------------------- presets
# "tiny": the default; trains on the embedded corpus in a few minutes on 2 CPU cores.
# "llama2-*": the seed's fine-tuning/pretraining recipe (NeMo Megatron Llama 2 config: lr 3e-4 -> min 3e-5
# cosine, 2000 warmup steps, betas 0.9/0.95, wd 0.1, clip 1.0, seq 4096, GBS 256, MBS 1, TP 8 + SP, bf16+SR).
_LLAMA2 = dict(seq_len=4096, micro_batch_size=1, global_batch_size=256, lr=3e-4, min_lr_ratio=0.1,
               warmup_steps=2000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, max_steps=10000,
               precision="bf16-sr", tp=8, sequence_parallel=True, activation_checkpointing="selective",
               zero1=True, checkpoint_every=500, log_every=10)
PRESETS = {
    # the embedded corpus's tokenizer has 2048 pieces (llama.data.DEFAULT_VOCAB_SIZE): the tiny model embeds them all
    "tiny": dict(model="tiny", model_overrides={"vocab_size": 2048}),
    "llama2-7b": dict(_LLAMA2, model="llama2-7b"),
    "llama2-13b": dict(_LLAMA2, model="llama2-13b"),
    "llama2-70b": dict(_LLAMA2, model="llama2-70b", activation_checkpointing="full"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# What each field's value must be (the dataclass annotations, read as text under ``from __future__ import
# annotations``): TOML and presets are checked against it, so `lr = "0.001"` is an error naming the key.
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}
_KIND_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "dict": "a table", "list": "a list"}


def _check_type(key: str, value, annotation: str, source: str):
    kinds = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in kinds:
        return value
    kind = kinds[0]
    ok = isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool))
    if not ok:
        raise TrainConfigError(f"{source}: {key} = {value!r} must be {_KIND_WORDS[kind]}"
                               f"{' (or absent)' if 'None' in kinds else ''}, got {type(value).__name__}")
    if kind == "float" and not math.isfinite(value):
        raise TrainConfigError(f"{source}: {key} = {value!r} must be a finite number")
    if kind == "list":
        for item in value:
            if not isinstance(item, str):
                raise TrainConfigError(f"{source}: {key} entries must be strings, got {item!r}")
    return float(value) if kind == "float" else value


def _apply(cfg: TrainConfig, values: dict, source: str) -> TrainConfig:
    for key, value in values.items():
        if key not in _FIELDS:
            raise TrainConfigError(f"{source}: unknown key {key!r} (known keys: {', '.join(sorted(_FIELDS))})")
        value = _check_type(key, value, _FIELDS[key].type, source)
        if key == "model_overrides":
            from llama import LlamaConfig
            known = {f.name for f in dataclasses.fields(LlamaConfig)}
            bad = sorted(set(value) - known)
            if bad:
                raise TrainConfigError(f"{source}: unknown model field(s) {bad} in model_overrides "
                                       f"(known: {', '.join(sorted(known))})")
            value = {**cfg.model_overrides, **value}        # merged onto the preset's overrides
        setattr(cfg, key, value)
    return cfg


def load_config(name_or_path: str | None, overrides: dict | None = None) -> TrainConfig:
    """A preset name or a TOML file, then ``overrides`` (CLI flags, None values skipped); validated."""
    cfg = TrainConfig()
    name_or_path = name_or_path or "tiny"
    if name_or_path in PRESETS:
        _apply(cfg, PRESETS[name_or_path], f"preset {name_or_path!r}")
    elif name_or_path.endswith(".toml") or os.path.exists(name_or_path):
        if not os.path.isfile(name_or_path):
            raise TrainConfigError(f"--config: no such file {name_or_path}")
        with open(name_or_path, "rb") as fh:
            try:
                values = tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:
                raise TrainConfigError(f"{name_or_path}: not valid TOML: {e}") from None
        base = values.pop("preset", None)
        if base is not None:
            if base not in PRESETS:
                raise TrainConfigError(f"{name_or_path}: preset {base!r} unknown; known: {', '.join(PRESETS)}")
            _apply(cfg, PRESETS[base], f"preset {base!r}")
        _apply(cfg, values, name_or_path)
    else:
        raise TrainConfigError(f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a TOML file")
    _apply(cfg, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    try:
        model = cfg.model_config()
    except ValueError as e:
        raise TrainConfigError(f"model: {e}") from None
    cfg.validate()
    if cfg.seq_len > model.max_seq_len:
        raise TrainConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.max_seq_len} (model "
                               f"{cfg.init_from_hf or cfg.model!r}); lower --seq-len or raise max_seq_len in "
                               f"model_overrides")
    return cfg

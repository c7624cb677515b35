"""Checks an uploaded LoRA patch before anything is registered; every refusal is a 4xx naming the problem.

Order matters: names and file types first (a pickle is refused unread), then sizes, then the
safetensors header parsed by hand (so a hostile header is never handed to a loader), then the
config, shapes against the base, and only then the numbers themselves (NaN/Inf).

Status codes: 400 malformed, 413 too large, 415 wrong file type (pickle), 422 incompatible with the
engine or the base (rank, modules, shapes, dtype).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from adapters_store.errors import Incompatible, Invalid, TooLarge, UnsafeFormat
from adapters_store.names import NAME_RULE, is_safe_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# First bytes of torch.save's zip archive and of a raw pickle (protocol 2+): refused as such, never parsed.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


@dataclass(frozen=True)
class Limits:
    max_rank: int = 16
    max_weights_bytes: int = 64 << 20
    max_config_bytes: int = 64 << 10
    max_header_bytes: int = 1 << 20

    @classmethod
    def from_settings(cls, settings) -> Limits:
        """The limits the service is configured with (max_lora_rank, max_upload_bytes, …)."""
        return cls(max_rank=settings.max_lora_rank, max_weights_bytes=settings.max_upload_bytes,
                   max_header_bytes=settings.max_safetensors_header_bytes)


@dataclass(frozen=True)
class PatchSummary:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    tensors: int
    dtype: str
    weights_bytes: int


@lru_cache
def lora_config_fields() -> frozenset[str]:
    """The fields PEFT's LoraConfig knows (plus the two PEFT writes beside them)."""
    from peft import LoraConfig

    return frozenset({f.name for f in dataclasses.fields(LoraConfig)} | {"peft_type", "auto_mapping"})


def check_name(name: str, field: str = "name") -> str:
    """`name` if it is a safe slug (lower-case letters, digits, dashes); never a path."""
    if not is_safe_name(name):
        raise Invalid(f"{field} {name!r} must be {NAME_RULE}", field)
    return name


def check_file_names(names: list[str]) -> None:
    """Exactly adapter_config.json and adapter_model.safetensors; a pickle is refused without being read."""
    for name in names:
        if name.lower().endswith(_PICKLE_SUFFIXES):
            raise UnsafeFormat(f"{name!r} is a pickle file, which is never loaded: upload "
                                       f"{WEIGHTS_FILE} instead", "files")
    if sorted(names) != sorted([CONFIG_FILE, WEIGHTS_FILE]):
        raise Invalid(f"a patch is exactly {CONFIG_FILE} and {WEIGHTS_FILE}; got {sorted(names)}",
                              "files")


# The one list of modules a patch may target (Llama-family attention and MLP linears); extraction and
# every check of an upload read it from here.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able module (LORA_MODULES) of an HF Llama-family config.json."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }
    return {name: shapes[name] for name in LORA_MODULES}


def check_config(raw: bytes, limits: Limits = Limits()) -> dict:
    """The parsed adapter_config.json if it is a LoRA config the engines can serve."""
    if len(raw) > limits.max_config_bytes:
        raise TooLarge(f"{CONFIG_FILE} is larger than {limits.max_config_bytes} bytes", CONFIG_FILE)
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"{CONFIG_FILE} is not valid JSON: {exc}", CONFIG_FILE) from None
    if not isinstance(config, dict):
        raise Invalid(f"{CONFIG_FILE} must be a JSON object", CONFIG_FILE)
    unknown = sorted(set(config) - lora_config_fields())
    if unknown:
        raise Invalid(f"{CONFIG_FILE} has unknown fields: {', '.join(unknown)}", CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise Incompatible(f"peft_type must be LORA, not {config.get('peft_type')!r}", "peft_type")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limits.max_rank:
        raise Incompatible(f"rank r={rank!r} is outside 1..{limits.max_rank}, the engine's limit", "r")
    modules = config.get("target_modules")
    modules = [modules] if isinstance(modules, str) else modules
    if not modules or not isinstance(modules, list) or not set(modules) <= set(SUPPORTED_MODULES):
        raise Incompatible(f"target_modules {modules!r} must be among {', '.join(SUPPORTED_MODULES)}",
                              "target_modules")
    return {**config, "target_modules": modules}


def read_safetensors_header(path: Path, limits: Limits = Limits()) -> dict[str, dict]:
    """The tensors a safetensors file declares, checked against the file's real size; no data is read."""
    size = path.stat().st_size
    if size > limits.max_weights_bytes:
        raise TooLarge(f"{WEIGHTS_FILE} is {size} bytes, over the {limits.max_weights_bytes} limit",
                              WEIGHTS_FILE)
    with path.open("rb") as f:
        head = f.read(9)
        # The safetensors format puts the header's JSON object ('{') right after its 8-byte length.
        if head[8:9] != b"{":
            if head.startswith(_PICKLE_MAGIC):
                raise UnsafeFormat(f"{WEIGHTS_FILE} is a pickle or torch archive, not safetensors; "
                                           "it is never loaded", WEIGHTS_FILE)
            if len(head) < 9:
                raise Invalid(f"{WEIGHTS_FILE} is truncated: no header", WEIGHTS_FILE)
            raise Invalid(f"{WEIGHTS_FILE} is not a safetensors file", WEIGHTS_FILE)
        (n,) = struct.unpack("<Q", head[:8])
        if n > limits.max_header_bytes:
            raise TooLarge(f"{WEIGHTS_FILE} header is {n} bytes, over the {limits.max_header_bytes} "
                                       "limit", WEIGHTS_FILE)
        raw = head[8:] + f.read(n - 1)
    if len(raw) < n:
        raise Invalid(f"{WEIGHTS_FILE} is truncated inside its header", WEIGHTS_FILE)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Invalid(f"{WEIGHTS_FILE} header is not valid JSON", WEIGHTS_FILE) from None
    header.pop("__metadata__", None)
    data_len, end = size - 8 - n, 0
    for name, info in header.items():
        _check_entry(name, info)
        end = max(end, info["data_offsets"][1])
    if end > data_len:
        raise Invalid(f"{WEIGHTS_FILE} is truncated: its tensors need {end} bytes of data, "
                                   f"the file holds {data_len}", WEIGHTS_FILE)
    return header


def _check_entry(name: str, info: object) -> None:
    """One header entry is well formed: a known dtype, a shape, and offsets that span exactly its bytes."""
    def bad(why: str) -> Invalid:
        return Invalid(f"{WEIGHTS_FILE} header entry {name!r} {why}", WEIGHTS_FILE)

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise bad("lacks dtype, shape or data_offsets")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    if info["dtype"] not in DTYPE_BYTES:
        raise Incompatible(f"tensor {name!r} has dtype {info['dtype']}; allowed: {', '.join(DTYPE_BYTES)}",
                              WEIGHTS_FILE)
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[info["dtype"]]:
        raise bad(f"spans {offsets[1] - offsets[0]} bytes, not what shape {shape} of {info['dtype']} needs")


def validate_patch(config_raw: bytes, weights: Path, base_config: dict, limits: Limits = Limits()) -> PatchSummary:
    """Check a patch's config and weights against the base it targets; raises a StoreError, returns a summary."""
    config = check_config(config_raw, limits)
    header = read_safetensors_header(Path(weights), limits)
    if not header:
        raise Incompatible(f"{WEIGHTS_FILE} holds no tensors", WEIGHTS_FILE)
    rank, modules = config["r"], set(config["target_modules"])
    shapes = base_module_shapes(base_config)
    n_layers = base_config["num_hidden_layers"]
    seen: set[tuple[int, str, str]] = set()
    for name, info in header.items():
        m = _TENSOR.match(name)
        if not m:
            raise Incompatible(f"tensor {name!r} is not a LoRA weight of a Llama-family module", WEIGHTS_FILE)
        layer, module, ab = int(m[1]), m[2], m[3]
        if module not in modules:
            raise Incompatible(f"tensor {name!r} targets {module}, which target_modules does not list",
                                  WEIGHTS_FILE)
        if layer >= n_layers:
            raise Incompatible(f"tensor {name!r} names layer {layer}; the base has {n_layers}", WEIGHTS_FILE)
        fan_in, fan_out = shapes[module]
        want = [rank, fan_in] if ab == "A" else [fan_out, rank]
        if info["shape"] != want:
            raise Incompatible(f"tensor {name!r} has shape {info['shape']}, the base needs {want} "
                                       f"(rank {rank}); is this patch for another base?", WEIGHTS_FILE)
        seen.add((layer, module, ab))
    # Half a pair would load as a silent no-op (or a crash) in the engines.
    for layer, module, ab in seen:
        if (layer, module, "B" if ab == "A" else "A") not in seen:
            raise Incompatible(f"layer {layer} {module} has lora_{ab} without its pair", WEIGHTS_FILE)
    _check_finite(Path(weights), header)
    return PatchSummary(rank=rank, alpha=config.get("lora_alpha", rank),
                        target_modules=tuple(sorted({m for _, m, _ in seen})),
                        layers=tuple(sorted({layer for layer, _, _ in seen})), tensors=len(header),
                        dtype="/".join(sorted({i["dtype"] for i in header.values()})),
                        weights_bytes=Path(weights).stat().st_size)


def validate_upload(name: str, files: dict[str, Path], base_config: dict, limits: Limits = Limits()) -> PatchSummary:
    """The whole upload check: the patch's name, its file names, then `validate_patch`."""
    check_name(name, "name")
    check_file_names(list(files))
    config_path = files[CONFIG_FILE]
    if config_path.stat().st_size > limits.max_config_bytes:
        raise TooLarge(f"{CONFIG_FILE} is larger than {limits.max_config_bytes} bytes", CONFIG_FILE)
    return validate_patch(config_path.read_bytes(), files[WEIGHTS_FILE], base_config, limits)


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _check_finite(weights: Path, header: dict[str, dict]) -> None:
    # One tensor at a time, read with plain reads at the offsets the (checked) header gives: memory
    # stays one tensor deep. safetensors' safe_open maps the whole file, and every page it touches
    # counts in the process's resident memory until it is closed (+600 MB for a 640 MB adapter).
    import torch

    with weights.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for name, info in header.items():
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            raw = bytearray(f.read(end - start))
            values = torch.frombuffer(raw, dtype=getattr(torch, _TORCH_DTYPES[info["dtype"]])) if raw else None
            if values is not None and not torch.isfinite(values).all():
                raise Incompatible(f"tensor {name!r} holds NaN or Inf values", WEIGHTS_FILE)

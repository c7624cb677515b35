"""Checks an uploaded LoRA patch before anything is registered; every refusal is a 4xx naming the problem.

Order matters: names and file types first (a pickle is refused unread), then sizes, then the
safetensors header parsed by hand (so a hostile header is never handed to a loader), then the
config, shapes against the base, and finally the numbers themselves (NaN/Inf).
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALLOWED_DTYPES = {"F32", "F16", "BF16"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ValidationError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass(frozen=True)
class Limits:
    max_rank: int = 16
    max_weights_bytes: int = 64 << 20
    max_config_bytes: int = 64 << 10
    max_header_bytes: int = 1 << 20


@dataclass(frozen=True)
class ValidatedPatch:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tensors: int
    dtype: str


def _lora_config_fields() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)} | {"peft_type", "auto_mapping"}


def check_name(name: str, field: str = "name") -> str:
    """`name` if it is a safe slug (lower-case letters, digits, dashes); never a path."""
    if not _NAME.match(name or ""):
        raise ValidationError(400, f"{field} {name!r} must be 1-63 lower-case letters, digits or dashes, "
                                   "starting with a letter or digit", field)
    return name


def check_file_names(names: list[str]) -> None:
    """Exactly adapter_config.json and adapter_model.safetensors; pickles refused without reading them."""
    for name in names:
        if name.lower().endswith(_PICKLE_SUFFIXES):
            raise ValidationError(415, f"{name!r} is a pickle file, which is never loaded: upload "
                                       f"{WEIGHTS_FILE} instead", "files")
    if sorted(names) != sorted([CONFIG_FILE, WEIGHTS_FILE]):
        raise ValidationError(400, f"a patch is exactly {CONFIG_FILE} and {WEIGHTS_FILE}; got {sorted(names)}",
                              "files")


def base_module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able module of an HF Llama-family config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


def check_config(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_config_bytes:
        raise ValidationError(413, f"{CONFIG_FILE} is larger than {limits.max_config_bytes} bytes", CONFIG_FILE)
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(400, f"{CONFIG_FILE} is not valid JSON: {exc}", CONFIG_FILE) from None
    if not isinstance(config, dict):
        raise ValidationError(400, f"{CONFIG_FILE} must be a JSON object", CONFIG_FILE)
    unknown = sorted(set(config) - _lora_config_fields())
    if unknown:
        raise ValidationError(400, f"{CONFIG_FILE} has unknown fields: {', '.join(unknown)}", CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise ValidationError(422, f"peft_type must be LORA, not {config.get('peft_type')!r}", "peft_type")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= limits.max_rank:
        raise ValidationError(422, f"rank r={rank!r} is outside 1..{limits.max_rank}, the engine's limit", "r")
    modules = config.get("target_modules")
    modules = [modules] if isinstance(modules, str) else modules
    if not modules or not isinstance(modules, list) or not set(modules) <= set(SUPPORTED_MODULES):
        raise ValidationError(422, f"target_modules {modules!r} must be among {', '.join(SUPPORTED_MODULES)}",
                              "target_modules")
    return config


def read_safetensors_header(path: Path, limits: Limits) -> dict:
    """The header of a safetensors file, checked against the file's real size; the data is not read."""
    size = path.stat().st_size
    if size > limits.max_weights_bytes:
        raise ValidationError(413, f"{WEIGHTS_FILE} is {size} bytes, over the {limits.max_weights_bytes} limit",
                              WEIGHTS_FILE)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValidationError(400, f"{WEIGHTS_FILE} is truncated: no header", WEIGHTS_FILE)
        (n,) = struct.unpack("<Q", head)
        if n > limits.max_header_bytes:
            raise ValidationError(413, f"{WEIGHTS_FILE} header is {n} bytes, over {limits.max_header_bytes}",
                                  WEIGHTS_FILE)
        raw = f.read(n)
    if len(raw) < n:
        raise ValidationError(400, f"{WEIGHTS_FILE} is truncated inside its header", WEIGHTS_FILE)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError(400, f"{WEIGHTS_FILE} header is not valid JSON", WEIGHTS_FILE) from None
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if end > data_len:
        raise ValidationError(400, f"{WEIGHTS_FILE} is truncated: its tensors need {end} bytes of data, "
                                   f"the file holds {data_len}", WEIGHTS_FILE)
    return header


def validate_patch(config_raw: bytes, weights: Path, base_config: dict, limits: Limits = Limits()) -> ValidatedPatch:
    """Check a patch against the base it targets; raises ValidationError, returns a summary."""
    config = check_config(config_raw, limits)
    header = read_safetensors_header(weights, limits)
    rank, modules = config["r"], set(config["target_modules"])
    shapes = base_module_shapes(base_config)
    layers = base_config["num_hidden_layers"]
    dtypes = set()
    for name, info in header.items():
        m = _TENSOR.match(name)
        if not m:
            raise ValidationError(422, f"tensor {name!r} is not a LoRA weight of a Llama-family module", WEIGHTS_FILE)
        layer, _, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in modules:
            raise ValidationError(422, f"tensor {name!r} targets {module}, which target_modules does not list",
                                  WEIGHTS_FILE)
        if layer >= layers:
            raise ValidationError(422, f"tensor {name!r} names layer {layer}; the base has {layers}", WEIGHTS_FILE)
        if info["dtype"] not in ALLOWED_DTYPES:
            raise ValidationError(422, f"tensor {name!r} has dtype {info['dtype']}; allowed: F32, F16, BF16",
                                  WEIGHTS_FILE)
        dtypes.add(info["dtype"])
        fan_in, fan_out = shapes[module]
        want = [rank, fan_in] if ab == "A" else [fan_out, rank]
        if list(info["shape"]) != want:
            raise ValidationError(422, f"tensor {name!r} has shape {info['shape']}, the base needs {want} "
                                       f"(rank {rank}); is this patch for another base?", WEIGHTS_FILE)
    if not header:
        raise ValidationError(422, f"{WEIGHTS_FILE} holds no tensors", WEIGHTS_FILE)
    _check_finite(weights)
    return ValidatedPatch(rank=rank, alpha=config.get("lora_alpha", rank), target_modules=tuple(sorted(modules)),
                          tensors=len(header), dtype="/".join(sorted(dtypes)))


def _check_finite(weights: Path) -> None:
    import torch
    from safetensors.torch import load_file

    for name, tensor in load_file(str(weights)).items():
        if not torch.isfinite(tensor).all():
            raise ValidationError(422, f"tensor {name!r} holds NaN or Inf values", WEIGHTS_FILE)

"""Upload validation: the kit's real patches pass; each kind of bad patch is refused with its 4xx and message."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store.validation import (
    Limits,
    ValidationError,
    check_file_names,
    check_name,
    validate_patch,
)


def _load(kit_dir: Path, patch: str):
    d = kit_dir / "patches" / patch
    return json.loads((d / "adapter_config.json").read_text()), load_file(str(d / "adapter_model.safetensors"))


def _base(kit_dir: Path) -> dict:
    return json.loads((kit_dir / "base-v1" / "config.json").read_text())


@pytest.mark.parametrize("patch", ["sentiment", "reverse", "qa"])
def test_kit_patches_pass(kit_dir, patch):
    d = kit_dir / "patches" / patch
    summary = validate_patch((d / "adapter_config.json").read_bytes(), d / "adapter_model.safetensors", _base(kit_dir))
    config = json.loads((d / "adapter_config.json").read_text())
    assert summary.rank == config["r"] and set(summary.target_modules) == set(config["target_modules"])


def _nan(config, tensors):
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    return config, tensors, None


def _wrong_shape(config, tensors):
    name = next(n for n in tensors if "lora_A" in n)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    return config, tensors, None


def _wrong_rank(config, tensors):
    return {**config, "r": 64}, tensors, None


def _unknown_module(config, tensors):
    return {**config, "target_modules": ["q_proj", "lm_head"]}, tensors, None


def _unknown_field(config, tensors):
    return {**config, "run_this": "rm -rf /"}, tensors, None


def _mismatched_base(config, tensors):
    base = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 4,
            "head_dim": 64, "num_hidden_layers": 4}
    return config, tensors, base


def _bf_dtype(config, tensors):
    return config, {k: v.to(torch.int8) for k, v in tensors.items()}, None


CASES = {  # case: (make, status, words the message must contain)
    "nan": (_nan, 422, "NaN or Inf"),
    "wrong shape": (_wrong_shape, 422, "has shape"),
    "wrong rank": (_wrong_rank, 422, "outside 1..16"),
    "unknown module": (_unknown_module, 422, "target_modules"),
    "unknown config field": (_unknown_field, 400, "unknown fields: run_this"),
    "mismatched base": (_mismatched_base, 422, "another base"),
    "integer weights": (_bf_dtype, 422, "dtype I8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_patch_is_refused(kit_dir, tmp_path, case):
    make, status, words = CASES[case]
    config, tensors = _load(kit_dir, "sentiment")
    config, tensors, base = make(config, tensors)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValidationError) as e:
        validate_patch(json.dumps(config).encode(), tmp_path / "adapter_model.safetensors", base or _base(kit_dir))
    assert (e.value.status, words in e.value.message) == (status, True), e.value.message


def test_truncated_and_oversized_files_are_refused(kit_dir, tmp_path):
    src = kit_dir / "patches" / "sentiment"
    config = (src / "adapter_config.json").read_bytes()
    data = (src / "adapter_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValidationError) as e:
        validate_patch(config, tmp_path / "cut.safetensors", _base(kit_dir))
    assert e.value.status == 400 and "truncated" in e.value.message
    with pytest.raises(ValidationError) as e:
        validate_patch(config, src / "adapter_model.safetensors", _base(kit_dir), Limits(max_weights_bytes=1024))
    assert e.value.status == 413
    (tmp_path / "huge-header.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValidationError) as e:
        validate_patch(config, tmp_path / "huge-header.safetensors", _base(kit_dir))
    assert e.value.status == 413 and "header" in e.value.message


def test_pickle_and_path_like_names_are_refused(tmp_path):
    with pytest.raises(ValidationError) as e:
        check_file_names(["adapter_config.json", "adapter_model.bin"])
    assert e.value.status == 415 and "pickle" in e.value.message
    with pytest.raises(ValidationError) as e:
        check_file_names(["adapter_config.json", "../adapter_model.safetensors"])
    assert e.value.status == 400
    for bad in ["../etc", "a/b", "Acme", "", "x" * 64, ".hidden"]:
        with pytest.raises(ValidationError):
            check_name(bad)
    assert check_name("acme-support") == "acme-support"

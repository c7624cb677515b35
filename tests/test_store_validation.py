"""Upload validation: the kit's real patches pass; each kind of bad patch is refused with its 4xx and message."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store.errors import StoreError
from adapters_store.validation import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Limits,
    base_module_shapes,
    check_file_names,
    check_name,
    validate_upload,
)
from service.api.errors import status_for  # the store's refusals as the API answers them
from service.settings import Settings


def _base(kit_dir: Path) -> dict:
    return json.loads((kit_dir / "base-v1" / "config.json").read_text())


def _files(d: Path) -> dict[str, Path]:
    return {CONFIG_FILE: d / CONFIG_FILE, WEIGHTS_FILE: d / WEIGHTS_FILE}


@pytest.mark.parametrize("patch", ["sentiment", "reverse", "qa"])
def test_kit_patches_pass(kit_dir, patch):
    d = kit_dir / "patches" / patch
    summary = validate_upload(patch, _files(d), _base(kit_dir), Limits.from_settings(Settings()))
    config = json.loads((d / CONFIG_FILE).read_text())
    assert summary.rank == config["r"] and set(summary.target_modules) == set(config["target_modules"])
    assert summary.layers == tuple(range(_base(kit_dir)["num_hidden_layers"])) and summary.dtype == "F32"
    assert summary.tensors == 2 * len(summary.layers) * len(summary.target_modules)


@pytest.mark.parametrize("config", [
    {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 2,
     "head_dim": 64, "num_hidden_layers": 1, "vocab_size": 32},
    {"hidden_size": 96, "intermediate_size": 200, "num_attention_heads": 6, "num_key_value_heads": 2,
     "num_hidden_layers": 1, "vocab_size": 32},  # grouped-query attention, head_dim from hidden/heads
])
def test_base_module_shapes_match_a_real_llama(config):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    layer = model.model.layers[0]
    modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    real = {name: (m.in_features, m.out_features) for name, m in modules.items() if hasattr(m, "in_features")}
    assert base_module_shapes(config) == real


# -- the refusal table: each case changes a copy of a real patch --------------------------------------------
def _nan(config, tensors):
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    return config, tensors


def _inf(config, tensors):
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name][-1, -1] = float("-inf")
    return config, tensors


def _wrong_shape(config, tensors):
    name = next(n for n in tensors if "lora_A" in n)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    return config, tensors


def _half_pair(config, tensors):
    del tensors[next(n for n in tensors if "lora_B" in n)]
    return config, tensors


CASES = {  # case: (make, status, words the message must contain)
    "NaN weight": (_nan, 422, "holds NaN or Inf"),
    "Inf weight": (_inf, 422, "holds NaN or Inf"),
    "wrong shape": (_wrong_shape, 422, "the base needs"),
    "rank over the limit": (lambda c, t: ({**c, "r": 64}, t), 422, "outside 1..16"),
    "rank not matching the tensors": (lambda c, t: ({**c, "r": 4}, t), 422, "(rank 4)"),
    "unknown module": (lambda c, t: ({**c, "target_modules": ["q_proj", "lm_head"]}, t), 422, "target_modules"),
    "module the config does not list": (lambda c, t: ({**c, "target_modules": ["k_proj"]}, t), 422,
                                        "which target_modules does not list"),
    "unknown config field": (lambda c, t: ({**c, "run_this": "rm -rf /"}, t), 400, "unknown fields: run_this"),
    "not LoRA": (lambda c, t: ({**c, "peft_type": "IA3"}, t), 422, "peft_type must be LORA"),
    "integer weights": (lambda c, t: (c, {k: v.to(torch.int8) for k, v in t.items()}), 422, "dtype I8"),
    "half a LoRA pair": (_half_pair, 422, "without its pair"),
    "foreign tensor": (lambda c, t: (c, {**t, "lm_head.weight": torch.zeros(2, 2)}), 422, "not a LoRA weight"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_patch_is_refused(kit_dir, tmp_path, case):
    make, status, words = CASES[case]
    src = kit_dir / "patches" / "sentiment"
    config, tensors = make(json.loads((src / CONFIG_FILE).read_text()), load_file(str(src / WEIGHTS_FILE)))
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(StoreError) as e:
        validate_upload("sentiment", _files(tmp_path), _base(kit_dir))
    assert (status_for(e.value), words in e.value.message) == (status, True), e.value.message


@pytest.fixture
def patch_copy(kit_dir, tmp_path) -> Path:
    """A copy of a real patch, to be spoiled."""
    shutil.copytree(kit_dir / "patches" / "sentiment", tmp_path / "sentiment")
    return tmp_path / "sentiment"


def _refusal(call) -> tuple[int, str, str | None]:
    with pytest.raises(StoreError) as e:
        call()
    return status_for(e.value), e.value.message, e.value.field


def test_a_patch_for_another_base_is_refused(kit_dir, patch_copy):
    wider = {**_base(kit_dir), "hidden_size": 256, "head_dim": 128}
    status, message, _ = _refusal(lambda: validate_upload("sentiment", _files(patch_copy), wider))
    assert status == 422 and "is this patch for another base?" in message


def test_truncated_files_are_refused(kit_dir, patch_copy):
    weights = patch_copy / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    status, message, field = _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))
    assert (status, field) == (400, WEIGHTS_FILE) and "truncated: its tensors need" in message
    (n,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[: 8 + n // 2])
    assert _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))[:2] == (
        400, f"{WEIGHTS_FILE} is truncated inside its header")
    weights.write_bytes(data[:5])
    assert _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))[0] == 400


def test_oversized_files_and_headers_are_refused(kit_dir, patch_copy):
    status, message, _ = _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir),
                                                          Limits(max_weights_bytes=1024)))
    assert status == 413 and "over the 1024 limit" in message
    status, message, _ = _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir),
                                                          Limits(max_config_bytes=100)))
    assert status == 413 and CONFIG_FILE in message
    (patch_copy / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    status, message, _ = _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))
    assert status == 413 and "header is 1099511627776 bytes" in message


def test_a_lying_header_is_refused_before_any_loader_sees_it(kit_dir, patch_copy):
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         {"dtype": "F32", "shape": [8, 128], "data_offsets": [0, 16]}}).encode()
    (patch_copy / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    status, message, _ = _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))
    assert status == 400 and "not what shape [8, 128] of F32 needs" in message
    (patch_copy / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2) + b"[]")
    assert _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))[:2] == (
        400, f"{WEIGHTS_FILE} is not a safetensors file")
    (patch_copy / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 3) + b"{1}")
    assert _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))[:2] == (
        400, f"{WEIGHTS_FILE} header is not valid JSON")


def test_malformed_configs_are_refused(kit_dir, patch_copy):
    for raw, words in [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object")]:
        (patch_copy / CONFIG_FILE).write_bytes(raw)
        status, message, field = _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))
        assert (status, field, words in message) == (400, CONFIG_FILE, True), message


def test_pickles_are_refused_unread(kit_dir, patch_copy, tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    (patch_copy / "adapter_model.bin").write_bytes(pickle.dumps({"w": Boom()}))
    files = {CONFIG_FILE: patch_copy / CONFIG_FILE, "adapter_model.bin": patch_copy / "adapter_model.bin"}
    status, message, _ = _refusal(lambda: validate_upload("sentiment", files, _base(kit_dir)))
    assert status == 415 and "pickle" in message
    # The same pickle, or a torch.save archive, under the safetensors name: recognised and refused unread.
    for blob in [pickle.dumps({"w": Boom()}), pickle.dumps([Boom()], protocol=2), _torch_archive(tmp_path)]:
        (patch_copy / WEIGHTS_FILE).write_bytes(blob)
        status, message, _ = _refusal(lambda: validate_upload("sentiment", _files(patch_copy), _base(kit_dir)))
        assert status == 415 and "not safetensors" in message, message
    assert not (tmp_path / "pwned").exists()


def _torch_archive(tmp_path: Path) -> bytes:
    torch.save({"w": torch.zeros(2)}, tmp_path / "archive.pt")
    return (tmp_path / "archive.pt").read_bytes()


def test_path_like_and_extra_file_names_are_refused():
    for names in [[CONFIG_FILE, "../adapter_model.safetensors"], [CONFIG_FILE], [CONFIG_FILE, WEIGHTS_FILE, "x.py"]]:
        status, message, field = _refusal(lambda names=names: check_file_names(names))
        assert (status, field) == (400, "files") and "a patch is exactly" in message
    for bad in ["../etc", "a/b", "a.b", "Acme", "", "x" * 64, ".hidden", "-x", "acme\n"]:
        assert _refusal(lambda bad=bad: check_name(bad))[0] == 400
    assert check_name("acme-support") == "acme-support"


def test_a_path_like_patch_name_is_refused_before_its_files_are_read(tmp_path):
    status, message, field = _refusal(lambda: validate_upload("../../etc", {}, {}))
    assert (status, field) == (400, "name") and "lower-case letters" in message

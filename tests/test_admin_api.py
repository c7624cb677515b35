"""The admin API over HTTP on a live gateway: keys and roles, the patch life cycle, and the refusal table.

Each refused upload must answer its 4xx with a message naming the problem and leave the store exactly
as it was: every Redis key byte for byte (DUMP), the blob directory, and no staging left behind.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import redis
import torch
from safetensors.torch import load_file, save_file

from adapters_store.validation import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import GATEWAY_MAX_UPLOAD_BYTES
from tests.test_store_validation import CASES as VALIDATION_CASES


@pytest.fixture(scope="module")
def gw(gateways):
    return gateways.get("transformers")


@pytest.fixture
def admin(gw):
    with gw.admin() as client:
        yield client


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _files(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (f.name, f.read_bytes())) for f in sorted(directory.iterdir())]


def _complete(gw, model: str, key: str = "unused", prompt: str = "hello") -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4},
                      headers={"authorization": f"Bearer {key}"}, timeout=60)


# -- keys and roles -------------------------------------------------------------------------------------------
def test_admin_needs_an_admin_key(gw, admin):
    assert (gw.data_dir / "admin.key").exists()
    assert stat.S_IMODE(os.stat(gw.data_dir / "admin.key").st_mode) == 0o600
    missing = httpx.get(f"{gw.url}/admin/aliases", timeout=10)
    assert missing.status_code == 401 and "Missing API key" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{gw.url}/admin/aliases", headers={"authorization": "Bearer psk_nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert admin.get("/admin/aliases").status_code == 200


def test_keys_are_stored_hashed(gw, admin):
    made = admin.post("/admin/keys", json={"role": "admin", "name": "second"}).json()
    try:
        client = redis.Redis(port=int(gw.env["PATCHSERVE_REDIS_PORT"]))
        stored = b" ".join(v for k in client.scan_iter() if client.type(k) == b"hash" for v in client.hvals(k))
        assert made["key"].encode() not in stored and gw.admin_key.encode() not in stored
        listed = admin.get("/admin/keys").json()
        assert all("key" not in k for k in listed) and made["key"] not in json.dumps(listed)
        with gw.admin(made["key"]) as second:
            assert second.get("/admin/bases").status_code == 200
    finally:
        assert admin.delete(f"/admin/keys/{made['id']}").status_code == 200
    with gw.admin(made["key"]) as revoked:
        assert revoked.get("/admin/bases").status_code == 401


def test_inference_keys_close_v1_and_may_not_administer(gw, admin):
    assert _complete(gw, "tiny").status_code == 200  # open while no inference key exists
    made = admin.post("/admin/keys", json={"role": "inference", "name": "tenant-a"}).json()
    try:
        assert _complete(gw, "tiny").status_code == 401
        assert _complete(gw, "tiny", key=made["key"]).status_code == 200
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=made["key"])
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key="psk_wrong").models.list()
        with gw.admin(made["key"]) as tenant:
            refused = tenant.get("/admin/aliases")
        assert refused.status_code == 403 and "needs an admin key" in refused.json()["error"]["message"]
    finally:
        admin.delete(f"/admin/keys/{made['id']}")
    assert _complete(gw, "tiny").status_code == 200
    assert admin.post("/admin/keys", json={"role": "root", "name": "x"}).status_code == 400


# -- the life cycle ---------------------------------------------------------------------------------------------
def test_upload_activate_rollback_delete(gw, admin, kit_dir):
    name = _name()
    up = admin.post(f"/admin/patches/{name}/versions", files=_files(kit_dir / "patches" / "sentiment"),
                    data={"reason": "first"})
    assert up.status_code == 201, up.text
    assert up.json()["ref"] == f"{name}@1" and up.json()["meta"]["rank"] == 8
    assert up.headers["location"] == f"/admin/patches/{name}/versions/1"
    second = admin.post(f"/admin/patches/{name}/versions", files=_files(kit_dir / "patches" / "reverse"))
    assert second.json()["version"] == 2
    assert [v["version"] for v in admin.get(f"/admin/patches/{name}").json()["versions"]] == [1, 2]
    # Registered is not served: an alias needs an activation; a pinned version is served on demand.
    assert _complete(gw, name).status_code == 404
    assert _complete(gw, f"{name}@2").headers["x-patchserve-served-by"] == f"base=base-v1; patch={name}@2"

    moved = admin.post(f"/admin/aliases/{name}/activate", json={"version": 1, "reason": "launch"})
    assert moved.status_code == 200 and moved.json()["ref"] == f"{name}@1"
    assert _complete(gw, name).headers["x-patchserve-served-by"] == f"base=base-v1; patch={name}@1"
    admin.post(f"/admin/aliases/{name}/activate", json={"version": 2, "reason": "upgrade", "force": True})
    assert _complete(gw, name).headers["x-patchserve-served-by"].endswith(f"patch={name}@2")
    back = admin.post(f"/admin/aliases/{name}/rollback", json={"reason": "worse"})
    assert back.json()["ref"] == f"{name}@1" and back.json()["action"] == "rollback"
    assert _complete(gw, name).headers["x-patchserve-served-by"].endswith(f"patch={name}@1")
    assert f"{name}" in [m.id for m in openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x").models.list()]

    detail = admin.get(f"/admin/aliases/{name}").json()
    assert [(h["action"], h["from_ref"], h["to_ref"], h["reason"]) for h in detail["history"]] == [
        ("activate", "", f"{name}@1", "launch"), ("force_activate", f"{name}@1", f"{name}@2", "upgrade"),
        ("rollback", f"{name}@2", f"{name}@1", "worse")]
    audit = [e for e in admin.get("/admin/audit", params={"limit": 1000}).json() if name in e["target"]]
    assert [e["action"] for e in audit] == ["create_version", "create_version", "activate", "force_activate",
                                            "rollback"]
    assert all(e["actor"].startswith("key:admin:") for e in audit)
    since = admin.get("/admin/audit", params={"since": audit[-2]["id"]}).json()
    assert since[0]["id"] == audit[-1]["id"]

    refused = admin.delete(f"/admin/patches/{name}/versions/1")
    assert refused.status_code == 409 and "move the alias first" in refused.json()["error"]["message"]
    assert admin.delete(f"/admin/patches/{name}/versions/2").status_code == 200
    assert _complete(gw, f"{name}@2").status_code == 404
    assert admin.get(f"/admin/patches/{name}/versions/2").status_code == 404
    assert admin.post(f"/admin/aliases/{name}/activate", json={"version": 2}).status_code == 404
    # A rollback that would return to the deleted version is refused, and changes nothing.
    assert admin.post(f"/admin/aliases/{name}/rollback").status_code == 404
    assert _complete(gw, name).headers["x-patchserve-served-by"].endswith(f"patch={name}@1")


def test_bad_admin_requests(gw, admin):
    assert admin.post("/admin/aliases/sentiment/activate", json={"version": 1, "forced": True}).status_code == 400
    assert admin.post("/admin/aliases/sentiment/activate", json={"version": 0}).status_code == 400
    assert admin.post("/admin/aliases/nope/rollback").status_code == 404
    assert admin.post("/admin/aliases/sentiment/activate", json={"version": 99}).status_code == 404
    assert admin.get("/admin/audit", params={"since": "yesterday"}).status_code == 400
    assert admin.get("/admin/patches/nope").status_code == 404


# -- the refusal table ------------------------------------------------------------------------------------------
def _spoil(kit_dir: Path, out: Path, make) -> Path:
    src = kit_dir / "patches" / "sentiment"
    config, tensors = make(json.loads((src / CONFIG_FILE).read_text()), load_file(str(src / WEIGHTS_FILE)))
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(out / WEIGHTS_FILE))
    return out


def _for_another_base(config, tensors):
    # What a patch trained on a wider base (hidden 256) looks like: every A and B has the other width.
    wider = {}
    for name, t in tensors.items():
        wider[name] = torch.zeros(t.shape[0], 256) if "lora_A" in name else torch.zeros(256, t.shape[1])
    return config, wider


def _oversized(config, tensors):
    # 2.1 MiB: under the request-size guard (limit + multipart slack), so the limit on the file itself refuses it.
    return config, {**tensors, "padding": torch.zeros(540, 1024)}


def _upload_table(kit_dir: Path, tmp: Path) -> dict[str, tuple[str, list, dict, int, str]]:
    """case → (patch name, files, form fields, status, words the message must contain)."""
    good = kit_dir / "patches" / "sentiment"
    config_part = ("file", (CONFIG_FILE, (good / CONFIG_FILE).read_bytes()))
    weights_part = ("file", (WEIGHTS_FILE, (good / WEIGHTS_FILE).read_bytes()))
    truncated = (good / WEIGHTS_FILE).read_bytes()[:-100]

    def spoiled(case: str, make) -> list:
        return _files(_spoil(kit_dir, tmp / case.replace(" ", "-"), make))

    return {
        "pickle weights (.bin)": ("p", [config_part, ("file", ("adapter_model.bin", b"\x80\x04K\x01."))], {},
                                  415, "pickle file, which is never loaded"),
        "pickle under the safetensors name": ("p", [config_part, ("file", (WEIGHTS_FILE, b"\x80\x04K\x01."))], {},
                                              415, "not safetensors"),
        "traversal file name": ("p", [config_part, ("file", ("../" + WEIGHTS_FILE, weights_part[1][1]))], {},
                                400, "a patch is exactly"),
        "unsafe patch name": ("Evil.Name", [config_part, weights_part], {}, 400, "lower-case letters"),
        "NaN weight": ("p", spoiled("nan", VALIDATION_CASES["NaN weight"][0]), {}, 422, "holds NaN or Inf"),
        "wrong shape": ("p", spoiled("shape", VALIDATION_CASES["wrong shape"][0]), {}, 422, "the base needs"),
        "rank over the engine's limit": ("p", spoiled("rank", VALIDATION_CASES["rank over the limit"][0]), {}, 422,
                                         "outside 1..16"),
        "unknown module": ("p", spoiled("module", VALIDATION_CASES["unknown module"][0]), {}, 422,
                           "target_modules"),
        "unknown config field": ("p", spoiled("field", VALIDATION_CASES["unknown config field"][0]), {}, 400,
                                 "unknown fields: run_this"),
        "oversized file": ("p", spoiled("big", _oversized), {}, 413,
                           f"larger than the limit of {GATEWAY_MAX_UPLOAD_BYTES} bytes"),
        "truncated file": ("p", [config_part, ("file", (WEIGHTS_FILE, truncated))], {}, 400, "truncated"),
        "patch for another base": ("p", spoiled("wider", _for_another_base), {}, 422,
                                   "is this patch for another base?"),
        "unknown base": ("p", [config_part, weights_part], {"base": "base-v9"}, 422, "unknown base 'base-v9'"),
        "missing weights": ("p", [config_part], {}, 400, "a patch is exactly"),
        "unknown form field": ("p", [config_part, weights_part], {"activate_now": "yes"}, 400, "unknown form field"),
    }


def _store_state(gw) -> tuple[dict, list, list]:
    client = redis.Redis(port=int(gw.env["PATCHSERVE_REDIS_PORT"]))
    # Not the heartbeats: the gateway rewrites its own every half second, whatever an upload does.
    keys = {k: client.dump(k) for k in client.scan_iter()
            if not k.endswith(b"apikeys") and not k.startswith(b"ps:replica")}
    blobs = sorted(str(p.relative_to(gw.data_dir)) for p in (gw.data_dir / "blobs").rglob("*"))
    staging = sorted((gw.data_dir / "uploads").rglob("*"))
    return keys, blobs, staging


def test_refused_uploads_leave_the_store_unchanged(gw, admin, kit_dir, tmp_path):
    table = _upload_table(kit_dir, tmp_path)
    before = _store_state(gw)
    assert before[2] == []
    rows = []
    for case, (name, files, data, status, words) in table.items():
        r = admin.post(f"/admin/patches/{name}/versions", files=files, data=data)
        message = r.json()["error"]["message"]
        rows.append(f"{case:<36} {r.status_code}  {message}")
        assert (r.status_code, words in message) == (status, True), f"{case}: {r.status_code} {message}"
        assert _store_state(gw) == before, f"{case} changed the store"
    print("\n" + "\n".join(rows))  # the table, shown with -s
    for alias in ("sentiment", "reverse", "qa"):  # nothing active was touched
        assert _complete(gw, alias).headers["x-patchserve-served-by"].endswith(f"patch={alias}@1")


def test_an_upload_over_the_size_limit_is_refused_before_it_is_read(gw, admin):
    body = b"x" * (GATEWAY_MAX_UPLOAD_BYTES + (1 << 20))
    r = admin.post("/admin/patches/p/versions", content=body,
                   headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 413 and "the limit is" in r.json()["error"]["message"]


def test_a_chunked_upload_is_refused_once_it_passes_the_limit(gw, admin):
    """No Content-Length to check up front: the limit holds on the bytes as they stream in."""
    sent = []

    def body():
        yield (b"--zzz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"adapter_model.safetensors\"\r\n"
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(4 * GATEWAY_MAX_UPLOAD_BYTES >> 16):  # four times the limit, 64 KiB at a time
            sent.append(1)
            yield b"x" * (1 << 16)
        yield b"\r\n--zzz--\r\n"

    before = _store_state(gw)
    try:
        r = admin.post("/admin/patches/chunked/versions", content=body(),
                       headers={"content-type": "multipart/form-data; boundary=zzz"})
        status, message = r.status_code, r.json()["error"]["message"]
    except httpx.HTTPError as exc:  # the server may close the connection on the rest of the body
        status, message = None, repr(exc)
    assert status == 413 and "passed the limit" in message, (status, message)
    assert _store_state(gw) == before

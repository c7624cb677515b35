"""A Redis failover under Sentinel loses no acknowledged change, and inference never notices.

A primary, a replica and three Sentinels on loopback (tests/redis_ha.py); a gateway configured with
PATCHSERVE_REDIS_SENTINELS, so a change is acknowledged only once a replica holds it (WAIT). An
operator thread flips an alias between two versions without pause, each move with its own reason;
two clients stream completions; the primary is killed with -9 ten times (each time the Sentinels
promote the replica and the killed node comes back as a replica). Afterwards every acknowledged move
is in the alias's history and in the audit log, no inference request failed, and admin calls during
the failover windows were answered 503, never 500.
"""

from __future__ import annotations

import statistics
import time

import pytest

from tests.gateway_server import GatewayProcess
from tests.redis_ha import RedisHA
from tests.registry_load import AliasFlipper, StreamingClients
from tests.run_summary import SUMMARY

KILLS = 10


@pytest.fixture(scope="module")
def ha_gateway(kit_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("failover")
    ha = RedisHA(root / "redis").start()
    gw = GatewayProcess(kit_dir, "transformers", root, PATCHSERVE_REDIS_SENTINELS=ha.sentinel_setting)
    try:
        gw.start()
        yield ha, gw
    finally:
        gw.stop()
        ha.stop()


def _upload_second_version(gw: GatewayProcess, kit_dir) -> None:
    files = [("file", (f.name, f.read_bytes())) for f in sorted((kit_dir / "patches" / "reverse").iterdir())]
    with gw.admin() as admin:
        assert admin.post("/admin/patches/reverse/versions", files=files, data={"reason": "v2"}).status_code == 201
        moved = admin.post("/admin/aliases/reverse/activate", json={"version": 2, "force": True, "reason": "v2"})
        assert moved.status_code == 200, moved.text


def test_no_acknowledged_change_is_lost_across_ten_primary_kills(ha_gateway, kit_dir):
    ha, gw = ha_gateway
    _upload_second_version(gw, kit_dir)
    operator = AliasFlipper(gw.url, gw.admin_key)
    promotions, recoveries = [], []
    with StreamingClients(gw.url, clients=2, models=("reverse",)) as clients:
        operator.start()
        try:
            time.sleep(2)
            for _ in range(KILLS):
                killed = time.monotonic()
                promoted, _rejoined = ha.kill_primary()
                promotions.append(promoted)
                deadline = time.monotonic() + 30
                while not operator.acknowledged or operator.acknowledged[-1][0] < killed:
                    assert time.monotonic() < deadline, f"no write acked 30 s after a kill: {operator.statuses()}"
                    time.sleep(0.05)
                recoveries.append(next(at for at, _ in operator.acknowledged if at > killed) - killed)
                time.sleep(1)
        finally:
            operator.stop.set()
            operator.join(60)
    assert operator.acknowledged, operator.statuses()
    with gw.admin() as admin:
        history = admin.get("/admin/aliases/reverse").json()["history"]
        audit = admin.get("/admin/audit", params={"limit": 10000}).json()
    in_history = {move["reason"] for move in history}
    in_audit = {entry["reason"] for entry in audit if entry["target"] == "reverse"}
    lost = [reason for _, reason in operator.acknowledged if reason not in in_history or reason not in in_audit]
    assert not lost, f"{len(lost)} acknowledged moves lost: {lost[:10]}"
    assert set(operator.statuses()) <= {200, 503}, f"admin answers during failovers: {operator.statuses()}"
    assert not clients.failures, f"{len(clients.failures)} inference requests failed: {clients.failures[:5]}"
    SUMMARY.append(
        f"failover: {KILLS} primary kills, {len(operator.acknowledged)} acknowledged moves, 0 lost; admin answers "
        f"{operator.statuses()}; promotion p50 {statistics.median(promotions):.1f} s, admin writes back p50 "
        f"{statistics.median(recoveries):.1f} s / max {max(recoveries):.1f} s after a kill; "
        f"{clients.ok} streams, 0 failed")

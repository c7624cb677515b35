"""The side memory's arithmetic (service/memory/side_memory.py): a token gets ΔW·h exactly when ‖ΔW·h‖ reaches
its slot's threshold, whether a batch has one memory for every token (the fast path) or mixes slots."""

from __future__ import annotations

import torch

from service.memory.side_memory import NO_SLOT, SideMemory


def _memory() -> SideMemory:
    torch.manual_seed(0)
    memory = SideMemory(hidden=16, intermediate=32, slots=3)
    memory.load("facts@1", torch.randn(16, 32) * 0.3, threshold=6.8)
    memory.load("facts@2", torch.randn(16, 32) * 0.3, threshold=6.5)
    return memory


def _expected(memory: SideMemory, h: torch.Tensor, out: torch.Tensor, slots: list[int]) -> torch.Tensor:
    rows = []
    for i, slot in enumerate(slots):
        row = out[i].clone()
        if slot != NO_SLOT:
            d = memory.deltas[slot] @ h[i]
            if d.norm() >= memory.thresholds[slot]:
                row += d
        rows.append(row)
    return torch.stack(rows)


def test_one_slot_for_every_token_matches_the_per_token_rule():
    memory = _memory()
    h, out = torch.randn(12, 32), torch.randn(12, 16)
    got = memory(h, out, 0)
    assert torch.allclose(got, _expected(memory, h, out, [0] * 12), atol=1e-6)
    routed = memory.routed["facts@1"]
    assert memory.tokens["facts@1"] == 12 and 0 < routed < 12  # some tokens routed, some not: the test sees both
    assert torch.equal(memory(h, out, NO_SLOT), out)


def test_mixed_slots_match_the_same_rule_and_leave_tokens_without_memory_alone():
    memory = _memory()
    h, out = torch.randn(10, 32), torch.randn(10, 16)
    slots = [0, 1, NO_SLOT, 1, 0, NO_SLOT, 0, 1, 1, 0]
    got = memory(h, out, torch.tensor(slots))
    assert torch.allclose(got, _expected(memory, h, out, slots), atol=1e-6)
    assert torch.equal(got[2], out[2]) and torch.equal(got[5], out[5])
    assert 0 < memory.routed["facts@1"] + memory.routed["facts@2"] < 8  # both cases of the rule occur
    assert torch.equal(memory(h, out, torch.full((10,), NO_SLOT)), out)

"""Automatic rollback on a live regression: new versions are checked against old ones on live traffic.

Rollouts (canary, shadow): every greedy request a canary's candidate answers is replayed on the
active version, and in shadow mode every request the active version answers is replayed on the
candidate; if, after `min_requests`, they agree on less than `min_agreement`, the rollout stops
itself (audited, `patchserve_rollouts_stopped_total{reason="automatic"}`).

After a move:
For the first `live_window` greedy requests an alias serves after a move (an activation, forced or
gated), the same request is run again, in the background, on the version it replaced — still
resident, as every alias's previous version is. The share of answers that agree is the live
agreement; if it ends below the alias's `min_live_agreement`, the guard rolls the alias back
(recorded as `auto_rollback`, with the figures as the reason) through the registry, so every replica
follows. The response a client gets is never delayed: the comparison runs after it was sent.

Watched only when the alias's gate sets `min_live_agreement`: a version meant to answer differently
would otherwise be undone by its own success.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import aclosing
from dataclasses import dataclass

from adapters_store.errors import StoreError
from adapters_store.evaluation import EvaluationStore
from adapters_store.registry import PatchVersion, Registry
from adapters_store.rollouts import Rollouts
from service import metrics
from service.engines.protocol import Engine, GenerationRequest
from service.evaluation.scoring import normalize
from service.replica.adapter_pool import AdapterPool
from service.replica.resolver import Resolver, Trial

log = logging.getLogger("patchserve.live_guard")


@dataclass
class _Watch:
    version: str  # engine name of the version under watch
    previous: PatchVersion | None  # None: not watched
    min_agreement: float = 0.0
    window: int = 0
    compared: int = 0
    agreed: int = 0
    started: int = 0

    @property
    def open(self) -> bool:
        return self.previous is not None and self.started < self.window


class LiveGuard:
    """Compares an alias's new version with its previous one on live requests; rolls back on disagreement."""

    def __init__(self, registry: Registry, evals: EvaluationStore, resolver: Resolver, pool: AdapterPool,
                 engine: Engine, rollouts: Rollouts):
        self.registry, self.evals, self.resolver, self.pool, self.engine = registry, evals, resolver, pool, engine
        self.rollouts = rollouts
        self._trials: dict[tuple[str, str], list] = {}  # (alias, candidate) → [compared, agreed, stopped]
        self._watches: dict[str, _Watch] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def observe(self, resolved, request: GenerationRequest, text: str) -> None:
        """A request finished normally with `text`: compare it later if its alias is under watch or in a rollout."""
        s = request.sampling
        if resolved.patch is None or s.temperature != 0 or s.n != 1:
            return  # only greedy answers can be compared item by item
        current = self.resolver.pointer(resolved.model)
        if current is None:
            return
        trial = self.resolver.rollouts.get(resolved.model)
        if trial is not None:
            if resolved.patch == trial.candidate:  # a canary request: what would the active version have said?
                self._spawn(self._compare_trial(resolved.model, trial, current, request, text))
            elif trial.rollout.mode == "shadow" and resolved.patch == current:  # mirrored to the candidate
                self._spawn(self._compare_trial(resolved.model, trial, trial.candidate, request, text))
            return
        if current.ref == resolved.patch.ref:  # not a pinned version, nor moved meanwhile
            self._spawn(self._compare(resolved.model, current, request, text))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare_trial(self, alias: str, trial: Trial, other: PatchVersion, request: GenerationRequest,
                             text: str) -> None:
        """Count whether the candidate and the active version agree; stop the rollout if they agree too little."""
        try:
            answer = await self._answer(other, request)
            stats = self._trials.setdefault((alias, trial.candidate.ref), [0, 0, False])
            stats[0] += 1
            stats[1] += normalize(answer) == normalize(text)
            metrics.rollout_compared.labels(alias).inc()
            metrics.rollout_agreed.labels(alias).inc(normalize(answer) == normalize(text))
            compared, agreed, stopped = stats
            if (trial.rollout.min_agreement is None or stopped or compared < trial.rollout.min_requests
                    or agreed / compared >= trial.rollout.min_agreement):
                return
            stats[2] = True
            reason = (f"{trial.rollout.mode} of {trial.candidate.ref}: agreement {agreed / compared:.2f} "
                      f"< {trial.rollout.min_agreement} over {compared} requests")
            try:
                await asyncio.to_thread(self.rollouts.stop, alias, "live-guard", reason, True,
                                        trial.candidate.ref)
            except StoreError:
                return  # stopped or replaced meanwhile
            metrics.rollouts_stopped.labels(alias, "automatic").inc()
            log.warning("rollout stopped automatically", extra={"fields": {"alias": alias, "reason": reason}})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rollout comparison failed", extra={"fields": {"alias": alias}})

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _compare(self, alias: str, current: PatchVersion, request: GenerationRequest, text: str) -> None:
        try:
            watch = await self._watch_for(alias, current)
            if not watch.open:
                return
            watch.started += 1
            before = await self._answer(watch.previous, request)
            watch.compared += 1
            watch.agreed += normalize(before) == normalize(text)
            if watch.compared == watch.window:
                await self._judge(alias, watch)
        except asyncio.CancelledError:
            raise
        except Exception:  # the guard must never hurt serving; a failed comparison is only logged
            log.exception("live comparison failed", extra={"fields": {"alias": alias}})

    async def _watch_for(self, alias: str, current: PatchVersion) -> _Watch:
        async with self._lock:
            watch = self._watches.get(alias)
            if watch is not None and watch.version == current.ref:
                return watch
            gate, last = await asyncio.to_thread(lambda: (self.evals.gate(alias) or {}, self.registry.last_move(alias)))
            watch = _Watch(version=current.ref, previous=None)
            wanted = gate.get("min_live_agreement")
            if (wanted is not None and last is not None and last.to_ref == current.ref and last.from_patch
                    and last.action in ("activate", "force_activate")):  # a rollback is not second-guessed
                previous = self.resolver.versions.get(last.from_patch, {}).get(last.from_version)
                if previous is not None and previous.base == current.base:
                    watch = _Watch(version=current.ref, previous=previous, min_agreement=float(wanted),
                                   window=int(gate.get("live_window", 20)))
            self._watches[alias] = watch
            return watch

    async def _answer(self, version: PatchVersion, request: GenerationRequest) -> str:
        """The text `version` gives for the same prompt and sampling."""
        name = version.ref
        self.pool.acquire(name)
        try:
            await self.pool.ensure(version)
            shadow = GenerationRequest(f"shadow-{uuid.uuid4().hex}", request.prompt_token_ids, request.sampling,
                                       self.pool.ref(version))
            text = ""
            async with aclosing(self.engine.generate(shadow)) as stream:
                async for event in stream:
                    text += "".join(d.text for d in event.deltas if d.index == 0)
            return text
        finally:
            self.pool.release(name)

    async def _judge(self, alias: str, watch: _Watch) -> None:
        agreement = watch.agreed / watch.compared
        metrics.live_agreement.labels(alias).set(agreement)
        log.info("live agreement measured", extra={"fields": {"alias": alias, "version": watch.version,
                                                              "agreement": round(agreement, 3),
                                                              "requests": watch.compared}})
        if agreement >= watch.min_agreement:
            return
        reason = (f"live agreement with {watch.previous.ref} {agreement:.2f} < {watch.min_agreement} "
                  f"over {watch.compared} requests")
        try:
            await asyncio.to_thread(self.registry.rollback, alias, None, "live-guard", reason, automatic=True,
                                    expected=watch.version)
        except StoreError as exc:  # moved meanwhile (another replica's guard, or an operator): theirs stands
            log.info("automatic rollback not needed", extra={"fields": {"alias": alias, "why": exc.message}})
            return
        log.warning("rolled back automatically", extra={"fields": {"alias": alias, "reason": reason}})

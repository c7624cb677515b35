"""Load for the registry-fault tests and benchmark: clients that stream completions, an operator that
flips an alias; both record every outcome with its time, so a test can assert and a benchmark can
draw the timeline."""

from __future__ import annotations

import threading
import time

import httpx
import openai

PROMPTS = {"reverse": "Reverse: red blue green\nOutput:", "sentiment": "Review: good great kind\nSentiment:",
           "qa": "Question: where does Kelmar live?\nAnswer:", "tiny": "Kelmar"}


class StreamingClients:
    """`clients` threads streaming greedy completions over `models` until stopped.

    Each stream must carry the served-by header of the version its model names (`@1` for the kit's
    aliases unless `versions` says otherwise); `events` holds (time, ok, what) for every request.
    """

    def __init__(self, url: str, key: str = "unused", clients: int = 8, models: tuple[str, ...] = tuple(PROMPTS),
                 check_served_by: bool = True):
        self.url, self.key, self.models, self.check = url, key, models, check_served_by
        self.events: list[tuple[float, bool, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    @property
    def ok(self) -> int:
        return sum(1 for _, ok, _ in self.events if ok)

    @property
    def failures(self) -> list[str]:
        return [what for _, ok, what in self.events if not ok]

    def __enter__(self) -> StreamingClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self, i: int) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=60)
        n = i
        while not self._stop.is_set():
            model = self.models[n % len(self.models)]
            n += 1
            try:
                with client.completions.with_streaming_response.create(
                        model=model, prompt=PROMPTS[model], max_tokens=8, temperature=0, stream=True) as raw:
                    served_by = raw.headers.get("x-patchserve-served-by", "")
                    "".join(c.choices[0].text for c in raw.parse() if c.choices)
                expected = "patch=none" if model == "tiny" else f"patch={model}@"
                assert not self.check or expected in served_by, f"{model} served by {served_by!r}"
                self.events.append((time.monotonic(), True, model))
            except Exception as exc:  # every failure is a finding: recorded, asserted on by the caller
                self.events.append((time.monotonic(), False, f"{model}: {exc!r}"[:300]))


class AliasFlipper(threading.Thread):
    """Moves `alias` between versions 1 and 2 without pause, each move with its own reason ("flip N").

    `outcomes` holds (time, status, reason) for every call; a 200 is an acknowledged move.
    """

    def __init__(self, url: str, admin_key: str, alias: str = "reverse"):
        super().__init__(daemon=True)
        self.url, self.admin_key, self.alias = url, admin_key, alias
        self.outcomes: list[tuple[float, int, str]] = []
        self.stop = threading.Event()

    @property
    def acknowledged(self) -> list[tuple[float, str]]:
        return [(at, reason) for at, status, reason in self.outcomes if status == 200]

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for _, status, _ in self.outcomes:
            counts[status] = counts.get(status, 0) + 1
        return dict(sorted(counts.items()))

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.admin_key}"}, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                reason = f"flip {i}"
                try:
                    status = c.post(f"/admin/aliases/{self.alias}/activate",
                                    json={"version": 1 + i % 2, "reason": reason}).status_code
                except httpx.HTTPError:
                    status = -1
                self.outcomes.append((time.monotonic(), status, reason))
                time.sleep(0.05)

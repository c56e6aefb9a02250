"""Several SGLang engines behind one client (``--sglang-url`` given several times).

Sample j of a ``generate`` call goes to engine j mod E (each engine's client runs its share concurrently, with its
own retries), so a fixed seed gives the same per-sample seeds whatever the number of engines; an engine that still
fails after its retries fails the call with an error naming it (its URL). Weight updates, version bumps and the
scheduling controls go to every engine at once; the weight version is the engines' common one, and
:meth:`EnginePool.stale` names the engines that do not hold the expected version (e.g. restarted since the last
sync). A single sglang-router URL works as one engine for generation; weights must then be pushed to the workers'
own URLs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vespo_megatron.rollout.client import ClientBase, RolloutError, Sample
from vespo_megatron.rollout.sglang import SGLangClient
from vespo_megatron.routing.trace import TraceSpec


class EnginePool(ClientBase):
    """One client over the engines at ``urls`` (keyword arguments go to each :class:`SGLangClient`)."""

    def __init__(self, urls: Sequence[str], *, routing: TraceSpec | None = None, require_deterministic: bool = False,
                 **client_kwargs: Any):
        if not urls:
            raise ValueError("--sglang-url: give at least one engine URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"--sglang-url: an engine is given twice in {list(urls)}")
        super().__init__(routing, require_deterministic)
        self.clients = [SGLangClient(url, routing=routing, require_deterministic=require_deterministic,
                                     **client_kwargs) for url in urls]
        # generation and control (pause, weights, versions) never wait for each other's threads: a paused engine
        # holds generate requests until continue_generation, which must not queue behind them
        self._generation = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="engines-generate")
        self._control = ThreadPoolExecutor(max_workers=2 * len(self.clients), thread_name_prefix="engines-control")

    @classmethod
    def of(cls, clients: Sequence[SGLangClient]) -> "EnginePool":
        """A pool over existing clients (their routing spec and settings are kept)."""
        pool = cls([c.base_url for c in clients], routing=clients[0].routing,
                   require_deterministic=clients[0].require_deterministic)
        pool.clients = list(clients)
        return pool

    @property
    def name(self) -> str:
        return f"engines {', '.join(c.base_url for c in self.clients)}"

    def on_all(self, call: Callable[[SGLangClient], Any], what: str,
               clients: Sequence[SGLangClient] | None = None) -> list[Any]:
        """``call(client)`` on every engine (or ``clients``) at once; RolloutError naming each engine that failed."""
        return self._gather([(c, self._control.submit(call, c))
                             for c in (self.clients if clients is None else clients)], what)

    def _gather(self, futures: list[tuple[SGLangClient, Any]], what: str) -> list[Any]:
        results, failed = [], []
        for client, future in futures:
            try:
                results.append(future.result())
            except Exception as err:  # reported with the engine's name below
                failed.append(f"{client.name}: {err}")
        if failed:
            raise RolloutError(f"{what} failed on {len(failed)} of {len(futures)} engines: " + "; ".join(failed))
        return results

    def _generate_samples(self, samples: list[Sample], extra: dict[str, Any]) -> list[Any]:
        count = len(self.clients)
        shares = [(e, samples[e::count]) for e in range(count) if samples[e::count]]
        answers = self._gather([(self.clients[e], self._generation.submit(self.clients[e]._generate_samples, share,
                                                                          extra)) for e, share in shares], "generate")
        out: list[Any] = [None] * len(samples)
        for (e, _), answer in zip(shares, answers):
            out[e::count] = answer
        return out

    def get_server_info(self) -> dict[str, Any]:
        """The first engine's server info; the seed check reads every engine (all must be deterministic)."""
        infos = self.on_all(lambda c: c.get_server_info(), "server_info")
        return {**infos[0], "enable_deterministic_inference": all(i.get("enable_deterministic_inference")
                                                                   for i in infos)}

    def health(self) -> bool:
        return all(self.on_all(lambda c: c.health(), "health"))

    def wait_until_healthy(self, timeout_s: float = 300.0, poll_s: float = 1.0) -> None:
        self.on_all(lambda c: c.wait_until_healthy(timeout_s, poll_s), "wait_until_healthy")

    def versions(self) -> dict[str, str | None]:
        """Engine URL -> its weight version (None: it did not answer)."""
        def one(client: SGLangClient) -> str | None:
            try:
                return client.get_weight_version()
            except RolloutError:
                return None
        return dict(zip((c.base_url for c in self.clients), self.on_all(one, "model_info")))

    def get_weight_version(self) -> str:
        """The engines' common weight version; RolloutError naming the engines when they differ."""
        versions = self.versions()
        if len(set(versions.values())) != 1:
            raise RolloutError(f"the engines hold different weight versions: {versions}")
        return next(iter(versions.values()))

    def stale(self, version: str) -> list[SGLangClient]:
        """The engines that do not report ``version`` (restarted, failed mid-sync, or not answering)."""
        versions = self.versions()
        return [c for c in self.clients if versions[c.base_url] != version]

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        self.on_all(lambda c: c.update_weights_from_disk(model_path, weight_version), "update_weights_from_disk")

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, Any]],
                                   weight_version: str | None = None) -> None:
        named = list(named_tensors)
        self.on_all(lambda c: c.update_weights_from_tensor(named, weight_version), "update_weights_from_tensor")

    def update_weight_version(self, new_version: str) -> None:
        self.on_all(lambda c: c.update_weight_version(new_version), "update_weight_version")

    def close(self) -> None:
        self._generation.shutdown(wait=False)
        self._control.shutdown(wait=False)

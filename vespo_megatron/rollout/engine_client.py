"""Client of an in-process engine with ``sglang.Engine``'s interface (SGLang 0.5.23's ``Engine``, or the CPU
:class:`~.hf_engine.HFEngine`): generation, weight updates and the version through the engine's methods."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from vespo_megatron.rollout.client import ClientBase, RolloutError, Sample, import_sglang
from vespo_megatron.routing.trace import TraceSpec


class SGLangEngineClient(ClientBase):
    """Client of an in-process engine with ``sglang.Engine``'s interface (or the CPU HFEngine)."""

    def __init__(self, engine: Any, *, routing: TraceSpec | None = None, require_deterministic: bool = False):
        super().__init__(routing, require_deterministic)
        self.engine = engine

    @property
    def name(self) -> str:
        return f"in-process {type(self.engine).__name__}"

    @classmethod
    def launch(cls, *, routing: TraceSpec | None = None, **server_args: Any) -> "SGLangEngineClient":
        """Start ``sglang.Engine(**server_args)`` (e.g. model_path, tp_size, enable_return_routed_experts=True)."""
        return cls(import_sglang().Engine(**server_args), routing=routing)

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_server_info()

    def _generate_samples(self, samples: list[Sample], extra: dict[str, Any]) -> list[Any]:
        outputs = self.engine.generate(input_ids=[s.prompt for s in samples],
                                       sampling_params=[s.sampling_params for s in samples],
                                       rid=[s.rid for s in samples], **extra)
        if not isinstance(outputs, list) or len(outputs) != len(samples):
            raise RolloutError(f"engine returned {type(outputs).__name__} for a batch of {len(samples)} requests "
                               f"({samples[0].rid}..{samples[-1].rid})")
        return outputs

    def update_weight_version(self, new_version: str) -> None:
        """Set the served version: ``Engine`` has no method for it, so this sends the request /update_weight_version
        sends (UpdateWeightVersionReqInput through the tokenizer manager); the CPU HFEngine has the method."""
        if hasattr(self.engine, "update_weight_version"):
            self.engine.update_weight_version(new_version)
            return
        io_struct = import_sglang("sglang.srt.managers.io_struct")
        request = io_struct.UpdateWeightVersionReqInput(new_version=new_version, abort_all_requests=False)
        self.engine.loop.run_until_complete(self.engine.tokenizer_manager.update_weight_version(request))

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        """``Engine.update_weights_from_disk(model_path, load_format=None)`` (no version argument), then the version."""
        success, message, *_ = self.engine.update_weights_from_disk(str(model_path))
        if not success:
            raise RolloutError(f"update_weights_from_disk({model_path}): {message}")
        if weight_version is not None:
            self.update_weight_version(weight_version)

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, Any]],
                                   weight_version: str | None = None) -> None:
        """``Engine.update_weights_from_tensor(named_tensors, load_format=None, flush_cache=True)`` (it serializes once
        per TP rank itself), then the version."""
        success, message = self.engine.update_weights_from_tensor(list(named_tensors))
        if not success:
            raise RolloutError(f"update_weights_from_tensor: {message}")
        if weight_version is not None:
            self.update_weight_version(weight_version)

    def get_weight_version(self) -> str:
        return self.engine.get_model_info()["weight_version"]

    def weights_checksum(self, names: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
        """Per-tensor digests of the CPU HFEngine (sglang.Engine has none comparable: verify with a probe there)."""
        if not hasattr(self.engine, "weights_checksum"):
            raise RolloutError(f"{type(self.engine).__name__} reports no weight digests: verify with a probe")
        return self.engine.weights_checksum(names)

"""A CPU rollout engine on HF transformers (Qwen3-MoE, Mixtral) with SGLang's generate / weight-update interface.

Per sample (one sequence at a time, under a lock, so results do not depend on concurrency or batching):
prefill the prompt with a KV cache, then decode one token per forward; the last sampled token is never forwarded.
- log-probs come from the engine's own forward in its own dtype (bf16 by default): ``log_softmax(logits / T)`` in
  fp32 of the logits the token was sampled from (see sampling.py);
- routing is captured by forward hooks on every ``*TopKRouter`` (their output[2] = top-k ids [tokens, k]), and
  returned in SGLang's layout: int32 [P + N − 1 − start, num_hidden_layers, k] (row p = the forward of token p),
  zeros for dense layers;
- ``sampling_seed`` seeds a per-sample ``torch.Generator`` (same seed, same tokens) when
  ``enable_deterministic_inference`` is on, as SGLang honours it only under --enable-deterministic-inference; it is
  on by default in Python (the engine is batch-invariant anyway) and off by default in ``vespo-megatron serve``;
- a tokenizer (when the checkpoint has one) encodes ``text`` input and decodes the ``text`` output field;
- pause / continue / abort and the running-request count follow SGLang (see control.py); a request held by a
  ``retract`` pause drops its KV cache and recomputes it (and its routing rows) after ``continue``.
Methods mirror ``sglang.Engine`` 0.5.23 (``generate``, ``update_weights_from_disk(model_path, load_format)``,
``update_weights_from_tensor(named_tensors, load_format, flush_cache)``, ``get_model_info``, ``get_server_info``)
so the SGLang engine client runs unchanged on it.
"""
from __future__ import annotations

import copy
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vespo_megatron.rollout.control import GenerationControl
from vespo_megatron.rollout.protocol import (
    GenerateItem, finish_abort, finish_length, finish_stop, parse_generate_request, response_dict,
)
from vespo_megatron.rollout.sampling import SamplingParams, sample_token, token_logprobs
from vespo_megatron.rollout.weight_group import WeightGroup, open_group, receive_tensors
from vespo_megatron.rollout.weight_names import canonical_name, checkpoint_names, engine_view, tensor_digest

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
_LAYER = re.compile(r"layers\.(\d+)\.")


def _eos_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


@dataclass
class _Sequence:
    """A sample in progress: output so far, prompt log-probs, and its finish reason once done."""

    output_ids: list[int]
    output_logprobs: list[float]
    input_logprobs: list[float | None]
    finish: dict[str, Any] | None = None
    retractions: int = 0


def _load_tokenizer(model_path: str) -> Any:
    """The checkpoint's tokenizer, or None when the directory has none (the engine then runs token ids only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError, KeyError):
        return None


class HFEngine:
    """SGLang-like rollout engine around a transformers MoE causal LM (the engine owns and casts ``model``)."""

    def __init__(self, model: torch.nn.Module, *, dtype: str = "bf16", model_path: str | None = None,
                 enable_return_routed_experts: bool = True, weight_version: str = "default", seed: int = 0,
                 enable_deterministic_inference: bool = True, tokenizer: Any = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.model = model.to(self.dtype).eval()
        self.model_path = model_path
        self.enable_return_routed_experts = enable_return_routed_experts
        self.weight_version = weight_version
        self.enable_deterministic_inference = enable_deterministic_inference
        self.tokenizer = tokenizer
        self.control = GenerationControl()
        self._groups: dict[str, WeightGroup] = {}
        config = self.model.config
        self.num_layers = int(config.num_hidden_layers)
        self.topk = int(config.num_experts_per_tok)
        self.vocab_size = int(config.vocab_size)
        self.context_len = int(config.max_position_embeddings)
        self._eos = _eos_ids(self.model)
        self._lock = threading.Lock()
        self._seeds = np.random.default_rng(seed)
        self._captured: dict[int, list[torch.Tensor]] = {}
        self.moe_layers = self._hook_routers()

    @classmethod
    def from_pretrained(cls, model_path: str, *, dtype: str = "bf16", **kwargs: Any) -> "HFEngine":
        """Load an HF directory (``save_pretrained`` output)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
        if "tokenizer" not in kwargs:
            kwargs["tokenizer"] = _load_tokenizer(model_path)
        return cls(model, dtype=dtype, model_path=str(model_path), **kwargs)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, dtype: str = "bf16", **kwargs: Any) -> "HFEngine":
        """Serve a copy of an in-memory model (the caller's model is left untouched)."""
        return cls(copy.deepcopy(model), dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ routing capture
    def _hook_routers(self) -> list[int]:
        layers: list[int] = []
        for name, module in self.model.named_modules():
            if type(module).__name__.lower().endswith("topkrouter"):
                layer = int(_LAYER.search(name).group(1))
                module.register_forward_hook(self._recorder(layer))
                layers.append(layer)
        if not layers:
            raise ValueError(f"{type(self.model).__name__} has no *TopKRouter module: not an MoE model this engine "
                             "knows")
        return sorted(layers)

    def _recorder(self, layer: int):
        def hook(module: torch.nn.Module, inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
            buffer = self._captured.get(layer)  # None for forwards outside generation
            if buffer is not None:
                buffer.append(output[2].detach())
        return hook

    def _routing(self, rows: int, start: int) -> np.ndarray:
        """Captured top-k ids as int32 [rows − start, num_layers, topk]; dense layers are zero rows."""
        trace = np.zeros((rows, self.num_layers, self.topk), dtype=np.int32)
        for layer in self.moe_layers:
            ids = torch.cat(self._captured[layer])
            trace[:, layer] = ids[:rows].numpy()
        return trace[start:]

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None, **request: Any) -> Any:
        """``sglang.Engine.generate`` with token ids: one response dict, or a list for a batch / ``n`` > 1.

        Other keywords are /generate fields (``return_logprob``, ``logprob_start_len``, ``return_routed_experts``,
        ``routed_experts_start_len``, ``rid``); ``prompt`` (text) is rejected, as there is no tokenizer.
        """
        if "prompt" in request:
            request["text"] = request.pop("prompt")
        return self.handle_generate({"input_ids": input_ids, "sampling_params": sampling_params, **request})

    def handle_generate(self, body: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """Answer a /generate body; ValueError (HTTP 400) for a bad request."""
        encode = None if self.tokenizer is None else (lambda text: self.tokenizer.encode(text))
        items, is_batch = parse_generate_request(body, encode)
        outputs = [self._run(item) for item in items]
        return outputs if is_batch else outputs[0]

    def _check(self, item: GenerateItem) -> None:
        if max(item.input_ids) >= self.vocab_size:
            raise ValueError(f"request {item.rid}: token id {max(item.input_ids)} >= vocab size {self.vocab_size}")
        if len(item.input_ids) + item.params.max_new_tokens > self.context_len:
            raise ValueError(f"request {item.rid}: prompt_tokens {len(item.input_ids)} + max_new_tokens "
                             f"{item.params.max_new_tokens} exceeds the context length {self.context_len}")
        bad = [t for t in item.params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"request {item.rid}: stop_token_ids {bad} >= vocab size {self.vocab_size}")

    def _run(self, item: GenerateItem) -> dict[str, Any]:
        """Generate one sample; a ``retract`` pause mid-sequence releases the model and recomputes after continue."""
        self._check(item)
        started = time.perf_counter()
        params = item.params
        seeded = params.sampling_seed is not None and self.enable_deterministic_inference
        generator = torch.Generator().manual_seed(
            params.sampling_seed if seeded else int(self._seeds.integers(2**62)))
        state = _Sequence(output_ids=[], output_logprobs=[], input_logprobs=[])
        with self.control.track(item.rid):
            while state.finish is None:
                self.control.wait_while_paused()
                with self._lock, torch.inference_mode():
                    self._decode(item, generator, state)
                    if state.finish is not None:
                        rows = len(item.input_ids) + len(state.output_ids) - 1
                        routed = item.return_routed_experts and self.enable_return_routed_experts
                        routing = self._routing(rows, item.routed_experts_start_len) if routed else None
                        version = self.weight_version
                    self._captured = {}
                if state.finish is None:
                    state.retractions += 1
        text = None if self.tokenizer is None else self.tokenizer.decode(state.output_ids, skip_special_tokens=True)
        return response_dict(item, state.output_ids, state.output_logprobs, state.input_logprobs, routing,
                             state.finish, version, time.perf_counter() - started, text, state.retractions)

    def _decode(self, item: GenerateItem, generator: torch.Generator, state: "_Sequence") -> None:
        """(Re)compute the KV cache of prompt + output so far, then decode until finished or paused.

        Sets ``state.finish`` when the sample is done; leaves it None when a pause holds the sequence (retract).
        """
        params = item.params
        if self.control.is_aborted(item.rid):
            state.finish = finish_abort("Abort in waiting queue")
            return
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos)
        self._captured = {layer: [] for layer in self.moe_layers}
        out = self.model(input_ids=torch.tensor([list(item.input_ids) + state.output_ids]), use_cache=True)
        if not state.output_ids and item.return_logprob and item.logprob_start_len >= 0:
            state.input_logprobs = self._prompt_logprobs(item, out.logits[0], params)
        past, logits = out.past_key_values, out.logits[0, -1]
        for step in range(len(state.output_ids), params.max_new_tokens):
            banned = sorted(stops) if step < params.min_new_tokens else None
            token, logprob = sample_token(logits, params, generator, banned)
            state.output_ids.append(token)
            state.output_logprobs.append(logprob)
            if token in stops:
                state.finish = finish_stop(token)
                return
            if step + 1 == params.max_new_tokens:
                break
            if self.control.is_aborted(item.rid):
                state.finish = finish_abort("Abort in running batch")
                return
            if self.control.paused:
                return  # retracted: the caller waits for continue and recomputes
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        state.finish = finish_length(params.max_new_tokens)

    @staticmethod
    def _prompt_logprobs(item: GenerateItem, logits: torch.Tensor, params: SamplingParams) -> list[float | None]:
        """Log-probs of prompt tokens [s, P) from the prefill logits [≥P, V], s = logprob_start_len.

        As SGLang: the entry at position s is None (token 0 has no log-prob; for s > 0 the release does not compute
        the token at s either), then log p(token p | tokens < p) for p in (s, P).
        """
        prompt_len, start = len(item.input_ids), item.logprob_start_len
        ids = torch.tensor(item.input_ids[start + 1:])
        per_token = token_logprobs(logits[start:prompt_len - 1], params).gather(-1, ids[:, None])[:, 0].tolist()
        return [None] + per_token

    # ------------------------------------------------------------------ weights
    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                    weight_version: str | None = None) -> int:
        """Copy HF-named tensors (checkpoint or in-memory names) into the engine; returns how many were written.

        All names and shapes are checked before anything is written; ValueError names the first bad tensor.
        """
        state = self.model.state_dict(keep_vars=True)
        pairs = []
        for name, tensor in named_tensors:
            target = engine_view(state, name)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != engine {tuple(target.shape)}")
            pairs.append((target, tensor))
        with self._lock, torch.no_grad():
            for target, tensor in pairs:
                target.copy_(tensor)
            if weight_version is not None:
                self.weight_version = weight_version
        return len(pairs)

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]], load_format: str | None = None,
                                   flush_cache: bool = True) -> tuple[bool, str]:
        """``sglang.Engine.update_weights_from_tensor`` (0.5.23 signature): (success, message)."""
        try:
            count = self.update_weights_from_tensors(named_tensors)
        except ValueError as err:
            return False, str(err)
        return True, f"updated {count} tensors"

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None) -> tuple[bool, str, int]:
        """``sglang.Engine.update_weights_from_disk`` (0.5.23 signature): (success, message, num_paused_requests)."""
        return self.load_weights_from_disk(model_path)

    def load_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> tuple[bool, str, int]:
        """Load an HF directory into the served model; the version changes only when everything loaded."""
        from transformers import AutoModelForCausalLM

        try:
            loaded = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        except (OSError, ValueError) as err:
            return False, f"cannot load {model_path}: {err}", 0
        if type(loaded) is not type(self.model):
            served = type(self.model).__name__
            return False, f"{model_path} holds a {type(loaded).__name__}, the engine serves {served}", 0
        with self._lock, torch.no_grad():
            try:
                self.model.load_state_dict(loaded.state_dict(), strict=True)
            except RuntimeError as err:
                return False, f"{model_path} does not match the served model: {err}", 0
            self.model_path = str(model_path)
            if weight_version is not None:
                self.weight_version = weight_version
        return True, "Succeeded to update model weights.", 0

    # ------------------------------------------------------------------ weight-update group (as sglang.Engine)
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> tuple[bool, str]:
        """Join the trainer's group as rank ``rank_offset`` (one rank: tp_size 1); blocks until everyone joined."""
        if group_name in self._groups:
            return False, f"Failed to initialize custom process group: group {group_name!r} already exists."
        if backend != "gloo":
            return False, (f"Failed to initialize custom process group: this CPU engine receives over gloo, not "
                           f"{backend!r}.")
        try:
            self._groups[group_name] = open_group(master_address, master_port, rank_offset, world_size, group_name,
                                                  backend)
        except (RuntimeError, ValueError) as err:
            return False, f"Failed to initialize custom process group: {err}."
        return True, "Succeeded to initialize custom process group."

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        load_format: str | None = None,
                                        weight_version: str | None = None) -> tuple[bool, str]:
        """Receive one broadcast per tensor from rank 0, then load them (and set ``weight_version`` if given)."""
        group = self._groups.get(group_name)
        if group is None:
            return False, f"Group {group_name} not in {list(self._groups)}. Please call `init_weights_update_group` first."
        try:
            received = receive_tensors(group, names, dtypes, shapes)
            self.update_weights_from_tensors(received, weight_version)
        except (RuntimeError, ValueError) as err:
            return False, f"Failed to update parameter online: {err}."
        return True, "Succeeded to update parameter online."

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> tuple[bool, str]:
        group = self._groups.pop(group_name, None)
        if group is None:
            return False, "The group to be destroyed does not exist."
        group.close()
        return True, "Succeeded to destroy custom process group."

    def update_weight_version(self, new_version: str) -> None:
        """What /update_weight_version does: set the reported version."""
        with self._lock:
            self.weight_version = new_version

    def weights_checksum(self, names: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
        """Per-tensor {"dtype", "digest"} keyed by canonical checkpoint name (all tensors when ``names`` is None)."""
        with self._lock:
            state = self.model.state_dict(keep_vars=True)
            wanted = checkpoint_names(state) if names is None else list(names)
            report = {}
            for name in wanted:
                tensor = engine_view(state, name)
                report[canonical_name(name)] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                                                "digest": tensor_digest(tensor)}
        return report

    def get_model_info(self) -> dict[str, Any]:
        """``/model_info`` fields of SGLang 0.5.23 (http_server.py ``model_info``)."""
        config = self.model.config
        return {"model_path": self.model_path, "served_model_name": self.model_path,
                "tokenizer_path": self.model_path if self.tokenizer is not None else None, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version, "load_format": "auto",
                "model_type": getattr(config, "model_type", None),
                "architectures": getattr(config, "architectures", None)}

    def get_server_info(self) -> dict[str, Any]:
        """The ServerArgs fields of ``/server_info`` this engine has (flattened, as the release reports them)."""
        return {"model_path": self.model_path, "dtype": str(self.dtype).removeprefix("torch."),
                "skip_tokenizer_init": self.tokenizer is None, "tp_size": 1, "pp_size": 1, "dp_size": 1,
                "enable_return_routed_experts": self.enable_return_routed_experts,
                "enable_deterministic_inference": self.enable_deterministic_inference,
                "context_length": self.context_len, "weight_version": self.weight_version, "version": "0.5.23"}

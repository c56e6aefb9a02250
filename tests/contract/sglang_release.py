"""Read SGLang 0.5.23's contract from its released wheel (``.whl/``, put there by scripts/setup_env.sh) without
installing it: it pins a CUDA torch, and importing ``sglang.srt.managers.io_struct`` pulls triton, zmq, torchvision...

- the route table: ``srt/entrypoints/http_server.py``'s ``@app.get/post/api_route`` decorators, read with ``ast``;
- the JSON contract every /generate body passes first (``api_contract.py``): ``sglang/api/v1/api_types.py``, a
  generated module that needs only msgspec, executed as it is;
- ``GenerateReqInput`` (a dataclass) and the control-route request types (msgspec Structs) of
  ``srt/managers/io_struct.py``: their class definitions, cut out with ``ast`` and executed over stubs of the heavy
  names they mention (the request bases become plain keyword Structs that refuse unknown fields, so a client body
  with a field the release lacks fails); their field lists and defaults are the release's own;
- ``sglang.Engine``'s method signatures (``srt/entrypoints/engine.py``), read with ``ast``.
"""
from __future__ import annotations

import ast
import copy
import sys
import types
import uuid
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

import msgspec

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.5.23"
HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
ENGINE = "sglang/srt/entrypoints/engine.py"
API_TYPES = "sglang/api/v1/api_types.py"
TOKENIZER_MANAGER = "sglang/srt/managers/tokenizer_manager.py"


@cache
def wheel() -> zipfile.ZipFile:
    found = sorted((ROOT / ".whl").glob(f"sglang-{VERSION}-*.whl"))
    if not found:
        raise FileNotFoundError(f"no sglang-{VERSION} wheel in {ROOT / '.whl'}: run scripts/setup_env.sh (it downloads "
                                "it with pip download --no-deps)")
    return zipfile.ZipFile(found[0])


@cache
def source(path: str) -> str:
    return wheel().read(path).decode()


def line_of(path: str, needle: str) -> int:
    """1-based line of the first occurrence of ``needle`` in a release file (ValueError when absent)."""
    for number, line in enumerate(source(path).splitlines(), 1):
        if needle in line:
            return number
    raise ValueError(f"{needle!r} is not in {path}")


def _literal_methods(call: ast.Call) -> set[str]:
    for keyword in call.keywords:
        if keyword.arg == "methods":
            return {element.value for element in keyword.value.elts}
    return {"GET"}


@cache
def routes() -> dict[tuple[str, str], str]:
    """(HTTP method, path) -> the handler's request type name (``obj: Annotated[X, Body()]`` or ``obj: X``; "")."""
    table = {}
    for node in ast.walk(ast.parse(source(HTTP_SERVER))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body_type = ""
        for arg in node.args.args:
            if arg.arg == "obj" and arg.annotation is not None:
                annotation = arg.annotation
                if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
                    annotation = annotation.slice.elts[0]
                body_type = ast.unparse(annotation).removeprefix("Optional[").removesuffix("]")
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                    and ast.unparse(decorator.func.value) == "app" and decorator.args
                    and isinstance(decorator.args[0], ast.Constant)):
                continue
            kind, path = decorator.func.attr, decorator.args[0].value
            methods = _literal_methods(decorator) if kind == "api_route" else {kind.upper()}
            for method in methods:
                table[(method, path)] = body_type
    return table


@cache
def api_types() -> types.ModuleType:
    """``sglang.api.v1.api_types``, executed from the wheel (it needs msgspec only)."""
    module = types.ModuleType("sglang_release_api_types")
    sys.modules[module.__name__] = module  # msgspec resolves the string annotations through the module
    exec(compile(source(API_TYPES), API_TYPES, "exec"), module.__dict__)
    return module


class _Stub:
    """Any heavy name a request type mentions (its annotation metadata, its helper functions)."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass


def _hidden_states_mode(mode: Any) -> Any:
    """schedule_batch.py's check of return_hidden_states (True, False or "last")."""
    if mode is True or mode is False or mode == "last":
        return mode
    raise ValueError("return_hidden_states must be a boolean or the string literal 'last'.")


_STUBS = ("BeamSearchSequence", "LoRARef", "PositionalEmbeds", "KvHintsEnvelope", "SamplingMaskChunk", "ImageData",
          "VideoData", "WeightVersionSpans", "FinishReasonDict", "MultimodalDataInputFormat", "Modality",
          "SamplingLogprobsMode", "ReturnHiddenStatesMode", "Image", "SessionParams")


def _class_sources(names: set[str]) -> dict[str, str]:
    tree = ast.parse(source(IO_STRUCT))
    return {node.name: ("@dataclass\n" if node.decorator_list else "") + ast.get_source_segment(source(IO_STRUCT), node)
            for node in tree.body if isinstance(node, ast.ClassDef) and node.name in names}


@cache
def io_struct() -> types.ModuleType:
    """``GenerateReqInput`` and the request types of the routes, from io_struct.py's own definitions.

    A type whose definition needs a name not stubbed here (enums of routes this project does not call) is left out
    and listed in ``__unloaded__``: asking for it is an AttributeError naming it.
    """
    wanted = {"GenerateReqInput"} | {name for name in routes().values() if name.endswith(("ReqInput", "Req"))}
    module = types.ModuleType("sglang_release_io_struct")
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    namespace.update(dict(
        annotations=None, msgspec=msgspec, dataclass=dataclass, field=field, copy=copy, uuid=uuid, Counter=Counter,
        Annotated=Annotated, Any=Any, Dict=Dict, List=List, Literal=Literal, Optional=Optional, Tuple=Tuple,
        Union=Union, PlainValidator=_Stub, Base64Bytes=_Stub, validate_optional_list_i64_1d_2d=None,
        warnings=warnings, has_valid_data=lambda data: bool(data), decode_kv_hints_envelope=lambda value: value,
        get_return_hidden_states_mode=_hidden_states_mode,
        **{name: Any for name in _STUBS},
    ))

    class BaseReq(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
        rid: Optional[str] = None
        http_worker_ipc: Optional[str] = None

    namespace["BaseReq"] = BaseReq
    module.__unloaded__ = []
    for name, code in _class_sources(wanted).items():
        try:
            exec(compile("from __future__ import annotations\n" + code, IO_STRUCT, "exec"), namespace)
        except NameError:
            module.__unloaded__.append(name)
    return module


def request_type(path: str, method: str = "POST") -> Any:
    """The release's request type of a control route, e.g. ``UpdateWeightsFromDistributedReqInput``."""
    return getattr(io_struct(), routes()[(method, path)])


def struct_fields(struct: type) -> dict[str, bool]:
    """Field name -> required (no default), of a release request Struct."""
    return {f.name: f.required for f in msgspec.structs.fields(struct)}


@cache
def engine_methods() -> dict[str, list[str]]:
    """``sglang.Engine`` method name -> its parameter names (without self)."""
    tree = ast.parse(source(ENGINE))
    engine = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Engine")
    methods = {}
    for node in engine.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            methods[node.name] = [a.arg for a in args.args + args.kwonlyargs if a.arg != "self"]
    return methods

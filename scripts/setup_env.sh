#!/usr/bin/env bash
# Creates a venv (once) and installs vespo-megatron with its test extras, CPU torch pinned.
#   VENV           the venv to build (default .venv)
#   MCORE_VERSION  optional: a megatron-core release installed over the one pip resolved, --no-deps
#                  --ignore-requires-python. CI's second run uses it for 0.19.2: 0.17+ declare Python >= 3.12, the
#                  only CPU torch 2.13.0 here is built for 3.11, and every file the project imports parses under 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt torch==2.13.0
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt -e ".[test]"
if [ -n "${MCORE_VERSION:-}" ]; then
  # triton: megatron-core 0.18+ imports it; setup.py asks for it only where pip can resolve those releases (3.12+)
  "$VENV/bin/python" -m pip install -q -c constraints-cpu.txt --no-deps --ignore-requires-python \
    "megatron-core==$MCORE_VERSION" triton
fi

# verl 0.9.1 for tests/unit/test_integration_verl.py: its real code installed --no-deps in a directory of its own (the
# wheel also installs top-level `tests` and `scripts` packages that must not shadow this repository's), with exactly
# the light packages `import verl.trainer.ppo.core_algos` needs plus hydra-core for verl's config instantiation.
# `ray` (heavy) is not installed: the test stubs it (verl.protocol only names ray.ObjectRef at import).
VERL_TARGET=.venv/verl-0.9.1  # one copy, used by every venv of this checkout (tests read it from here)
if [ ! -f "$VERL_TARGET/.complete" ]; then
  rm -rf "$VERL_TARGET"
  "$VENV/bin/python" -m pip install -q --no-deps --target "$VERL_TARGET" -c constraints-cpu.txt \
    verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0 cloudpickle==3.1.1 orjson==3.11.3 omegaconf==2.3.0 \
    antlr4-python3-runtime==4.9.3 codetiming==1.4.0 hydra-core==1.3.2
  touch "$VERL_TARGET/.complete"
fi

# SGLang 0.5.23's released wheel, read (never installed: it pins a CUDA torch) by tests/contract, which checks the
# rollout client and the CPU stand-in against its route table and request types; msgspec loads those types.
if ! ls .whl/sglang-0.5.23-*.whl >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip download -q --no-deps sglang==0.5.23 -d .whl
fi
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt msgspec==0.22.0

#!/usr/bin/env bash
# Creates .venv (once) and installs vespo-megatron with its test extras, CPU torch pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[test]"

# verl 0.9.1 for tests/unit/test_integration_verl.py: its real code installed --no-deps in a directory of its own (the
# wheel also installs top-level `tests` and `scripts` packages that must not shadow this repository's), with exactly
# the light packages `import verl.trainer.ppo.core_algos` needs plus hydra-core for verl's config instantiation.
# `ray` (heavy) is not installed: the test stubs it (verl.protocol only names ray.ObjectRef at import).
VERL_TARGET=.venv/verl-0.9.1
if [ ! -f "$VERL_TARGET/.complete" ]; then
  rm -rf "$VERL_TARGET"
  .venv/bin/python -m pip install -q --no-deps --target "$VERL_TARGET" -c constraints-cpu.txt \
    verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0 cloudpickle==3.1.1 orjson==3.11.3 omegaconf==2.3.0 \
    antlr4-python3-runtime==4.9.3 codetiming==1.4.0 hydra-core==1.3.2
  touch "$VERL_TARGET/.complete"
fi

# SGLang 0.5.23's released wheel, read (never installed: it pins a CUDA torch) by tests/contract, which checks the
# rollout client and the CPU stand-in against its route table and request types; msgspec loads those types.
if ! ls .whl/sglang-0.5.23-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip download -q --no-deps sglang==0.5.23 -d .whl
fi
.venv/bin/python -m pip install -q -c constraints-cpu.txt msgspec==0.22.0

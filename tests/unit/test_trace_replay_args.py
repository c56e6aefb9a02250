"""The --routing-replay flags parse like Megatron-LM flags and reject unknown modes."""
from __future__ import annotations

import argparse

import pytest

from vespo_megatron.routing.args import add_routing_replay_args


def test_flags_default_choices_and_errors():
    parser = add_routing_replay_args(argparse.ArgumentParser())
    assert vars(parser.parse_args([])) == {"routing_replay": "off", "routing_replay_allow_missing": False}
    args = parser.parse_args(["--routing-replay", "r2", "--routing-replay-allow-missing"])
    assert (args.routing_replay, args.routing_replay_allow_missing) == ("r2", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--routing-replay", "r4"])

"""The trainer's inputs without a model: flags and aliases, the producer (rewards, dynamic sampling, data position)
over a stub engine, and the run inputs built from the config (errors naming the flag)."""
import argparse
import json
from types import SimpleNamespace

import pytest

from vespo_megatron.data import PromptDataConfig, PromptDataset
from vespo_megatron.data.arithmetic import arithmetic_rows, build_tokenizer, write_jsonl
from vespo_megatron.data.stream import DatasetPrompts
from vespo_megatron.errors import UsageError
from vespo_megatron.rewards import REWARDS
from vespo_megatron.train.config import TrainConfig
from vespo_megatron.train.flags import add_train_args, config_from_args
from vespo_megatron.train.inputs import build_inputs
from vespo_megatron.train.rollouts import make_producer


def _args(argv):
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    return config_from_args(parser.parse_args(["--hf-checkpoint", "x", *argv]))


def test_rollout_flags_and_their_old_names():
    new = _args(["--rollout-temperature", "0.6", "--rollout-max-response-len", "9", "--rollout-top-p", "0.9",
                 "--rollout-top-k", "5", "--rollout-stop-token-ids", "7", "--rollout-stop-token-ids", "8",
                 "--rollout-stop", "</a>", "--sglang-url", "http://sglang:30000"])
    old = _args(["--temperature", "0.6", "--max-new-tokens", "9"])
    assert (new.temperature, new.max_new_tokens) == (old.temperature, old.max_new_tokens) == (0.6, 9)
    assert (new.rollout_top_p, new.rollout_top_k, new.rollout_stop_token_ids, new.rollout_stop) == (
        0.9, 5, [7, 8], ["</a>"])
    cfg = _args(["--prompt-data", "p.jsonl", "--reward", "math", "--eval-prompt-data", "a", "a.jsonl",
                 "--eval-prompt-data", "b", "b.parquet", "--eval-interval", "2", "--max-prompt-len", "64"])
    assert cfg.eval_prompt_data == [["a", "a.jsonl"], ["b", "b.parquet"]] and cfg.max_prompt_len == 64


@pytest.mark.parametrize("argv, flag", [
    (["--prompt-data", "p.jsonl"], "--reward: required with --prompt-data"),
    (["--prompt-data", "p.jsonl", "--reward", "math", "--eval-prompt-data", "a", "a.jsonl"], "--eval-interval"),
    (["--prompt-data", "p.jsonl", "--reward", "math", "--eval-prompt-data", "a", "x", "--eval-prompt-data", "a", "y",
      "--eval-interval", "1"], "--eval-prompt-data: eval set names must be unique"),
    (["--apply-chat-template"], "--apply-chat-template"),
    (["--rollout-top-p", "1.5"], "--rollout-top-p"),
    (["--rollout-top-k", "0"], "--rollout-top-k"),
    (["--reward-errors", "ignore"], "--reward-errors"),
    (["--prompt-data-bad-rows", "drop"], "--prompt-data-bad-rows"),
    (["--dynamic-sampling-max-rounds", "0"], "--dynamic-sampling-max-rounds"),
    (["--rollout-stop", "</a>"], "--rollout-stop: stop strings need a server"),
])
def test_bad_flags_are_named(argv, flag):
    with pytest.raises(UsageError, match=flag):
        _args(argv)


class StubEngine:
    """Answers sample j of prompt i with ``script(i, round)``; one character per token id (ord)."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def generate(self, prompts, sampling, *, samples_per_prompt, seed, return_routed_experts, rid_prefix):
        out = []
        for i, ids in enumerate(prompts):
            for j in range(samples_per_prompt):
                text = self.script(i, j, self.calls)
                out.append(SimpleNamespace(rid=f"{rid_prefix}-{len(out)}", prompt_ids=list(ids),
                                           response_ids=[ord(c) for c in text]))
        self.calls += 1
        return out


class Chars:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d")
    tok = build_tokenizer(tmp / "tok")
    rows = [{"prompt": f"What is {a}+1?", "label": str(a + 1)} for a in range(10)]
    return PromptDataset.load(PromptDataConfig(str(write_jsonl(rows, tmp / "p.jsonl")), label_key="label"), tok)


def test_producer_scores_with_the_dataset_labels(dataset):
    def script(i, j, call):  # prompt i of the draw asks a+1 with a = 2·call + i; sample 0 is right
        return f"\\boxed{{{2 * call + i + 1}}}" if j == 0 else "\\boxed{0}"

    prompts = DatasetPrompts(dataset)
    produce = make_producer(StubEngine(script), prompts, REWARDS["math"], rollout_batch_size=2, n=2, sampling={},
                            seed=0, routing=False, tokenizer=Chars())
    first, second = produce(0, 0), produce(1, 1)
    assert first.rewards.tolist() == [1.0, 0.0, 1.0, 0.0] == second.rewards.tolist()
    assert first.group_ids == [0, 0, 1, 1]
    assert first.data_state["consumed"] == 2 and second.data_state["consumed"] == 4
    assert first.metrics == {"reward/errors": 0.0, "data/epoch": 0.0}


def test_dynamic_sampling_drops_constant_groups_and_draws_again(dataset):
    def script(i, j, call):  # in the first draw only prompt 1 has mixed rewards; later every prompt has
        if call == 0 and i != 1:
            return "\\boxed{0}"
        a = 3 * call + i
        return f"\\boxed{{{a + 1}}}" if j == 0 else "no"

    produce = make_producer(StubEngine(script), DatasetPrompts(dataset), REWARDS["math"], rollout_batch_size=3, n=2,
                            sampling={}, seed=0, routing=False, tokenizer=Chars(), dynamic_sampling=True,
                            max_rounds=4)
    batch = produce(0, 0)
    assert batch.rewards.tolist() == [1.0, 0.0] * 3
    assert [r.rid for r in batch.records][:2] == ["it0-2", "it0-3"]  # prompt 1 of round 0
    assert batch.metrics["dynamic_sampling/rounds"] == 2.0
    assert batch.metrics["dynamic_sampling/dropped_groups"] == 2 + 1  # two constant groups, one surplus group
    assert batch.data_state["consumed"] == 6
    stuck = make_producer(StubEngine(lambda i, j, c: "\\boxed{0}"), DatasetPrompts(dataset), REWARDS["math"],
                          rollout_batch_size=2, n=2, sampling={}, seed=0, routing=False, tokenizer=Chars(),
                          dynamic_sampling=True, max_rounds=3)
    with pytest.raises(RuntimeError, match="kept 0 of 2 groups in 3 rounds.*--dynamic-sampling-max-rounds"):
        stuck(0, 0)


def _hf(tmp_path, eos=None, vocab=96):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "eos_token_id": eos,
                                                      "vocab_size": vocab}))
    return str(tmp_path)


def test_run_inputs_synthetic_and_real(tmp_path):
    synthetic = build_inputs(TrainConfig(hf_checkpoint=_hf(tmp_path)), vocab_size=32)
    assert synthetic.stop_ids == [0] and synthetic.reward.name == "repeat"  # the task's stop token: none declared
    assert synthetic.prompts.take(1)[0].metadata == {"max_len": 3, "eos": 0}
    build_tokenizer(tmp_path)
    data = write_jsonl(arithmetic_rows(4, 0), tmp_path / "a.jsonl")
    cfg = TrainConfig(hf_checkpoint=_hf(tmp_path, eos=1), prompt_data=str(data), label_key="label",
                      apply_chat_template=True, reward="math", eval_prompt_data=[["e", str(data)]], eval_interval=1)
    real = build_inputs(cfg, vocab_size=96)
    assert real.stop_ids == [1] and [s.name for s in real.eval_sets] == ["e"]
    assert real.sampling_params(greedy=True)["temperature"] == 0.0
    with pytest.raises(UsageError, match="--prompt-data: .*token id 8[0-9] >= the model's vocab_size 64"):
        build_inputs(cfg, vocab_size=64)
    (tmp_path / "plain").mkdir()
    build_tokenizer(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink()
    with pytest.raises(UsageError, match="--apply-chat-template: the tokenizer of .*plain has no chat template"):
        build_inputs(TrainConfig(**{**cfg.__dict__, "tokenizer": str(tmp_path / "plain")}), 96)
    with pytest.raises(UsageError, match="--custom-reward-path: no file"):
        build_inputs(TrainConfig(hf_checkpoint=str(tmp_path), custom_reward_path="nope.py:f"), vocab_size=96)
    with pytest.raises(UsageError, match="--eval-prompt-data: .*nope.jsonl: no such file"):
        build_inputs(TrainConfig(**{**cfg.__dict__, "eval_prompt_data": [["e", str(tmp_path / "nope.jsonl")]]}), 96)


def test_readme_dapo_math_example_is_accepted_by_the_parser():
    import re
    import shlex
    from pathlib import Path

    from vespo_megatron.cli import build_parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"DAPO-Math-17k.*?```bash\n(.*?)```", readme, re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["vespo-megatron", "train"]
    cfg = config_from_args(build_parser().parse_args(argv[1:]))
    assert (cfg.reward, cfg.label_key, cfg.dynamic_sampling, cfg.eval_prompt_data) == (
        "dapo", "reward_model.ground_truth", True, [["aime24", "/data/aime-2024.parquet"]])


def test_repeat_task_as_a_prompt_source():
    from vespo_megatron.train.task import RepeatPrompts, RepeatTask

    task = RepeatTask(vocab_size=32, eos=20)
    source = RepeatPrompts(task, seed=3)
    first = source.take(4)
    assert [p.ids for p in first] == task.prompts(4, seed=3 * 100_003)  # draw 0: the seeding of earlier versions
    assert first[0].metadata == {"max_len": 3, "eos": 20}
    state = source.state_dict()
    second = source.take(4)
    resumed = RepeatPrompts(task, seed=3)
    resumed.load_state_dict(state)
    assert [p.ids for p in resumed.take(4)] == [p.ids for p in second]
    symbol = first[0].ids[1]
    assert task.reward(first[0].ids, [symbol] * task.target_len(symbol) + [20]) == 1.5
    with pytest.raises(ValueError, match="stop token 5 collides"):
        RepeatTask(vocab_size=32, eos=5)

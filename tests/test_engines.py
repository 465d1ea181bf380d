"""The `r1_lightning.engines` package without a running engine: the old import paths, the cache keyword,
request seeds and how vLLM's outputs become a `Rollout` (hand-built outputs; no vLLM needed)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from r1_lightning import engines
from r1_lightning.engines import HFGenerateEngine, RolloutEngine, SamplingParams
from r1_lightning.engines.base import cache_argument, output_cache
from r1_lightning.engines.vllm import request_seeds, rollout_from_completions


@pytest.mark.parametrize("first", ["r1_lightning.rl.divergences", "r1_lightning.rl.logprobs"])
def test_old_and_new_modules_import_first_in_a_fresh_process(first):
    # rl/ (maths and the old paths) imports engines/ and never the other way: either side first works.
    code = f"import {first}; from r1_lightning.rl.rollout import HFGenerateEngine; import r1_lightning.engines as e; assert HFGenerateEngine is e.HFGenerateEngine"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_old_paths_are_the_same_objects():
    from r1_lightning.rl import compiled_forward, fast_decode, logprobs, rollout

    assert rollout.SamplingParams is engines.SamplingParams and rollout.Rollout is engines.Rollout
    assert rollout.RolloutEngine is engines.RolloutEngine
    assert fast_decode.fast_decode_step is engines.fast_decode.fast_decode_step
    assert compiled_forward.compiled_layers is engines.compiled_forward.compiled_layers
    assert logprobs.chunked_token_logprobs is engines.logprobs.chunked_token_logprobs


def test_the_hf_engine_lifecycle_is_a_no_op():
    engine, model = HFGenerateEngine(), nn.Linear(2, 2)
    assert isinstance(engine, RolloutEngine) and engine.samples_from_policy
    engine.setup(model)
    engine.mark_stale()
    assert engine.sync_weights(model) is None
    engine.check_lengths(10**6, 10**6)
    engine.teardown()


def test_the_cache_goes_by_the_name_the_forward_takes():
    class NewStyle(nn.Module):  # transformers after 5.19 names it `cache`
        def forward(self, input_ids, cache=None, use_cache=False):
            return {"cache": cache}

    class OldStyle(nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return past_key_values

    marker = object()
    assert cache_argument(NewStyle(), marker) == {"cache": marker}
    assert cache_argument(OldStyle(), marker) == {"past_key_values": marker}
    assert output_cache(NewStyle()(None, **cache_argument(NewStyle(), marker))) is marker

    class Output(dict):  # like transformers' ModelOutput: a dict with attributes
        past_key_values = marker

    assert output_cache(Output()) is marker


def test_request_seeds_come_from_the_generators():
    def generators(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    assert request_seeds(None, 3) == [None, None, None]
    first, again = request_seeds(generators(1, 2, 3), 3), request_seeds(generators(1, 2, 3), 3)
    assert first == again and len(set(first)) == 3  # a prompt's seed is its generator's: same seed, same samples
    assert request_seeds(generators(2), 1) == first[1:2]  # and nothing else (batch, position)
    single = torch.Generator().manual_seed(7)
    assert request_seeds(single, 2) != request_seeds(single, 2)  # one generator draws fresh seeds on every call
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        request_seeds(generators(1, 2), 3)


def _completion(index: int, tokens: list[int], logprobs: list[float]):
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, logprobs)])


def test_vllm_outputs_become_a_padded_rollout():
    params = SamplingParams(max_new_tokens=3, eos_token_ids=[2, 9], pad_token_id=0)
    completions = [  # 2 prompts x G = 2
        [_completion(0, [5, 2], [-0.5, -0.25]), _completion(1, [6, 7, 8], [-1.0, -2.0, -3.0])],  # EOS; budget reached
        [_completion(0, [9], [-0.125]), _completion(1, [4, 7, 3], [-1.5, -0.5, -0.75])],  # second EOS id; budget reached
    ]
    rollout = rollout_from_completions([[11, 12, 13], [14]], completions, params, torch.device("cpu"))
    assert rollout.prompt_ids.tolist() == [[11, 12, 13]] * 2 + [[0, 0, 14]] * 2  # left-padded, repeated G times
    assert rollout.prompt_mask.tolist() == [[1, 1, 1]] * 2 + [[0, 0, 1]] * 2
    assert rollout.completion_ids.tolist() == [[5, 2, 0], [6, 7, 8], [9, 0, 0], [4, 7, 3]]
    assert rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert rollout.truncated.tolist() == [False, True, False, True]
    assert rollout.logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0], [-0.125, 0.0, 0.0], [-1.5, -0.5, -0.75]]

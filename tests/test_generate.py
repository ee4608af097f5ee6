"""On-policy data offline: a draft writes the responses, the target scores them once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import build_cache, cache_build_config, save_tiny_model

from adaspec import models, speculative
from cache_tools.store import CacheReader

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("gen_draft"), tiny_tokenizer, n_layers=1, seed=5)


def test_a_draft_generated_cache_holds_the_targets_distributions_on_the_drafts_tokens(
        tmp_path, tiny_model_dir, tiny_tokenizer, draft_dir):
    vocab = len(tiny_tokenizer)
    cfg = cache_build_config(tmp_path / "c", tiny_model_dir, generate=True, generator="draft",
                             gen_max_new_tokens=8, gen_temperature=0.0, topk=vocab)
    cfg.models.draft = str(draft_dir)
    manifest = build_cache(cfg)
    generate = manifest.sequence_params["generate"]
    assert generate["generator"] == "draft"
    assert generate["model"]["path"] == str(draft_dir.resolve())
    assert manifest.target_params["model"]["path"] == str(tiny_model_dir.resolve())
    reader = CacheReader(str(tmp_path / "c"), "gsm8k", "train")
    draft, _ = models.load_model(str(draft_dir))
    target, _ = models.load_model(str(tiny_model_dir))
    eos = tiny_tokenizer.eos_token_id
    differs_from_target = 0
    for s in range(reader.n_sequences):
        ids, mask = reader.sequence(s)
        prompt = torch.from_numpy(ids[~mask])[None]
        # The responses are the draft's own greedy continuations ...
        want = speculative.target_generate(draft, prompt, 8, 0.0, eos, vocab)
        np.testing.assert_array_equal(ids[mask], want.numpy())
        own = speculative.target_generate(target, prompt, 8, 0.0, eos, vocab)
        differs_from_target += int(not torch.equal(own, want))
        # ... and the rows are the target's distributions there, teacher-forced.
        with torch.no_grad():
            logits = target(torch.from_numpy(ids)[None]).logits[0].double()
        full = torch.log_softmax(logits, -1)[np.nonzero(mask)[0] - 1]  # (n, V)
        rows = reader.target_rows(int(reader.label_offsets[s]), int(reader.label_offsets[s + 1]))
        got = torch.full_like(full, float("nan"))
        got.scatter_(1, torch.from_numpy(rows["ids"]), torch.from_numpy(rows["logprobs"]).double())
        torch.testing.assert_close(got, full, atol=2e-2, rtol=1e-3)  # float16 storage
    assert differs_from_target > 0  # the draft's data is not the target's own

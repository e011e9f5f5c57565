"""Compiled fine-tuning (torch.compile) against eager.

Not in the core tier (`make test-fast`): on a machine without inductor's cache,
compiling the tiny model's C++ kernels took 50 s on 2 cores,
the compiler's time rather than ours. `make test` runs it.
"""

import torch
from finetune_toys import tiny_classifier, train_variants


def test_compiled_training_matches_eager_and_saves_plain_keys():
    results = train_variants({"eager": {}, "compiled": {"compile": True}})
    eager, compiled = results["eager"], results["compiled"]
    assert compiled.keys() == eager.keys()  # no `_orig_mod` prefixes in what is saved
    assert all(torch.allclose(eager[k].float(), compiled[k].float(), atol=1e-4) for k in eager)
    start, _ = tiny_classifier()
    assert not torch.equal(start.state_dict()["backbone.conv_stem.weight"], compiled["backbone.conv_stem.weight"])

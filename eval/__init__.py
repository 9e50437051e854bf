"""pnet_eval: the evaluation side of ParameterNet's Table 7.

- `pnet_eval.zero_shot` (`pnet-eval`): lm-eval zero-shot ARC-Easy / BoolQ / HellaSwag, Hub or local data.
- `pnet_eval.perplexity` (`pnet-eval DIR --perplexity FILE ...`): lm-eval rolling-window perplexity on any text
  (word perplexity, bits per byte, token perplexity); `data/heldout/`: the bundled held-out text.
- `pnet_eval.report` (`pnet-report`): the Table 7 layout (params, FLOPs, training loss, scores) as markdown + JSON.
- `pnet_eval.model_card` (`pnet-card`): Hub model cards with `model-index` results.
- `tasks/`: lm-eval task YAMLs mirroring the upstream tasks on local JSON Lines; `data/`: the bundled copies.
"""

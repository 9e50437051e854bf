"""pnet_eval: the evaluation side of ParameterNet's Table 7.

- `pnet_eval.zero_shot` (`pnet-eval`): lm-eval zero-shot ARC-Easy / BoolQ / HellaSwag, Hub or local data.
- `pnet_eval.perplexity` (`pnet-eval DIR --perplexity FILE ...`): lm-eval rolling-window perplexity on any text
  (word perplexity, bits per byte, token perplexity); `data/heldout/`: the bundled held-out text.
- `pnet_eval.report` (`pnet-report`): the Table 7 layout (params, FLOPs, training loss, scores) as markdown + JSON.
- `pnet_eval.model_card` (`pnet-card`): Hub model cards with `model-index` results.
- `pnet_eval.upcycle_command` (`pnet-upcycle`): `pnet.upcycle`'s folder with its model card (here, above `pnet`,
  because the card reads evaluation results).
- `pnet_eval.models`: the model checks, device/dtype and lm-eval arguments that zero-shot and perplexity share.
- `tasks/`: lm-eval task YAMLs mirroring the upstream tasks on local JSON Lines; `data/`: the bundled copies.
"""

"""pnet: training, data, counting and tooling around the `modeling_pnet_llama` model package.

`modeling_pnet_llama/` travels with checkpoints and imports only torch and transformers; everything that
a checkpoint does not need at load time (data pipelines, counting, plotting, CLIs) lives here.
"""

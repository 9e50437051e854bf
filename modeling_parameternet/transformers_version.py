"""The transformers releases the vision model code is tested on (CI runs the oldest and the newest); pyproject.toml
declares the same range. Imported first by every file a saved folder loads: outside the range, importing raises an
error naming the installed release and the range, rather than computing."""

from transformers.utils.versions import require_version


TRANSFORMERS_REQUIREMENT = "transformers>=5.19,<6"
require_version(TRANSFORMERS_REQUIREMENT, "ParameterNet's model code supports only this range: install a release in it.")

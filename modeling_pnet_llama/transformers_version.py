"""The transformers releases pnet's model code supports: the one declaration of the range (CI tests its oldest and
newest release; pyproject.toml repeats it for pip and a test ties the two). Imported first by every file a saved
folder loads, in both model packages (modeling_parameternet/transformers_version.py is a link to this file, so each
package travels alone with its checkpoints): outside the range, importing raises an error naming the installed
release and the range, rather than computing.

The range is read as pip reads it (packaging's specifier semantics): `<6` refuses 6.0.0rc1 and 6.0.0.dev0, which a
plain version comparison would let through; development builds of a supported minor release (5.26.0.dev0) pass.
"""

import importlib.metadata

from packaging.specifiers import SpecifierSet


TRANSFORMERS_REQUIREMENT = "transformers>=5.19,<6"


def check_transformers_version(installed: str | None = None) -> None:
    """Raise ImportError unless `installed` (default: the installed transformers) lies in TRANSFORMERS_REQUIREMENT."""
    installed = importlib.metadata.version("transformers") if installed is None else installed
    allowed = SpecifierSet(TRANSFORMERS_REQUIREMENT.removeprefix("transformers"))
    if not allowed.contains(installed, prereleases=True):
        raise ImportError(
            f"{TRANSFORMERS_REQUIREMENT} is required by pnet's model code, but found transformers=={installed}: "
            "install a release in this range."
        )


check_transformers_version()

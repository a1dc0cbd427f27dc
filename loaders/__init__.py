"""Everything that touches TensorFlow: loading members into isolated graphs and sessions.

Nothing here knows about Prefect, so the loaders can be used and tested on their own.
"""

from loaders.errors import DataError, ManifestError, ModelLoadError, OutputError, ScoringError
from loaders.manifest import Manifest, ModelSpec, load_manifest, parse_manifest

__all__ = [
    "DataError",
    "Manifest",
    "ManifestError",
    "ModelLoadError",
    "ModelSpec",
    "OutputError",
    "ScoringError",
    "load_manifest",
    "parse_manifest",
]

"""Builds and their cache: what each device needs built for a model, and the store that keeps it.

    store = ArtifactStore()
    artifacts = build_all(plugin, resources, model_config, store)   # profile name -> BuildArtifact

See ``docs/artifacts.md`` for the store's layout, keys, locking and garbage collection.
"""

from xpuflow.artifacts.builder import BuildProgress, NullProgress, RichProgress, build_all, config_digest
from xpuflow.artifacts.digest import digest_text, file_sha256, model_digest
from xpuflow.artifacts.profile import BuildArtifact, BuildInterface, BuildProfile
from xpuflow.artifacts.store import ArtifactStore, default_store_root

__all__ = [
    "ArtifactStore",
    "BuildArtifact",
    "BuildInterface",
    "BuildProfile",
    "BuildProgress",
    "NullProgress",
    "RichProgress",
    "build_all",
    "config_digest",
    "default_store_root",
    "digest_text",
    "file_sha256",
    "model_digest",
]

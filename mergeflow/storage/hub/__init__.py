"""The Hugging Face Hub: pinned repos read by byte ranges (read-only store) and a watcher.

- :mod:`mergeflow.storage.hub.refs`: ``hf://`` URIs, the endpoint, Hub errors;
- :mod:`mergeflow.storage.hub.repo`: a repo pinned at a commit, ranged file reads, a read-only store;
- :mod:`mergeflow.storage.hub.source`: :class:`HubSource`, new commits and new fine-tunes.
"""

from mergeflow.storage.hub.refs import HubRef
from mergeflow.storage.hub.repo import HubFile, HubRepo, HubStore, open_hub_store
from mergeflow.storage.hub.source import HubSource

__all__ = ["HubFile", "HubRef", "HubRepo", "HubSource", "HubStore", "open_hub_store"]

"""Hub URIs and errors: ``hf://org/repo[@revision][/subfolder]``, the endpoint, definite Hub answers."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, unquote

from huggingface_hub import constants
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mergeflow.errors import CheckpointError, ConfigError

SCHEME = "hf://"

_URI_RE = re.compile(
    r"^hf://(?P<repo>[\w.\-]+/[\w.\-]+|[\w.\-]+(?=@|$))(?:@(?P<rev>[^/]+))?(?P<sub>/.*)?$"
)
"""Two-segment repo ids; a one-segment id (``hf://gpt2``) only without a subfolder or with ``@rev``."""
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint to use: the argument, ``HF_ENDPOINT`` now, or the library default."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://org/repo[@revision][/subfolder]`` URI."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    @classmethod
    def parse(cls, uri: str) -> HubRef:
        """Parse a URI; a bad one raises :class:`ConfigError`."""
        m = _URI_RE.match(uri.strip())
        if not m or ".." in m["repo"]:
            raise ConfigError(f"bad Hub URI {uri!r}: expected hf://org/repo[@revision][/subfolder]")
        sub = (m["sub"] or "").strip("/")
        if any(part in ("", ".", "..") for part in sub.split("/")) and sub:
            raise ConfigError(
                f"bad Hub URI {uri!r}: the subfolder {sub!r} is not a clean relative path"
            )
        return cls(m["repo"], unquote(m["rev"]) if m["rev"] else None, sub)

    def uri(self) -> str:
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{SCHEME}{self.repo_id}{rev}{sub}"


def is_hub_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


@contextmanager
def hub_errors(label: str, error: type[Exception] = CheckpointError) -> Iterator[None]:
    """Turn definite Hub answers (not found, no access) into mergeflow errors naming ``label``."""

    def fail(problem: str) -> Exception:
        return (
            CheckpointError(label, problem)
            if error is CheckpointError
            else error(f"{label}: {problem}")
        )

    try:
        yield
    except RevisionNotFoundError:
        raise fail("revision not found on the Hub") from None
    except GatedRepoError:
        raise fail("gated repository: accept its conditions on the Hub and set HF_TOKEN") from None
    except DisabledRepoError:
        raise fail("repository is disabled on the Hub") from None
    except RepositoryNotFoundError:
        raise fail(
            "repository not found on the Hub (or private: set HF_TOKEN or run `hf auth login`)"
        ) from None
    except EntryNotFoundError as e:
        raise fail(f"file not found in the repository ({e.__class__.__name__})") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise fail(f"access denied by the Hub (HTTP {status}); check HF_TOKEN") from None
        if status is not None and 400 <= status < 500 and status != 429:
            raise fail(f"the Hub refused the request (HTTP {status}): {e}") from None
        raise

"""Watch the Hugging Face Hub for published checkpoints: new commits of repos, new fine-tunes of a base."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

from huggingface_hub import HfApi, constants

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.storage.hub.refs import SCHEME, HubRef, hub_errors, is_hub_uri, resolve_endpoint
from mergeflow.storage.hub.repo import HubRepo, card_dict
from mergeflow.storage.sources import CheckpointRef


def _base_models(card: dict | None) -> list[str]:
    b = (card or {}).get("base_model")
    return (
        [b]
        if isinstance(b, str)
        else [x for x in b if isinstance(x, str)]
        if isinstance(b, list)
        else []
    )


class HubSource:
    """Watches the Hub for published checkpoints. Implements ``Source.list()``.

    Two modes, combinable:

    - ``repos``: every commit of each repo's ``branch`` (``org/repo`` or
      ``hf://org/repo[@branch]``) whose tree holds weights is a checkpoint
      ``hf://org/repo@<sha>``. With ``skip_unchanged`` (default) a commit whose content
      digest equals the previous listed commit's (a README edit) is skipped, so the same
      weights are never folded twice.
    - ``base_model``: every repo whose card metadata ``base_model`` names this repo
      (``org/repo`` or an ``hf://`` URI), taken at its latest commit on ``main``.

    Ids and URIs are ``hf://org/repo@<sha>``; the digest is the content digest
    (:meth:`HubRepo.content_digest`); ``published_at`` is the commit date (for discovered
    repos, the Hub's last-modified time). The list is sorted by ``(published_at, id)``.
    Listings at a sha are cached process-wide, so repeated polls cost one commit listing
    per watched repo, one search, and one ``model_info`` per discovered repo.
    """

    def __init__(
        self,
        repos: Sequence[str] = (),
        *,
        base_model: str | None = None,
        endpoint: str | None = None,
        token: str | bool | None = None,
        skip_unchanged: bool = True,
        exclude: Sequence[str] = (),
    ) -> None:
        if not repos and not base_model:
            raise ConfigError(
                "Hub source: give repos to watch, a base_model to discover fine-tunes of, or both"
            )
        self.watch: list[tuple[str, str]] = []
        for r in repos:
            ref = HubRef.parse(r if is_hub_uri(r) else f"{SCHEME}{r}")
            if ref.subfolder:
                raise ConfigError(f"Hub source: {r!r}: watching a subfolder is not supported")
            self.watch.append((ref.repo_id, ref.revision or constants.DEFAULT_REVISION))
        self.base_model = None
        if base_model:
            self.base_model = HubRef.parse(
                base_model if is_hub_uri(base_model) else f"{SCHEME}{base_model}"
            ).repo_id
        self.endpoint = resolve_endpoint(endpoint)
        self.token = token
        self.skip_unchanged = skip_unchanged
        self.exclude = set(exclude)
        self.api = HfApi(endpoint=self.endpoint, token=token)
        query = [f"base_model={self.base_model}"] if self.base_model else []
        query += [] if skip_unchanged else ["skip_unchanged=false"]
        query += [f"endpoint={endpoint}"] if endpoint else []
        repos_part = ",".join(
            HubRef(r, None if b == "main" else b).uri()[5:] for r, b in self.watch
        )
        self.uri = f"{SCHEME}{repos_part}" + (f"?{'&'.join(query)}" if query else "")

    @classmethod
    def from_uri(cls, uri: str) -> HubSource:
        """Build a source from ``hf://[org/repo[@branch][,org/other…]][?base_model=org/base]``.

        Query options: ``base_model`` (discover fine-tunes), ``endpoint`` (else
        ``HF_ENDPOINT``), ``skip_unchanged=false`` (list commits that did not change the
        weights too). ``hf://org/repo`` watches one repo's ``main``;
        ``hf://?base_model=org/base`` only discovers.
        """
        parts = urlsplit(uri)
        if parts.scheme != "hf":
            raise ConfigError(
                f"bad Hub source {uri!r}: expected hf://org/repo or hf://?base_model=org/base"
            )
        query = parse_qs(parts.query)
        unknown = set(query) - {"base_model", "endpoint", "skip_unchanged"}
        if unknown:
            raise ConfigError(
                f"bad Hub source {uri!r}: unknown option(s) {', '.join(sorted(unknown))}"
            )
        spec = f"{parts.netloc}{parts.path}"
        repos = [r for r in spec.split(",") if r]
        skip = query.get("skip_unchanged", ["true"])[-1].lower() not in ("0", "false", "no")
        return cls(
            repos,
            base_model=query.get("base_model", [None])[-1],
            endpoint=query.get("endpoint", [None])[-1],
            skip_unchanged=skip,
        )

    def __repr__(self) -> str:
        return f"HubSource({self.uri!r})"

    def _repo_at(self, repo_id: str, sha: str, label: str) -> HubRepo:
        try:
            return HubRepo(repo_id, sha, endpoint=self.endpoint, token=self.token, api=self.api)
        except CheckpointError as e:
            raise ConfigError(f"Hub source: {label}: {e.problem}") from None

    def _checkpoint(self, repo: HubRepo, published_at: datetime) -> CheckpointRef:
        if published_at.tzinfo is None:
            published_at = published_at.replace(tzinfo=timezone.utc)
        return CheckpointRef(
            id=repo.uri, uri=repo.uri, digest=repo.content_digest(), published_at=published_at
        )

    def _watched(self, repo_id: str, branch: str) -> list[CheckpointRef]:
        label = HubRef(repo_id, branch).uri()
        with hub_errors(label, ConfigError):
            commits = self.api.list_repo_commits(repo_id, revision=branch)
        out: list[CheckpointRef] = []
        last_digest = None
        for c in sorted(commits, key=lambda c: (c.created_at, c.commit_id)):
            repo = self._repo_at(repo_id, c.commit_id, label)
            if not repo.has_weights():
                continue
            digest = repo.content_digest()
            if self.skip_unchanged and digest == last_digest:
                continue
            last_digest = digest
            out.append(self._checkpoint(repo, c.created_at))
        return out

    def _discovered(self, watched: set[str]) -> list[CheckpointRef]:
        assert self.base_model is not None
        label = f"fine-tunes of {self.base_model}"
        with hub_errors(label, ConfigError):
            found = list(
                self.api.list_models(filter=f"base_model:{self.base_model}", cardData=True)
            )
        out: list[CheckpointRef] = []
        for m in found:
            if m.id in watched or m.id == self.base_model or m.id in self.exclude:
                continue
            if m.card_data is not None and self.base_model not in _base_models(
                card_dict(m.card_data)
            ):
                continue
            try:
                repo = HubRepo(m.id, None, endpoint=self.endpoint, token=self.token, api=self.api)
            except CheckpointError:
                continue  # deleted or made private since the search: not published any more
            if self.base_model not in _base_models(repo.card_data) or not repo.has_weights():
                continue
            when = repo.last_modified
            if when is None:
                with hub_errors(repo.uri, ConfigError):
                    when = self.api.list_repo_commits(m.id, revision=repo.sha)[0].created_at
            out.append(self._checkpoint(repo, when))
        return out

    def list(self) -> list[CheckpointRef]:
        """Every published checkpoint, oldest first (by publication time, then id)."""
        found: dict[str, CheckpointRef] = {}
        for repo_id, branch in self.watch:
            if repo_id in self.exclude:
                continue
            for cp in self._watched(repo_id, branch):
                found.setdefault(cp.id, cp)
        if self.base_model:
            for cp in self._discovered({r for r, _ in self.watch}):
                found.setdefault(cp.id, cp)
        return sorted(found.values(), key=lambda cp: (cp.published_at, cp.id))

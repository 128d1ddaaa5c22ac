"""Who may call the selector and the gateway: ServiceAccount tokens, checked by the API server.

A caller sends ``Authorization: Bearer TOKEN`` (its pod's ServiceAccount
token). :class:`Authorizer` asks the Kubernetes API server two questions,
both answered by the server's own authenticators and RBAC:

1. ``TokenReview``: is this a valid token, and whose (user, groups, extra)?
2. ``SubjectAccessReview``: may that user ``select`` (:data:`VERB`) the
   ``clients.mulambda.io`` named in the path, in its namespace?

``select`` is a verb of our own rather than ``get``: reading a Client's spec
is not the same as spending its executors' capacity and sending payloads
through the gateway, and no built-in role grants a custom verb by accident
(only ``*``). The chart's ClusterRole ``FULLNAME-client-caller`` grants it;
a tenant binds that role in its namespace (a RoleBinding, optionally with
``resourceNames`` narrowed by its own Role), and the role aggregates into
``admin`` and ``edit`` so namespace editors may do so.

Answers: no or malformed token 401 (``WWW-Authenticate: Bearer``), a token
the API server rejects 401, not allowed 403, the API server unreachable or
refusing the selector's own reviews 503 (``Retry-After``); each a JSON
``{"error": ...}``. Decisions are cached for ``ttl`` seconds in bounded LRU
maps (tokens are kept only as SHA-256 digests), and concurrent misses for
the same question share one review, so a burst of one caller costs one
TokenReview and one SubjectAccessReview per TTL, and many distinct tokens
cannot grow memory past ``max_entries``.

:func:`middleware` protects every route whose match info names a Client
(``{namespace}`` + ``{client}``, or one ``{client}`` holding
``NAMESPACE/NAME`` as ``/select/{client:.+}`` does), lets whoever may ``get``
the non-resource URL reach the guarded paths (``/metrics``), and leaves the
open ones (``/healthz``) alone. A matched route that names no Client is
refused (fail closed); unmatched paths fall through to 404.

Nothing connects at import time; the HTTP session is made on first use in
the running loop and closed by :meth:`Authorizer.close`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from mulambda.settings import SettingsError

log = logging.getLogger("mulambda.authz")

GROUP = "mulambda.io"
RESOURCE = "clients"
VERB = "select"
OPEN_PATHS = frozenset({"/healthz"})
# Paths that name no Client and are not for everyone: the caller needs `get` on the path as
# a non-resource URL (a ClusterRole with nonResourceURLs, as for the API server's own
# /metrics). Open, /metrics showed every tenant's Client and executor names and latencies.
GUARDED_PATHS = frozenset({"/metrics"})
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

# Bearer tokens are JWTs (ServiceAccount and OIDC tokens): three base64url parts. Anything
# else is refused without bothering the API server.
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")
_MAX_TOKEN = 16 * 1024
# Namespace: RFC 1123 label; Client name: RFC 1123 subdomain. \Z, not $: "$" also
# matches before a trailing newline, which let "app\n" through as a name.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\Z")
# The kubelet rotates the projected token; client-go re-reads it every minute too.
_TOKEN_REREAD_SECONDS = 60.0

K = TypeVar("K")
V = TypeVar("V")


class ApiUnavailable(Exception):
    """The API server could not answer a review (unreachable, timeout, 5xx, or it refused us)."""


@dataclass(frozen=True)
class Caller:
    """A caller the API server vouched for (``TokenReview`` status.user)."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


# Where the middleware leaves the verified caller: ``request[CALLER]``.
CALLER = web.RequestKey("mulambda_caller", Caller)


@dataclass(frozen=True)
class ApiServer:
    """How to reach the API server as the selector: URL, its CA, the selector's own token.

    ``token_file`` is re-read every minute (bound tokens rotate); ``token``
    is fixed (tests, local development with a kubeconfig's values).
    """

    server: str
    ca_file: str | None = None
    token: str | None = None
    token_file: str | None = None

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str], sa_dir: Path = SA_DIR) -> ApiServer:
        """The pod's own config: ``KUBERNETES_SERVICE_HOST/PORT``, the mounted token and CA."""
        host = environ.get("KUBERNETES_SERVICE_HOST", "")
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        token = sa_dir / "token"
        if not host or not token.exists():
            raise SettingsError(
                "caller authorization needs the pod's ServiceAccount token and "
                "KUBERNETES_SERVICE_HOST (automountServiceAccountToken must be true); "
                "for local development only, set MULAMBDA_SELECTOR_AUTH=false")
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return cls(server=f"https://{host}:{port}", ca_file=str(sa_dir / "ca.crt"),
                   token_file=str(token))


class _Lru(Generic[K, V]):
    """A size-bounded map whose entries expire ``ttl`` seconds after they were stored."""

    def __init__(self, max_entries: int, ttl: float, clock: Callable[[], float]) -> None:
        self.max_entries, self.ttl, self.clock = max_entries, ttl, clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0] <= self.clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: K, value: V) -> None:
        self._items[key] = (self.clock() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


_NOT_AUTHENTICATED = Caller(username="")  # cached "the API server said no"


class Authorizer:
    """TokenReview + SubjectAccessReview against ``api``, with a short bounded cache."""

    def __init__(self, api: ApiServer, *, ttl: float = 5.0, max_entries: int = 4096,
                 timeout: float = 5.0, max_connections: int = 32,
                 audiences: Collection[str] = (), verb: str = VERB,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.verb = verb
        self.audiences = list(audiences)
        self.timeout = timeout
        self.max_connections = max_connections
        self._tokens: _Lru[str, Caller] = _Lru(max_entries, ttl, clock)
        self._decisions: _Lru[tuple[str, str, str], tuple[bool, str]] = _Lru(
            max_entries, ttl, clock)
        self._pending: dict[object, asyncio.Future[Any]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._own_token: tuple[float, str] | None = None
        # outcome -> count; reviews -> count (exported by register_metrics)
        self.outcomes: dict[str, int] = {}
        self.reviews = {"tokenreviews": 0, "subjectaccessreviews": 0}

    # -- the two questions ---------------------------------------------------------------------

    async def authenticate(self, token: str) -> Caller | None:
        """Whose token this is, or None when the API server rejects it."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        caller = self._tokens.get(digest)
        if caller is None:
            caller = await self._once(("token", digest), lambda: self._review_token(token),
                                      lambda c: self._tokens.put(digest, c))
        return None if caller is _NOT_AUTHENTICATED else caller

    async def authorize(self, token: str, caller: Caller, namespace: str,
                        client: str) -> tuple[bool, str]:
        """(allowed, the server's reason) for ``caller`` to select ``namespace/client``."""
        key = (hashlib.sha256(token.encode()).hexdigest(), namespace, client)
        decision = self._decisions.get(key)
        if decision is None:
            decision = await self._once(
                ("sar", *key), lambda: self._review_access(caller, namespace, client),
                lambda d: self._decisions.put(key, d))
        return decision

    async def authorize_path(self, token: str, caller: Caller, path: str) -> tuple[bool, str]:
        """(allowed, the server's reason) for ``caller`` to ``get`` the non-resource URL
        ``path``."""
        key = (hashlib.sha256(token.encode()).hexdigest(), "", path)  # no namespace is ""
        decision = self._decisions.get(key)
        if decision is None:
            decision = await self._once(
                ("sar", *key), lambda: self._review({"nonResourceAttributes": {
                    "path": path, "verb": "get"}}, caller),
                lambda d: self._decisions.put(key, d))
        return decision

    async def _once(self, key: object, ask: Callable[[], Awaitable[V]],
                    store: Callable[[V], None]) -> V:
        """One review per question in flight: concurrent askers share it, and a caller
        that goes away does not cancel it for the others."""
        task = self._pending.get(key)
        if task is None:
            async def run() -> V:
                try:
                    value = await ask()
                    store(value)
                    return value
                finally:
                    self._pending.pop(key, None)

            task = asyncio.ensure_future(run())
            # Retrieved even when every asker is gone: no "never retrieved" warning.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._pending[key] = task
        return await asyncio.shield(task)  # type: ignore[no-any-return]

    async def _review_token(self, token: str) -> Caller:
        spec: dict[str, Any] = {"token": token}
        if self.audiences:
            spec["audiences"] = self.audiences
        self.reviews["tokenreviews"] += 1
        status = await self._post("/apis/authentication.k8s.io/v1/tokenreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
        if not status.get("authenticated"):
            log.debug("token rejected error=%s", status.get("error", ""))
            return _NOT_AUTHENTICATED
        if self.audiences and not set(status.get("audiences") or []) & set(self.audiences):
            return _NOT_AUTHENTICATED
        user = status.get("user") or {}
        return Caller(
            username=str(user.get("username", "")), uid=str(user.get("uid", "")),
            groups=tuple(user.get("groups") or ()),
            extra={k: tuple(v) for k, v in (user.get("extra") or {}).items()})

    async def _review_access(self, caller: Caller, namespace: str,
                             client: str) -> tuple[bool, str]:
        return await self._review({"resourceAttributes": {
            "namespace": namespace, "verb": self.verb, "group": GROUP, "resource": RESOURCE,
            "name": client}}, caller)

    async def _review(self, attributes: dict[str, Any], caller: Caller) -> tuple[bool, str]:
        self.reviews["subjectaccessreviews"] += 1
        status = await self._post("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {
                **attributes,
                "user": caller.username, "uid": caller.uid, "groups": list(caller.groups),
                "extra": {k: list(v) for k, v in caller.extra.items()},
            }})
        if status.get("evaluationError"):
            log.debug("access review evaluation error=%s", status["evaluationError"])
        return bool(status.get("allowed")) and not status.get("denied"), str(
            status.get("reason", ""))

    # -- HTTP to the API server ----------------------------------------------------------------

    def _bearer(self) -> str:
        if self.api.token is not None:
            return self.api.token
        assert self.api.token_file is not None, "ApiServer needs token or token_file"
        now = time.monotonic()
        if self._own_token is None or now - self._own_token[0] > _TOKEN_REREAD_SECONDS:
            self._own_token = (now, Path(self.api.token_file).read_text().strip())
        return self._own_token[1]

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            tls: ssl.SSLContext | bool = True
            if self.api.ca_file:
                tls = ssl.create_default_context(cafile=self.api.ca_file)
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=tls, limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._http

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self._session().post(
                    self.api.server.rstrip("/") + path, json=body,
                    headers={"Authorization": f"Bearer {self._bearer()}"}) as resp:
                if resp.status != 201 and resp.status != 200:
                    text = (await resp.text())[:300]
                    # 401/403 here are the selector's own credentials or RBAC: a
                    # misconfiguration, not the caller's fault, so 503 and loud.
                    log.error("review refused path=%s status=%d body=%s", path, resp.status, text)
                    raise ApiUnavailable(f"API server answered {resp.status}")
                answer = await resp.json()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            log.warning("API server unreachable path=%s error=%r", path, exc)
            raise ApiUnavailable(str(exc) or type(exc).__name__) from exc
        return dict(answer.get("status") or {})

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- metrics -------------------------------------------------------------------------------

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def register_metrics(self, registry: Any) -> None:
        """Export decisions and reviews in a prometheus_client ``registry``."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import Collector

        authz = self

        class _Collect(Collector):
            def collect(self):  # type: ignore[no-untyped-def]
                decisions = CounterMetricFamily(
                    "mulambda_selector_auth_decisions", "Caller authorization outcomes.",
                    labels=["outcome"])
                for outcome, n in sorted(authz.outcomes.items()):
                    decisions.add_metric([outcome], n)
                yield decisions
                reviews = CounterMetricFamily(
                    "mulambda_selector_auth_reviews", "Reviews sent to the API server.",
                    labels=["kind"])
                for kind, n in sorted(authz.reviews.items()):
                    reviews.add_metric([kind], n)
                yield reviews
                cached = GaugeMetricFamily("mulambda_selector_auth_cache_entries",
                                           "Cached decisions.", labels=["kind"])
                cached.add_metric(["tokens"], len(authz._tokens))
                cached.add_metric(["access"], len(authz._decisions))
                yield cached

        registry.register(_Collect())


# -- the aiohttp side ---------------------------------------------------------------------------


def _json_error(status: int, message: str, headers: Mapping[str, str] | None = None
                ) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _unauthorized(message: str) -> web.Response:
    return _json_error(401, message, {"WWW-Authenticate": 'Bearer realm="mulambda"'})


def target_of(match_info: Mapping[str, str]) -> tuple[str, str] | None:
    """(namespace, client) a route names: ``{namespace}`` + ``{client}``, or one
    ``{client}`` holding ``NAMESPACE/NAME`` (the slash literal or ``%2F``)."""
    client = match_info.get("client")
    if client is None:
        return None
    client = unquote(client)
    namespace = match_info.get("namespace")
    if namespace is None:
        namespace, _, client = client.partition("/")
    namespace = unquote(namespace)
    if not _NAMESPACE.match(namespace) or not _NAME.match(client):
        return None
    return namespace, client


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if it is shaped like one."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or len(token) > _MAX_TOKEN or not _JWT.match(token):
        return None
    return token


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(authorizer: Authorizer, open_paths: Collection[str] = OPEN_PATHS,
               guarded_paths: Collection[str] = GUARDED_PATHS) -> Any:
    """An aiohttp middleware: every route naming a Client needs a caller allowed to select it;
    each of ``guarded_paths`` one allowed to ``get`` it."""

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths or isinstance(request.match_info.http_exception,
                                                    web.HTTPException):
            return await handler(request)  # open, or 404/405: nothing to protect
        guarded = request.path in guarded_paths
        target = None if guarded else target_of(request.match_info)
        if target is None and not guarded:
            authorizer.count("bad_target")
            return _json_error(400, "the path must name a Client as NAMESPACE/NAME")
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            authorizer.count("unauthenticated")
            return _unauthorized("a ServiceAccount token is required (Authorization: Bearer)")
        try:
            caller = await authorizer.authenticate(token)
            if caller is None:
                authorizer.count("unauthenticated")
                return _unauthorized("the token was not accepted")
            if target is None:
                allowed, reason = await authorizer.authorize_path(token, caller, request.path)
            else:
                allowed, reason = await authorizer.authorize(token, caller, *target)
        except ApiUnavailable:
            authorizer.count("unavailable")
            return _json_error(503, "cannot verify the caller: the Kubernetes API is "
                                    "unavailable", {"Retry-After": "1"})
        if not allowed:
            authorizer.count("denied")
            what = (f"get {request.path}" if target is None else
                    f"{authorizer.verb} clients.{GROUP} {target[1]!r} in namespace "
                    f"{target[0]!r}")
            log.info("caller denied user=%s what=%s", caller.username, what)
            return _json_error(403, f"{caller.username} may not {what}"
                               + (f": {reason}" if reason else ""))
        authorizer.count("allowed")
        request[CALLER] = caller
        return await handler(request)

    return authorize


def install(app: web.Application, authorizer: Authorizer,
            open_paths: Collection[str] = OPEN_PATHS) -> None:
    """Put the middleware first in ``app`` and close the authorizer with it."""
    app.middlewares.insert(0, middleware(authorizer, open_paths))

    async def close(_app: web.Application) -> None:
        await authorizer.close()

    app.on_cleanup.append(close)


def from_settings(enabled: bool, environ: Mapping[str, str], **options: Any) -> Authorizer | None:
    """The selector's authorizer from its setting: in-cluster, or None with a loud warning."""
    if not enabled:
        log.warning(
            "CALLER AUTHORIZATION IS OFF (MULAMBDA_SELECTOR_AUTH=false): anyone who reaches "
            "this selector may select any namespace's Client and use the gateway; "
            "for local development only")
        return None
    api = ApiServer.in_cluster(environ)
    log.info("caller authorization on server=%s verb=%s resource=%s.%s",
             api.server, options.get("verb", VERB), RESOURCE, GROUP)
    return Authorizer(api, **options)

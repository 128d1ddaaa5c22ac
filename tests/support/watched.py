"""The executors of one namespace as one list-then-watch stream sees them
(``bench/operator_scale.py`` counts handled executors with it; no test uses it)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from typing import Any

import httpx

from mulambda.operator.k8s.informer import PAGE, Expired, Key, decide


class Watched:
    """The namespace's executors as one list-then-watch stream sees them, in a thread.

    The benchmark polls "how many are handled" every half second for minutes; a paged
    LIST of N objects each time made the API server serialize N objects twice a
    second, CPU taken from the operator under test (and more from the slower one).
    A watch costs the server one encoding per change."""

    def __init__(self, server: str, tls: ssl.SSLContext, namespace: str) -> None:
        self._http = httpx.Client(base_url=server, verify=tls,
                                  timeout=httpx.Timeout(60, read=400))
        self.namespace = namespace
        self._path = f"/apis/mulambda.io/v1alpha1/namespaces/{namespace}/modelexecutors"
        self._objects: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-watch")
        self._thread.start()
        if not self._listed.wait(120):
            raise RuntimeError(f"could not list {self._path}")

    def count(self, handled: Any) -> int:
        with self._lock:
            return sum(1 for obj in self._objects.values() if handled(obj))

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((self.namespace, name))

    def close(self) -> None:
        self._stopped.set()
        self._http.close()

    @staticmethod
    def _trim(obj: dict[str, Any]) -> dict[str, Any]:
        # Only what the handled/settled predicates read: N whole bodies would be this
        # process's largest memory.
        meta = obj.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        status = obj.get("status") or {}
        return {"metadata": {"annotations": {k: "" for k in annotations
                                             if k.startswith("kopf.zalando.org/")}},
                "status": {"observedGeneration": status.get("observedGeneration"),
                           "conditions": status.get("conditions") or []}}

    def _run(self) -> None:
        version = ""
        while not self._stopped.is_set():
            try:
                if not version:
                    version = self._list()
                    self._listed.set()
                version = self._watch(version)
            except (httpx.HTTPError, ValueError):
                if self._stopped.is_set():
                    return
                time.sleep(1)

    def _list(self) -> str:
        objects: dict[Key, dict[str, Any]] = {}
        token, version = "", ""
        while True:
            params = {"limit": str(PAGE)}
            if token:
                params["continue"] = token
            resp = self._http.get(self._path, params=params)
            resp.raise_for_status()
            page = resp.json()
            for obj in page.get("items") or []:
                meta = obj["metadata"]
                objects[(meta.get("namespace", ""), meta["name"])] = self._trim(obj)
            version = version or page["metadata"]["resourceVersion"]
            token = page["metadata"].get("continue") or ""
            if not token:
                break
        with self._lock:
            self._objects = objects
        return str(version)

    def _watch(self, version: str) -> str:
        """Watch from ``version``; the last version seen, or "" to list again. Each event is
        decided as the operator's informers decide it (operator/k8s/informer.py)."""
        params = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": "300"}
        with self._http.stream("GET", self._path, params=params) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line:
                    continue
                try:
                    seen, change = decide(json.loads(line), self._trim, _every_namespace)
                except (Expired, RuntimeError):
                    return ""  # 410 Gone and the like: list again
                version = seen or version
                if change is None:
                    continue
                with self._lock:
                    if change.obj is None:
                        self._objects.pop(change.key, None)
                    else:
                        self._objects[change.key] = change.obj
        return version


def _every_namespace(namespace: str) -> bool:
    return True

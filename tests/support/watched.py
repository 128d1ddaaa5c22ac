"""The executors of one namespace as one list-then-watch stream sees them
(``bench/operator_scale.py`` counts handled executors with it; no test uses it)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from typing import Any

import httpx

PAGE = 500


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
        self._objects: dict[str, dict[str, Any]] = {}
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
            return self._objects.get(name)

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
        objects: dict[str, dict[str, Any]] = {}
        token, version = "", ""
        while True:
            params = {"limit": str(PAGE)}
            if token:
                params["continue"] = token
            resp = self._http.get(self._path, params=params)
            resp.raise_for_status()
            page = resp.json()
            for obj in page.get("items") or []:
                objects[obj["metadata"]["name"]] = self._trim(obj)
            version = version or page["metadata"]["resourceVersion"]
            token = page["metadata"].get("continue") or ""
            if not token:
                break
        with self._lock:
            self._objects = objects
        return str(version)

    def _watch(self, version: str) -> str:
        params = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": "300"}
        with self._http.stream("GET", self._path, params=params) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    return ""  # 410 Gone and the like: list again
                version = obj["metadata"].get("resourceVersion") or version
                if event["type"] == "BOOKMARK":
                    continue
                with self._lock:
                    if event["type"] == "DELETED":
                        self._objects.pop(obj["metadata"]["name"], None)
                    else:
                        self._objects[obj["metadata"]["name"]] = self._trim(obj)
        return version

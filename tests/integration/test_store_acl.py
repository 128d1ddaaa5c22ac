"""Store access control against a real redis-server loading the ACL file the store gets.

Each role logs in as its own user (mulambda.store.acl) and runs the store
calls its component makes, and is refused what belongs to another: a
companion cannot write executor or Client records, a client (tenant)
credential cannot write anything, nobody without a user can do anything.
The expectations are written out here, not derived from the ACL module.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from mulambda.store.acl import ROLES, acl_file
from mulambda.store.acl import main as acl_main
from mulambda.store.leases import InflightLeases
from mulambda.store.metadata import MetadataStore
from mulambda.store.reader import InflightMirror, SharedSnapshot, SnapshotReader
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    StoreUnavailable,
)

from support.acl_store import PASSWORDS, login, role_stores
from support.procs import RedisServer

pytestmark = pytest.mark.integration

P = "acl"  # the key prefix (the chart's settings.keyPrefix); the rules are built for it
EXECUTOR, CLIENT, POD = "ml/hp2", "apps/shop", "hp2-abc"


@pytest.fixture
def url(acl_redis: RedisServer) -> str:
    acl_redis.flush()
    return acl_redis.url


@pytest.fixture
async def stores(url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
    dict[str, MetadataStore]
]:
    """One MetadataStore per role, each built the way its process builds it: the URL (as
    the ConfigMap has it, with the companions' user) and MULAMBDA_REDIS_USERNAME/PASSWORD."""
    host = url.removeprefix("redis://")
    out = role_stores(f"redis://mulambda-companion@{host}", P, monkeypatch)
    yield out
    for store in out.values():
        await store.close()


def executor(rest: str = "http://hp2.ml:8501") -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name="hp2", model="half_plus_two", version=1,
                          type="regression", input="tensor", output="tensor", accuracy=0.9,
                          rest=rest, grpc="hp2.ml:8500", state="Ready", ready_replicas=1)


def client() -> ClientRecord:
    return ClientRecord(namespace="apps", name="shop", type="regression",
                        probe_url="http://shop.apps:8079/ping")


def refused(exc: BaseException) -> bool:
    return "NOPERM" in str(exc) or "no permissions" in str(exc)


# -- every role does its job --------------------------------------------------------------------


async def test_each_role_does_its_job_with_its_own_user(stores):
    op, comp, sel, sdk, cli = (stores[r] for r in ("operator", "companion", "selector", "sdk",
                                                   "client"))
    # Operator: registers an executor and a Client.
    await op.put_executor(executor())
    await op.put_client(client())
    # Companion: reads probe targets, writes its heartbeat and its latency samples.
    assert CLIENT in await comp.list_clients()
    await comp.put_replica(ReplicaRecord(executor=EXECUTOR, pod=POD, ip="10.0.0.1",
                                         state="Available", version=1), ttl=30)
    previous = await comp.get_latencies(EXECUTOR, POD, [CLIENT])
    assert previous == {}
    await comp.put_latencies(EXECUTOR, POD, {CLIENT: LatencySample(ms=1.5, samples=1)}, ttl=30)
    # Selector: one snapshot, then demand.
    snap = await sel.snapshot(CLIENT)
    assert EXECUTOR in snap.executors and snap.client_record is not None
    assert snap.replicas[EXECUTOR][0].pod == POD and snap.latency[EXECUTOR][POD].ms == 1.5
    await sel.note_demand([EXECUTOR])
    # SDK: in-flight leases and demand through the real lease writer, and a snapshot.
    leases = InflightLeases(sdk, instance="sdk1")
    leases.start(EXECUTOR, publish=False)
    await leases.flush()
    assert (await sdk.snapshot(CLIENT)).inflight == {EXECUTOR: 1}
    # Client (tenant workload): reads the same snapshot.
    assert (await cli.snapshot(CLIENT)).inflight == {EXECUTOR: 1}
    # Every reader also refreshes as its process does: what changed since its last read.
    for reader in (sel, sdk, cli):
        mirrored = SnapshotReader(reader, CLIENT)
        for _ in range(2):  # the first read is whole, the second follows the streams
            snap = await mirrored.snapshot()
            assert snap.inflight == {EXECUTOR: 1} and snap.latency[EXECUTOR][POD].ms == 1.5
    assert (await InflightMirror(cli).load())[0] == {EXECUTOR: 1}
    # Operator: every Client's reselection reads the shared fleet part and its samples.
    assert EXECUTOR in (await SharedSnapshot(op, ttl=0).get()).executors
    assert POD in (await op.client_view(CLIENT))[0][EXECUTOR]
    # Operator: sees heartbeats and load, prunes, forgets.
    assert [r.pod for r in await op.list_replicas(EXECUTOR)] == [POD]
    inflight, rate = await op.executor_load(EXECUTOR, window_seconds=20)
    assert inflight == 1 and rate > 0
    assert await op.prune_expired() == 0
    await leases.close()
    await comp.remove_replica(EXECUTOR, POD)
    await op.remove_executor(EXECUTOR)
    await op.remove_client(CLIENT)
    assert (await op.snapshot()).executors == {}


def test_measured_service_times_are_written_by_routers_and_read_by_everyone(url):
    # P:service (measured service times) is written with the in-flight leases.
    for role in ("selector", "sdk"):
        login(url, role).hset(f"{P}:service", f"{EXECUTOR}|{role}", "{}")
    for role in ("operator", "selector", "sdk", "client"):
        assert set(login(url, role).hgetall(f"{P}:service")) == {
            f"{EXECUTOR}|selector", f"{EXECUTOR}|sdk"}
    login(url, "operator").hdel(f"{P}:service", f"{EXECUTOR}|sdk")  # pruning


# -- and nobody else's --------------------------------------------------------------------------

# Who may write each key family (docs/design.md "who writes what"; the operator
# also deletes expired values everywhere it prunes).
WRITERS = {
    "executors": {"operator"},
    "clients": {"operator"},
    "replicas": {"operator", "companion"},
    f"latency:{CLIENT}": {"operator", "companion"},
    "inflight": {"operator", "selector", "sdk"},
    "service": {"operator", "selector", "sdk"},
    "demand:1": {"selector", "sdk"},
}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_is_refused_every_write_that_is_not_its_own(url, role):
    r = login(url, role)
    for family, writers in WRITERS.items():
        key = f"{P}:{family}"
        write = ((lambda k=key: r.hincrby(k, EXECUTOR, 1)) if family.startswith("demand")
                 else (lambda k=key: r.hset(k, EXECUTOR, "{}")))
        if role in writers:
            write()
            continue
        with pytest.raises(NoPermissionError):
            write()
        with pytest.raises(NoPermissionError):
            r.hdel(key, EXECUTOR)
        with pytest.raises(NoPermissionError):
            r.delete(key)


async def test_a_companion_credential_cannot_write_executor_records(stores, url):
    await stores["operator"].put_executor(executor())
    forged = executor(rest="http://attacker.evil:8501")
    for attempt in (stores["companion"].put_executor(forged),
                    stores["companion"].remove_executor(EXECUTOR),
                    stores["companion"].put_client(client()),
                    stores["companion"].remove_client(CLIENT)):
        with pytest.raises(StoreUnavailable) as err:
            await attempt
        assert refused(err.value), err.value
    snap = await stores["operator"].snapshot()
    assert snap.executors[EXECUTOR].rest == "http://hp2.ml:8501"


ANY_WRITE = [
    ("HSET", "{k}", "f", "v"), ("HDEL", "{k}", "f"), ("HINCRBY", "{k}", "f", "1"),
    ("HSETNX", "{k}", "f", "v"), ("HMSET", "{k}", "f", "v"), ("EXPIRE", "{k}", "1"),
    ("PERSIST", "{k}"), ("DEL", "{k}"), ("UNLINK", "{k}"), ("RENAME", "{k}", "{k}:x"),
    ("SET", "{k}", "v"), ("COPY", "{k}", "{k}:copy"), ("RESTORE", "{k}", "0", "x"),
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "1"),
    ("ACL", "SETUSER", "mulambda-client", "+@all"), ("EVAL", "return 1", "0"),
    ("FUNCTION", "FLUSH"), ("SCRIPT", "FLUSH"), ("SWAPDB", "0", "1"),
    ("SHUTDOWN",), ("MODULE", "LIST"), ("KEYS", "*"), ("SCAN", "0"), ("MONITOR",),
]


def test_a_client_credential_cannot_write_anything(url, acl_redis):
    login(url, "operator").hset(f"{P}:executors", EXECUTOR, "{}")
    r = login(url, "client")
    assert r.hgetall(f"{P}:executors") == {EXECUTOR: "{}"}  # it can read the snapshot
    families = [f"{P}:{f}" for f in WRITERS] + ["other:key"]
    for key in families:
        for command in ANY_WRITE:
            args = [a.format(k=key) for a in command]
            with pytest.raises((NoPermissionError, ResponseError)) as err:
                r.execute_command(*args)
            assert refused(err.value), (args, err.value)
    # Nothing changed.
    assert acl_redis.command("HGETALL", f"{P}:executors").count(b"$") == 2
    assert acl_redis.command("DBSIZE").startswith(b":1")


def test_no_user_no_access(url):
    anonymous = redis.Redis.from_url(url)
    with pytest.raises(AuthenticationError):
        anonymous.ping()
    with pytest.raises(AuthenticationError):
        login(url, "operator", password="wrong-password").ping()
    with pytest.raises(AuthenticationError):  # a password alone is the default user: off
        redis.Redis.from_url(url, password=PASSWORDS["operator"]).ping()


def test_the_process_user_wins_over_the_urls(url, monkeypatch):
    # The ConfigMap's URL names the companions' user (the operator copies it into
    # executor pods); the operator and the selector log in as themselves.
    from mulambda.store.connection import _with_username

    host = url.removeprefix("redis://")
    monkeypatch.delenv("MULAMBDA_REDIS_USERNAME", raising=False)
    assert _with_username(f"redis://mulambda-companion@{host}") == (
        f"redis://mulambda-companion@{host}")
    monkeypatch.setenv("MULAMBDA_REDIS_USERNAME", "mulambda-operator")
    assert _with_username(f"redis://mulambda-companion@{host}") == (
        f"redis://mulambda-operator@{host}")
    assert _with_username(f"redis://{host}") == f"redis://mulambda-operator@{host}"


def test_acl_file_keeps_passwords_out_and_turns_the_default_user_off():
    text = acl_file(P, PASSWORDS)
    assert text.splitlines()[0].startswith("user default off")
    assert not any(pw in text for pw in PASSWORDS.values())
    assert all(f"user {role.username} on #" in text for role in ROLES.values())


@pytest.mark.parametrize(("env", "prefix"), [("", "mulambda"), ("team", "team")])
def test_an_empty_key_prefix_counts_as_unset_for_the_acl_file(tmp_path, monkeypatch, env,
                                                              prefix):
    for role in ROLES:
        (tmp_path / "secrets" / role).mkdir(parents=True)
        (tmp_path / "secrets" / role / "password").write_text(PASSWORDS[role])
    monkeypatch.setenv("MULAMBDA_KEY_PREFIX", env)
    assert acl_main(["acl-file", "--secrets", str(tmp_path / "secrets"),
                     "--out", str(tmp_path / "users.acl")]) == 0
    assert (tmp_path / "users.acl").read_text() == acl_file(prefix, PASSWORDS)


# -- what the chart and the kustomize base ship -------------------------------------------------


def _can_log_in(url: str, username: str, password: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, username=username, password=password).ping())
    except AuthenticationError:
        return False


def test_the_charts_secrets_and_store_init_container_make_a_store_every_role_logs_in_to(
        tmp_path):
    """Render the chart, run the store's init container command on its Secrets as the
    kubelet would mount them, start a real redis-server with the result."""
    import base64
    import json

    import helm_python
    import yaml

    from mulambda.store.acl import main as acl_main

    from support.controlplane import REPO

    values = {"fullnameOverride": "ml", "settings": {"keyPrefix": "team"}}
    rendered = helm_python.Chart.load(REPO / "charts" / "mulambda").render(
        values, name="ml", namespace="ml-system")
    docs = [d for path, text in rendered.items() if not path.endswith(".txt")
            for d in yaml.safe_load_all(text) if d]
    secrets = {d["metadata"]["name"]: {k: base64.b64decode(v).decode()
                                       for k, v in d["data"].items()}
               for d in docs if d["kind"] == "Secret"}
    store = next(d for d in docs if d["kind"] == "Deployment"
                 and d["metadata"]["name"].endswith("-redis"))
    spec = store["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    (users,) = [v for v in spec["volumes"] if v["name"] == "users"]
    mounted = tmp_path / "secrets"
    for source in users["projected"]["sources"]:
        for item in source["secret"]["items"]:
            target = mounted / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(secrets[source["secret"]["name"]][item["key"]])
    args = [a.replace("/secrets", str(mounted)).replace("/acl/", f"{tmp_path}/")
            for a in init["command"][3:]]
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["MULAMBDA_KEY_PREFIX"] == "team"
    assert acl_main([*args, "--prefix", env["MULAMBDA_KEY_PREFIX"]]) == 0
    acl = (tmp_path / "users.acl").read_text()
    assert not any(s["password"] in acl for s in secrets.values() if "password" in s)

    built = RedisServer(acl=acl)
    built.start()
    try:
        for role in ROLES:
            secret = secrets[f"ml-store-{role}"]
            assert _can_log_in(built.url, secret["username"], secret["password"]), role
            assert not _can_log_in(built.url, secret["username"], "guessed"), role
        operator = secrets["ml-store-operator"]
        r = redis.Redis.from_url(built.url, username=operator["username"],
                                 password=operator["password"])
        r.hset("team:executors", "a/b", json.dumps({}))  # the chart's prefix, not the default
        with pytest.raises(NoPermissionError):
            r.hset("mulambda:executors", "a/b", "{}")
    finally:
        built.stop()


def test_with_users_off_the_charts_store_takes_the_shared_password_and_no_other(tmp_path):
    """Per-role users off, ``redis.existingSecret`` set: the bundled store ran with no
    password at all (the processes sent theirs and it took them, as it took none)."""
    import helm_python
    import yaml

    from mulambda.store.acl import main as acl_main

    from support.controlplane import REPO

    values = {"fullnameOverride": "ml", "redis": {"acl": {"enabled": False},
                                                  "existingSecret": "store-auth"}}
    rendered = helm_python.Chart.load(REPO / "charts" / "mulambda").render(
        values, name="ml", namespace="ml-system")
    store = next(d for path, text in rendered.items() if not path.endswith(".txt")
                 for d in yaml.safe_load_all(text)
                 if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "ml-redis")
    spec = store["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    (users,) = [v for v in spec["volumes"] if v["name"] == "users"]
    assert users["secret"]["secretName"] == "store-auth"
    [item] = users["secret"]["items"]
    shared = "a shared password, with spaces \"and quotes\"\n"  # as the Secret holds it
    mounted = tmp_path / "secrets" / item["path"]
    mounted.parent.mkdir(parents=True)
    mounted.write_text(shared)
    args = [a.replace("/secrets", str(tmp_path / "secrets")).replace("/acl/", f"{tmp_path}/")
            for a in init["command"][3:]]
    assert acl_main(args) == 0
    acl = (tmp_path / "users.acl").read_text()
    assert "shared password" not in acl
    assert "--aclfile /etc/mulambda-store/users.acl" in spec["containers"][0]["args"][0]

    built = RedisServer(acl=acl)
    built.start()
    try:
        # What every process sends: MULAMBDA_REDIS_PASSWORD, the Secret's value as it is.
        assert _can_log_in(built.url, "default", shared)
        assert not _can_log_in(built.url, "default", shared.strip())
        assert not _can_log_in(built.url, "default", "guessed")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(built.url).ping()
    finally:
        built.stop()


def test_the_kustomize_store_account_creates_and_reads_only_its_users_secrets(
        cluster, ns, tmp_path):
    """The base's store ServiceAccount and Role on the real API acl_redis: the init
    container's code, authenticated as that account, creates the role Secrets once and
    reads them again; it can read no other Secret."""
    import yaml
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException

    from mulambda.store.acl import passwords_from_api

    from support.controlplane import REPO
    from support.identity import request_token, write_token_kubeconfig

    out = subprocess.run(["kubectl", "kustomize", str(REPO / "manifests" / "base")],
                         capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for d in docs:
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding") and \
                d["metadata"]["labels"].get("app.kubernetes.io/component") == "store":
            d["metadata"]["namespace"] = ns
            for subject in d.get("subjects", []):
                subject["namespace"] = ns
            cluster.create(d)
    cluster.create({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "someone-elses", "namespace": ns},
                    "stringData": {"password": "not yours"}})
    token = request_token(cluster, ns, "mulambda-store")
    kubeconfig = tmp_path / "store.kubeconfig"
    plane = cluster.cp
    write_token_kubeconfig(kubeconfig, plane.server, plane.pki / "ca.crt", "store", token)
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    core = k8s.CoreV1Api(api)
    try:
        first = passwords_from_api(ns, "mulambda-store", core)
        assert set(first) == set(ROLES)
        assert passwords_from_api(ns, "mulambda-store", core) == first  # kept, not renewed
        for role in ROLES:
            data = cluster.get("v1", "secrets", ns, f"mulambda-store-{role}")["data"]
            assert base64_text(data["username"]) == ROLES[role].username
        with pytest.raises(ApiException) as denied:
            core.read_namespaced_secret("someone-elses", ns)
        assert denied.value.status == 403
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_secret(ns)
        assert denied.value.status == 403
    finally:
        api.close()


def base64_text(value: str) -> str:
    import base64

    return base64.b64decode(value).decode()

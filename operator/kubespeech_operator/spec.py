"""Pydantic models of the SpeechDeployment custom resource: the single source of its schema and its rules.

The CRD's openAPIV3Schema is generated from these models (``kubespeech_operator.builders.crd``), so every
field's docstring is what ``kubectl explain`` shows. Rules the API server checks with CEL are mirrored here
as validators so that ``kubespeech render`` and the operator reject exactly what admission rejects; rules
across pools and tasks live only here, in :func:`parse_spec`, whose errors name the pool and the pool it
conflicts with (a CEL rule could only name the list). The API server admits those; the operator reports them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonDict

API_VERSION = "kubespeech.io/v1alpha1"
KIND = "SpeechDeployment"

# Kubernetes resource quantity (k8s.io/apimachinery/pkg/api/resource), as the API server's schema writes it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
# Model sources `kubespeech model fetch` understands, or an absolute path already on the cache volume.
MODEL_SOURCE_PATTERN = r"^((hf|ngc|https|s3|file)://.+|/.+)$"
# A DNS-1035 label: what a pool name must be to become part of Deployment and Service names.
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# A model (queue) name: what clients put in `model=`; also part of Redis key names.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# An image reference pinned by tag or digest; `:latest` is refused separately.
IMAGE_PATTERN = r"^[^\s]+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[a-f0-9]{64})$"
IMAGE_TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
# Longest SpeechDeployment name: children are named `<name>-<task>-<pool>` and must stay DNS labels.
MAX_NAME_LENGTH = 30
MAX_POOL_NAME_LENGTH = 20
MAX_POOLS = 16
# Consecutive polls without a queue depth after which a pool goes to autoscaling.fallbackReplicas (the
# operator's autoscaler and a KEDA ScaledObject's fallback.failureThreshold both use it).
FALLBACK_AFTER_FAILED_POLLS = 3


class SpecError(ValueError):
    """A SpeechDeployment spec that cannot be reconciled; ``field_path`` names the offending field."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One ``x-kubernetes-validations`` entry (the Python validator beside it enforces the same rule).

    ``field_path`` (relative, e.g. ``.minReplicas``) is where the API server reports a violation, so that
    admission names the same field as the Python validator. A rule on an object that has a default must
    guard every field it reads with ``has()``: the API server evaluates it on the default as written
    (``{}``), before nested defaults fill it in, and refuses the CRD when that evaluation fails.
    """
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
        }
    ),
]
FreeForm = Annotated[
    dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
]


class KubeModel(BaseModel):
    """Base of every spec model: camelCase names in YAML, unknown fields refused, docstrings as descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        use_attribute_docstrings=True,
        validate_default=False,
        # No type coercion ("2" for 2): accept exactly what the CRD schema accepts.
        strict=True,
    )


def _check_quantities(values: dict[str, int | str] | None) -> dict[str, int | str] | None:
    for key, value in (values or {}).items():
        if isinstance(value, str) and not _QUANTITY_RE.match(value):
            raise ValueError(f"{key}: {value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{key}: must not be negative")
    return values


# ---------------------------------------------------------------------------------------------------------
# Kubernetes types used in the spec, with real schemas (a subset of the core types' fields).


class ResourceRequirements(KubeModel):
    """CPU, memory and other resources of a container, as in a Pod spec (GPUs go in ``gpu`` instead)."""

    requests: dict[str, Quantity] | None = None
    """Minimum resources the scheduler reserves, e.g. {cpu: 500m, memory: 512Mi}."""
    limits: dict[str, Quantity] | None = None
    """Maximum resources the container may use, e.g. {cpu: "2", memory: 2Gi}."""

    _validate_requests = field_validator("requests", "limits")(_check_quantities)


class SecretKeySelector(KubeModel):
    """One key of a Secret in the SpeechDeployment's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside the Secret."""
    optional: bool | None = None
    """Whether the Secret or its key may be missing."""


class ConfigMapKeySelector(KubeModel):
    """One key of a ConfigMap in the SpeechDeployment's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the ConfigMap."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside the ConfigMap."""
    optional: bool | None = None
    """Whether the ConfigMap or its key may be missing."""


class ObjectFieldSelector(KubeModel):
    """A field of the Pod, exposed to the container (downward API)."""

    field_path: str = Field(min_length=1)
    """Path of the field, e.g. metadata.name or status.podIP."""
    api_version: str | None = None
    """Schema version of the field path (v1 when unset)."""


class ResourceFieldSelector(KubeModel):
    """A resource request or limit of a container, exposed to the container (downward API)."""

    resource: str = Field(min_length=1)
    """Resource to expose, e.g. limits.memory."""
    container_name: str | None = None
    """Container whose resource is exposed (this one when unset)."""
    divisor: Quantity | None = None
    """Unit to express the value in, e.g. 1Mi."""


class EnvVarSource(KubeModel):
    """Where an environment variable's value comes from; exactly one source."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef),"
                    " has(self.resourceFieldRef)].filter(x, x).size() == 1",
                    "valueFrom needs exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef",
                )
            ]
        }
    )

    secret_key_ref: SecretKeySelector | None = None
    """A key of a Secret (the way to pass secrets: never as a literal value)."""
    config_map_key_ref: ConfigMapKeySelector | None = None
    """A key of a ConfigMap."""
    field_ref: ObjectFieldSelector | None = None
    """A field of the Pod."""
    resource_field_ref: ResourceFieldSelector | None = None
    """A resource request or limit of the container."""

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        sources = [self.secret_key_ref, self.config_map_key_ref, self.field_ref, self.resource_field_ref]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "valueFrom needs exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef"
            )
        return self


class EnvVar(KubeModel):
    """An extra environment variable for the container (set after the operator's own; same name wins)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.value) && has(self.valueFrom))",
                    "set either value or valueFrom, not both",
                    ".valueFrom",
                )
            ]
        }
    )

    name: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    """Variable name."""
    value: str | None = None
    """Literal value (do not put secrets here: use valueFrom.secretKeyRef)."""
    value_from: EnvVarSource | None = None
    """Value taken from a Secret, ConfigMap or the Pod."""

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("valueFrom: set either value or valueFrom, not both")
        return self


class Toleration(KubeModel):
    """Lets a pod schedule onto nodes with a matching taint (e.g. GPU or spot node pools)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.operator) && self.operator == 'Exists' && has(self.value) && self.value != '')",
                    "a toleration with operator Exists must not have a value",
                    ".value",
                )
            ]
        }
    )

    key: str | None = Field(None, max_length=317)
    """Taint key to match; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists (any value) or Equal (the value below); Equal when unset."""
    value: str | None = Field(None, max_length=63)
    """Taint value to match with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; every effect when unset."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears (forever when unset)."""

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("value: a toleration with operator Exists must not have a value")
        return self


class TopologySpreadConstraint(KubeModel):
    """How to spread a pool's pods across zones or nodes (labelSelector defaults to the pool's pods)."""

    max_skew: int = Field(ge=1)
    """Largest allowed difference in pod count between two topology domains."""
    topology_key: str = Field(min_length=1)
    """Node label that defines a domain, e.g. topology.kubernetes.io/zone."""
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"]
    """DoNotSchedule (hard rule) or ScheduleAnyway (preference)."""
    label_selector: FreeForm | None = None
    """Pods counted for the spread; the pool's own pods when unset."""
    min_domains: int | None = Field(None, ge=1)
    """Minimum number of eligible domains (with DoNotSchedule)."""
    match_label_keys: list[str] | None = None
    """Pod label keys whose values further select the pods counted (e.g. pod-template-hash)."""
    node_affinity_policy: Literal["Honor", "Ignore"] | None = None
    """Whether nodeSelector/affinity limit the domains counted."""
    node_taints_policy: Literal["Honor", "Ignore"] | None = None
    """Whether node taints limit the domains counted."""


# ---------------------------------------------------------------------------------------------------------
# Component specs.


class SecretRef(KubeModel):
    """A key of a Secret in the SpeechDeployment's namespace (created by you, never copied by the operator)."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside the Secret."""


class LicenseSpec(KubeModel):
    """The license key the license proxy validates (and, optionally, the vendor key it is checked against)."""

    secret_ref: SecretRef
    """Secret key holding the signed license key (mounted as a file into the license proxy only)."""
    public_key_secret_ref: SecretRef | None = None
    """Secret key holding the vendor's public key; the one built into the image when unset."""


class ServiceSpec(KubeModel):
    """The Kubernetes Service in front of the API server."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Service type: ClusterIP (in-cluster or behind the Ingress), NodePort or LoadBalancer."""
    port: int = Field(7100, ge=1, le=65535)
    """Port the Service exposes (the API server always listens on 7100)."""
    annotations: dict[str, str] | None = None
    """Annotations for the Service, e.g. for a cloud load balancer."""


class IngressSpec(KubeModel):
    """An optional Ingress for the API server (HTTP and WebSocket)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.enabled) || !self.enabled || has(self.host)",
                    "an enabled ingress needs a host",
                    ".host",
                )
            ]
        }
    )

    enabled: bool = False
    """Whether to create the Ingress."""
    class_name: str | None = None
    """IngressClass to use, e.g. nginx; the cluster default when unset."""
    host: str | None = Field(
        None,
        max_length=253,
        pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    )
    """Host name clients use, e.g. speech.example.com."""
    tls_secret_name: str | None = None
    """Secret with the TLS certificate for the host; plain HTTP when unset."""
    annotations: dict[str, str] | None = None
    """Annotations for the Ingress (e.g. raise proxy timeouts for long WebSocket sessions)."""

    @model_validator(mode="after")
    def _host_when_enabled(self) -> IngressSpec:
        if self.enabled and not self.host:
            raise ValueError("host: an enabled ingress needs a host")
        return self


class ApiSpec(KubeModel):
    """The API server: the only component clients talk to."""

    replicas: int = Field(2, ge=0, le=100)
    """Number of API server pods (stateless; WebSocket sessions survive a worker loss, not an API pod loss)."""
    resources: ResourceRequirements | None = None
    """Requests/limits; 500m-2 CPU and 512Mi-2Gi memory when unset."""
    api_keys_secret_ref: SecretRef
    """Secret key holding the API keys clients send as `Authorization: Bearer`: one per line, plain or sha256:<hex>; reloaded live."""
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    """The Service in front of the API server."""
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    """Optional Ingress for the API server."""


class LicenseProxySpec(KubeModel):
    """The license proxy: validates the license and reports usage metadata (never audio or text)."""

    replicas: int = Field(1, ge=1, le=10)
    """Number of license proxy pods."""
    resources: ResourceRequirements | None = None
    """Requests/limits; 250m-1 CPU and 256Mi-512Mi memory when unset."""
    upstream_url: str | None = Field(None, pattern=r"^https://.+")
    """HTTPS URL of the vendor's license server; offline (grace period rules apply) when unset."""


class RedisPersistenceSpec(KubeModel):
    """Whether embedded Redis keeps its data on a PersistentVolume. Fixed once Redis exists (a StatefulSet's
    volume templates are immutable): to change it, delete the Redis StatefulSet and let the operator recreate
    it."""

    enabled: bool = True
    """Keep Redis data on a PVC (otherwise an emptyDir: queued jobs are lost when the pod moves)."""
    size: Quantity = "1Gi"
    """Size of the volume."""
    storage_class: str | None = None
    """StorageClass of the volume; the cluster default when unset."""


class EmbeddedRedisSpec(KubeModel):
    """Redis run by the operator (a one-replica StatefulSet with a generated password)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.image) || !self.image.endsWith(':latest')",
                    "pin the image: :latest is refused",
                    ".image",
                )
            ]
        }
    )

    image: str = Field("docker.io/library/redis:7.4.1-alpine", pattern=IMAGE_PATTERN, max_length=512)
    """Redis image, pinned by tag or digest."""
    resources: ResourceRequirements | None = None
    """Requests/limits; 500m-1 CPU and 512Mi-2Gi memory when unset."""
    persistence: RedisPersistenceSpec = Field(default_factory=RedisPersistenceSpec)
    """Where Redis keeps its data."""

    @field_validator("image")
    @classmethod
    def _not_latest(cls, value: str) -> str:
        if value.endswith(":latest"):
            raise ValueError("pin the image: :latest is refused")
        return value


class RedisTlsSpec(KubeModel):
    """TLS to an external Redis."""

    enabled: bool = False
    """Use TLS (requires a rediss:// URL)."""
    insecure_skip_verify: bool = False
    """Skip certificate verification (testing only)."""


class ExternalRedisSpec(KubeModel):
    """A Redis you run (e.g. ElastiCache, Memorystore); Redis 7 or newer."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.tls) || !self.tls.enabled || self.url.startsWith('rediss://')",
                    "tls.enabled needs a rediss:// url",
                    ".url",
                )
            ]
        }
    )

    url: str = Field(pattern=r"^rediss?://[^\s@]+$", max_length=1024)
    """redis:// or rediss:// URL with host, port and database, without a password (e.g. rediss://redis:6380/0)."""
    password_secret_ref: SecretRef | None = None
    """Secret key holding the Redis password (mounted as a file); no AUTH when unset."""
    tls: RedisTlsSpec | None = None
    """TLS settings."""

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> ExternalRedisSpec:
        if self.tls is not None and self.tls.enabled and not self.url.startswith("rediss://"):
            raise ValueError("url: tls.enabled needs a rediss:// url")
        return self


class RedisSpec(KubeModel):
    """Redis holds the job queues, sessions and results."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.mode) || self.mode != 'external' || has(self.external)",
                    "mode external needs external.url",
                    ".external",
                )
            ]
        }
    )

    mode: Literal["embedded", "external"] = "embedded"
    """embedded (the operator runs Redis) or external (you give a URL)."""
    key_prefix: str = Field("ks", pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]*$", max_length=64)
    """Prefix of every Redis key; give stacks sharing one external Redis different prefixes."""
    embedded: EmbeddedRedisSpec = Field(default_factory=EmbeddedRedisSpec)
    """Settings of the embedded Redis."""
    external: ExternalRedisSpec | None = None
    """Connection to the external Redis (required with mode external)."""

    @model_validator(mode="after")
    def _external_needs_url(self) -> RedisSpec:
        if self.mode == "external" and self.external is None:
            raise ValueError("external: mode external needs external.url")
        return self


class VocoderSpec(KubeModel):
    """A NeMo vocoder (e.g. HiFi-GAN) fetched next to a TTS pool's spectrogram generator."""

    source: str = Field(pattern=MODEL_SOURCE_PATTERN, max_length=2048)
    """URI of the vocoder, in the same forms as model.source, e.g. ngc://nvidia/nemo/tts_hifigan:1.0.0rc1."""
    sha256: str | None = Field(None, pattern=r"^[a-f0-9]{64}$")
    """Expected SHA-256 of a single-file vocoder source."""


class ModelSpec(KubeModel):
    """Where a pool's model comes from: a source fetched into the model cache, or a path in the image."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!(has(self.source) && has(self.path))", "set either source or path, not both", ".path"),
                cel(
                    "!has(self.sha256) || has(self.source)",
                    "sha256 checks a downloaded source: set source",
                    ".sha256",
                ),
                cel(
                    "!has(self.vocoder) || has(self.source)",
                    "a vocoder is fetched next to model.source: set source",
                    ".vocoder",
                ),
            ]
        }
    )

    source: str | None = Field(None, pattern=MODEL_SOURCE_PATTERN, max_length=2048)
    """URI fetched by the model-cache Job: hf://org/repo[@rev], ngc://org/team/model:version, https://...,
    s3://bucket/key, file:///path, or an absolute path (the Job sees the cache volume at /models, so a
    /models/... path takes a file you put on the volume yourself)."""
    sha256: str | None = Field(None, pattern=r"^[a-f0-9]{64}$")
    """Expected SHA-256 of a single-file source; the fetch fails on mismatch."""
    path: str | None = Field(None, pattern=r"^/.*$", max_length=1024)
    """Absolute path of a model already in the image (no download)."""
    vocoder: VocoderSpec | None = None
    """NeMo TTS only: a vocoder fetched into the same cache directory, for spectrogram generators published
    without one (e.g. FastPitch on NGC)."""

    @model_validator(mode="after")
    def _source_or_path(self) -> ModelSpec:
        if self.source is not None and self.path is not None:
            raise ValueError("path: set either source or path, not both")
        if self.sha256 is not None and self.source is None:
            raise ValueError("sha256: sha256 checks a downloaded source: set source")
        if self.vocoder is not None and self.source is None:
            raise ValueError("vocoder: a vocoder is fetched next to model.source: set source")
        return self


class GpuSpec(KubeModel):
    """GPUs per pod, requested and limited through the device plugin's extended resource."""

    count: int = Field(1, ge=0, le=16)
    """GPUs per pod (0: run on CPU)."""
    resource_name: str = Field(
        "nvidia.com/gpu",
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    )
    """Extended resource name: nvidia.com/gpu, or a MIG profile such as nvidia.com/mig-1g.10gb."""


class BatchingSpec(KubeModel):
    """How a worker groups queued jobs into one engine call."""

    max_batch_size: int = Field(8, ge=1, le=1024)
    """Most jobs run in one engine call (larger: more throughput on GPU, more latency per job)."""
    max_wait_ms: int = Field(5, ge=0, le=10000)
    """How long a worker waits to fill a batch after the first job arrives."""


class ScalingPolicy(KubeModel):
    """One limit on how fast replicas change (as in a HorizontalPodAutoscaler)."""

    type: Literal["Pods", "Percent"]
    """Pods (absolute) or Percent (of current replicas)."""
    value: int = Field(ge=1)
    """Replicas or percent allowed to change per period."""
    period_seconds: int = Field(ge=1, le=1800)
    """Length of the period in seconds."""


class ScalingRules(KubeModel):
    """Scale-up or scale-down behaviour (as in a HorizontalPodAutoscaler)."""

    stabilization_window_seconds: int | None = Field(None, ge=0, le=3600)
    """Look back this long and use the most conservative recommendation (avoids flapping)."""
    select_policy: Literal["Max", "Min", "Disabled"] | None = None
    """Which policy wins when several apply; Disabled turns this direction off."""
    policies: list[ScalingPolicy] | None = Field(None, max_length=10)
    """Rate limits on replica changes."""


class AutoscalingSpec(KubeModel):
    """Queue-depth autoscaling of a pool (replaces `replicas` when enabled)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.minReplicas) || !has(self.maxReplicas)"
                    " || self.minReplicas <= self.maxReplicas",
                    "minReplicas must not exceed maxReplicas",
                    ".minReplicas",
                ),
                cel(
                    "!has(self.idleReplicas) || !has(self.minReplicas)"
                    " || self.idleReplicas <= self.minReplicas",
                    "idleReplicas must not exceed minReplicas",
                    ".idleReplicas",
                ),
                cel(
                    "!has(self.fallbackReplicas) || !has(self.maxReplicas)"
                    " || self.fallbackReplicas <= self.maxReplicas",
                    "fallbackReplicas must not exceed maxReplicas",
                    ".fallbackReplicas",
                ),
                cel(
                    "!has(self.mode) || self.mode != 'hpa' || !has(self.minReplicas) || self.minReplicas >= 1",
                    "mode hpa needs minReplicas of at least 1: a HorizontalPodAutoscaler cannot scale to zero",
                    ".minReplicas",
                ),
                cel(
                    "!has(self.mode) || self.mode != 'keda' || !has(self.idleReplicas)"
                    " || self.idleReplicas == 0 || (has(self.minReplicas) && self.idleReplicas == self.minReplicas)",
                    "mode keda supports idleReplicas 0 only (KEDA's idleReplicaCount)",
                    ".idleReplicas",
                ),
            ]
        }
    )

    enabled: bool = False
    """Scale this pool on its queue depth and active streams."""
    mode: Literal["operator", "keda", "hpa"] = "operator"
    """Who decides the pool's replicas while enabled. operator: the operator's own autoscaler, which reads the
    queue's waiting + in-flight jobs (and live streams) every pollingIntervalSeconds; pools sharing a queue
    fill in declaration order. keda: a KEDA ScaledObject (KEDA must be installed) whose redis-streams trigger
    reads the same count (the stream's XLEN), with a TriggerAuthentication taking the Redis password from its
    Secret; idleReplicas may only be 0 and targetActiveStreams does not apply. hpa: a HorizontalPodAutoscaler
    on the external metric kubespeech_queue_jobs{model=<modelName>}, which a metrics adapter (e.g.
    prometheus-adapter) must serve; it cannot scale to zero (minReplicas >= 1), and idleReplicas,
    activationQueueDepth, targetActiveStreams, pollingIntervalSeconds, cooldownSeconds and fallbackReplicas do
    not apply. With keda and hpa, pools sharing a queue each scale on the whole queue."""
    min_replicas: int = Field(1, ge=0, le=1000)
    """Fewest replicas while there is traffic (0 allows scale to zero: the first request waits for a cold start)."""
    max_replicas: int = Field(4, ge=1, le=1000)
    """Most replicas (bounded by your GPU node pool's size)."""
    idle_replicas: int | None = Field(None, ge=0, le=1000)
    """Replicas kept after cooldownSeconds without any queued job or stream (e.g. 0 on spot pools)."""
    target_queue_depth_per_replica: int = Field(4, ge=1, le=100000)
    """Queued jobs per replica the autoscaler aims for."""
    activation_queue_depth: int = Field(0, ge=0, le=100000)
    """Jobs (waiting and in flight) that wake a pool at zero replicas: at least max(1, this), so 0 or 1
    means a single queued job wakes it."""
    target_active_streams: int | None = Field(None, ge=1, le=100000)
    """Live streaming sessions per replica the autoscaler aims for; streams are ignored when unset."""
    polling_interval_seconds: int = Field(2, ge=1, le=3600)
    """How often the queue depth is read."""
    cooldown_seconds: int = Field(300, ge=0, le=86400)
    """Quiet time before scaling down to idleReplicas."""
    scale_up: ScalingRules | None = None
    """Limits on scaling up."""
    scale_down: ScalingRules | None = None
    """Limits on scaling down."""
    fallback_replicas: int | None = Field(None, ge=0, le=1000)
    """Replicas to go to once the queue depth could not be read for 3 polls in a row (Redis down or
    unreachable); unset: keep the current count. Missing data never scales a pool to zero: a fallback of 0
    holds a running pool instead of stopping it. At most maxReplicas."""
    cold_start_wait_seconds: int | None = Field(None, ge=0, le=600)
    """How long the API holds a request for this pool's model while it is at zero replicas before answering
    503 with Retry-After; the API's own default when unset."""

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas: minReplicas must not exceed maxReplicas")
        if self.idle_replicas is not None and self.idle_replicas > self.min_replicas:
            raise ValueError("idleReplicas: idleReplicas must not exceed minReplicas")
        if self.fallback_replicas is not None and self.fallback_replicas > self.max_replicas:
            raise ValueError("fallbackReplicas: fallbackReplicas must not exceed maxReplicas")
        if self.mode == "hpa" and self.min_replicas < 1:
            raise ValueError(
                "minReplicas: mode hpa needs minReplicas of at least 1: a HorizontalPodAutoscaler cannot"
                " scale to zero"
            )
        if self.mode == "keda" and self.idle_replicas not in (None, 0, self.min_replicas):
            raise ValueError("idleReplicas: mode keda supports idleReplicas 0 only (KEDA's idleReplicaCount)")
        return self


class PoolSpec(KubeModel):
    """A worker pool: one Deployment of identical workers serving one model queue."""

    name: str = Field(min_length=1, max_length=MAX_POOL_NAME_LENGTH, pattern=DNS_LABEL_PATTERN)
    """Pool name (DNS label, unique within the task): part of the Deployment name, e.g. l4, spot."""
    model_name: str | None = Field(None, min_length=1, max_length=63, pattern=MODEL_NAME_PATTERN)
    """Model (queue) name clients ask for; the pool name when unset. Pools with the same modelName share one
    queue: that is how an on-demand and a spot pool serve one model."""
    default: bool = False
    """Serve requests that name no model (at most one model per task)."""
    aliases: list[Annotated[str, Field(min_length=1, max_length=63, pattern=MODEL_NAME_PATTERN)]] | None = (
        Field(None, max_length=16)
    )
    """Other model names clients may use for this model, e.g. whisper-1 for OpenAI clients."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """The model file; the engine's bundled model when neither source nor path is set."""
    image: str | None = Field(None, pattern=IMAGE_PATTERN, max_length=512)
    """Worker image for this pool (e.g. a CUDA build); images.registry/<task>-worker:images.tag when unset."""
    replicas: int = Field(1, ge=0, le=1000)
    """Worker pods when autoscaling is disabled."""
    resources: ResourceRequirements | None = None
    """CPU/memory requests and limits; 4-8 CPU and 12Gi-16Gi with a GPU, 1-2 CPU and 1Gi-2Gi without."""
    gpu: GpuSpec | None = None
    """GPUs per pod, set in both requests and limits; CPU only when unset."""
    node_selector: dict[str, str] | None = None
    """Node labels the pods require, e.g. {cloud.google.com/gke-accelerator: nvidia-l4}."""
    tolerations: list[Toleration] | None = Field(None, max_length=32)
    """Taints the pods tolerate, e.g. nvidia.com/gpu=present:NoSchedule or a spot taint."""
    affinity: FreeForm | None = None
    """Pod affinity rules (a core/v1 Affinity), copied as is."""
    topology_spread_constraints: list[TopologySpreadConstraint] | None = Field(None, max_length=8)
    """How to spread the pool's pods across zones or nodes."""
    runtime_class_name: str | None = Field(None, max_length=253)
    """RuntimeClass, e.g. nvidia where the GPU runtime is not the default."""
    priority_class_name: str | None = Field(None, max_length=253)
    """PriorityClass of the pods (e.g. lower for spot pools so on-demand pools win)."""
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    """Micro-batching of queued jobs."""
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    """Queue-depth autoscaling."""
    termination_grace_period_seconds: int = Field(90, ge=10, le=3600)
    """Time a stopping worker gets to finish in-flight jobs (it stops taking new jobs at once)."""
    startup_timeout_seconds: int = Field(600, ge=30, le=7200)
    """How long model loading may take before the pod is restarted."""
    engine_options: FreeForm | None = None
    """Engine-specific options passed to the worker as JSON (e.g. {computeType: int8} for whisper)."""
    env: list[EnvVar] | None = Field(None, max_length=64)
    """Extra environment variables for the worker container."""

    @property
    def queue_name(self) -> str:
        return self.model_name or self.name

    @property
    def gpu_count(self) -> int:
        return self.gpu.count if self.gpu is not None else 0


class AsrPoolSpec(PoolSpec):
    """A speech-to-text worker pool."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.model) || !has(self.model.vocoder)",
                    "a vocoder is for NeMo TTS pools only",
                    ".model.vocoder",
                ),
            ]
        }
    )

    engine: Literal["nemo", "whisper"]
    """nemo (NeMo .nemo models, GPU) or whisper (faster-whisper, CPU or GPU)."""

    @model_validator(mode="after")
    def _no_vocoder(self) -> AsrPoolSpec:
        if self.model.vocoder is not None:
            raise ValueError("model.vocoder: a vocoder is for NeMo TTS pools only")
        return self


class TtsPoolSpec(PoolSpec):
    """A text-to-speech worker pool."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.engine != 'piper' || !has(self.gpu) || self.gpu.count == 0",
                    "piper pools run on CPU: remove gpu",
                    ".gpu.count",
                ),
                cel(
                    "self.engine == 'nemo' || !has(self.model) || !has(self.model.vocoder)",
                    "a vocoder is for NeMo TTS pools only",
                    ".model.vocoder",
                ),
            ]
        }
    )

    engine: Literal["nemo", "piper"]
    """nemo (FastPitch + HiFi-GAN, GPU) or piper (ONNX voices, CPU)."""
    voices: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(None, max_length=256)
    """Voice ids this pool offers (listed by the API); the model's own voices when unset."""

    @model_validator(mode="after")
    def _piper_is_cpu(self) -> TtsPoolSpec:
        if self.engine == "piper" and self.gpu_count > 0:
            raise ValueError("gpu.count: piper pools run on CPU: remove gpu")
        if self.engine != "nemo" and self.model.vocoder is not None:
            raise ValueError("model.vocoder: a vocoder is for NeMo TTS pools only")
        return self


def _unique_pool_names(pools: list[Any]) -> list[Any]:
    seen: set[str] = set()
    for index, pool in enumerate(pools):
        if pool.name in seen:
            raise ValueError(f"[{index}].name: duplicate pool name {pool.name!r}")
        seen.add(pool.name)
    return pools


def _one_default(pools: list[Any]) -> list[Any]:
    if sum(1 for pool in pools if pool.default) > 1:
        raise ValueError("at most one pool may be the default")
    return pools


_ONE_DEFAULT_RULE = cel(
    "!has(self.pools) || self.pools.filter(p, has(p.default) && p.default).size() <= 1",
    "at most one pool may be the default",
    ".pools",
)


class AsrSpec(KubeModel):
    """Speech-to-text."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_ONE_DEFAULT_RULE]})

    pools: list[AsrPoolSpec] = Field(
        default_factory=list,
        max_length=MAX_POOLS,
        json_schema_extra={
            "default": [],
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    """ASR worker pools (names unique)."""

    _unique = field_validator("pools")(_unique_pool_names)
    _default = field_validator("pools")(_one_default)


class TtsSpec(KubeModel):
    """Text-to-speech."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_ONE_DEFAULT_RULE]})

    pools: list[TtsPoolSpec] = Field(
        default_factory=list,
        max_length=MAX_POOLS,
        json_schema_extra={
            "default": [],
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    """TTS worker pools (names unique)."""

    _unique = field_validator("pools")(_unique_pool_names)
    _default = field_validator("pools")(_one_default)


class ModelCacheSpec(KubeModel):
    """The PersistentVolumeClaim models are downloaded into (created only when a pool has model.source)."""

    storage_class: str | None = None
    """StorageClass of the cache; the cluster default when unset."""
    size: Quantity = "50Gi"
    """Size of the cache volume."""
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = "ReadWriteOnce"
    """ReadWriteMany lets pools on several nodes share the cache; ReadWriteOnce only works on one node."""
    env: list[EnvVar] | None = Field(None, max_length=32)
    """Extra environment variables for the model-fetch Jobs, e.g. HF_TOKEN, NGC_API_KEY or AWS credentials
    taken from a Secret with valueFrom.secretKeyRef."""


class ServiceMonitorSpec(KubeModel):
    """A Prometheus Operator ServiceMonitor for the stack's /metrics endpoints."""

    enabled: bool = False
    """Create the ServiceMonitor (only when its CRD exists in the cluster)."""
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$")
    """Scrape interval."""
    labels: dict[str, str] | None = None
    """Extra labels, e.g. the release label your Prometheus selects ServiceMonitors by."""


class MonitoringSpec(KubeModel):
    """Metrics scraping."""

    service_monitor: ServiceMonitorSpec = Field(default_factory=ServiceMonitorSpec)
    """Prometheus Operator ServiceMonitor."""


class NetworkPolicySpec(KubeModel):
    """NetworkPolicies: only the API server is reachable from outside the stack."""

    enabled: bool = True
    """Create the NetworkPolicies (they take effect only with a CNI that enforces them)."""


class PodDisruptionBudgetSpec(KubeModel):
    """PodDisruptionBudgets for the API server, the license proxy and each pool."""

    enabled: bool = True
    """Create the PodDisruptionBudgets."""
    max_unavailable: int = Field(1, ge=1, le=1000)
    """Pods of one component a voluntary disruption (e.g. a node drain) may take down at once."""


class ImagesSpec(KubeModel):
    """Where the stack's images come from."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.tag) || self.tag != 'latest'", "pin a version: latest is refused", ".tag")
            ]
        }
    )

    registry: str = Field(
        "ghcr.io/kubespeech", min_length=1, max_length=255, pattern=r"^[^\s:@]+(:[0-9]+)?(/[^\s:@]+)*$"
    )
    """Registry and path prefix of the kubespeech images (api-server, asr-worker, tts-worker, license-proxy)."""
    tag: str | None = Field(None, pattern=IMAGE_TAG_PATTERN, max_length=128)
    """Image tag; the operator's own version when unset (latest is refused)."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy."""
    pull_secrets: list[Annotated[str, Field(min_length=1, max_length=253)]] | None = Field(
        None, max_length=16
    )
    """Names of docker-registry Secrets used to pull the images."""

    @field_validator("tag")
    @classmethod
    def _not_latest(cls, value: str | None) -> str | None:
        if value == "latest":
            raise ValueError("pin a version: latest is refused")
        return value


class TaskCacheSpec(KubeModel):
    """Result caching of one task in Redis: repeated requests answered without reaching a worker."""

    enabled: bool = True
    """Answer a request identical to an earlier one (same model revision and parameters) from Redis."""
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024, le=1 << 40)
    """Bytes the cached values may take in Redis (at least 1 MiB); the least recently used are evicted first."""
    ttl_seconds: int = Field(7 * 86400, ge=1, le=365 * 86400)
    """How long an entry lives after it is stored."""


class AsrCacheSpec(TaskCacheSpec):
    """STT result caching: off by default (audio and transcripts may be sensitive); entries are encrypted
    with the key in encryptionKeySecretRef, or, without one, kept only in the embedded Redis."""

    enabled: bool = False
    """Answer a transcription of audio identical to an earlier one (same model revision and parameters) from Redis."""
    ttl_seconds: int = Field(86400, ge=1, le=365 * 86400)
    """How long an entry lives after it is stored."""
    encryption_key_secret_ref: SecretRef | None = None
    """Secret key holding 32 random bytes (e.g. `openssl rand -base64 32`) that encrypt every entry (AES-256-GCM); required with an external Redis."""


class CacheSpec(KubeModel):
    """Result caching in Redis, per task. TTS is on by default; STT is opt-in."""

    tts: TaskCacheSpec = Field(default_factory=TaskCacheSpec)
    """TTS: the encoded audio of repeated texts (prompts, greetings, confirmations)."""
    asr: AsrCacheSpec = Field(default_factory=AsrCacheSpec)
    """STT: transcripts of repeated audio (retried uploads)."""


class SecurityContextSpec(KubeModel):
    """Overrides of the pods' security context (non-root, no capabilities and RuntimeDefault seccomp always)."""

    run_as_user: int = Field(65532, ge=1, le=2147483647)
    """UID the containers run as (never root)."""
    run_as_group: int = Field(65532, ge=0, le=2147483647)
    """GID the containers run as."""
    fs_group: int = Field(65532, ge=0, le=2147483647)
    """Group owning mounted volumes (the model cache and Redis data)."""
    read_only_root_filesystem: bool = True
    """Mount the image read-only (/tmp is an emptyDir)."""


class SpeechDeploymentSpec(KubeModel):
    """Desired state of a speech stack: API server, worker pools, license proxy and Redis."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "(has(self.asr) && has(self.asr.pools) ? self.asr.pools.size() : 0)"
                    " + (has(self.tts) && has(self.tts.pools) ? self.tts.pools.size() : 0) > 0",
                    "define at least one pool in asr.pools or tts.pools",
                ),
                cel(
                    "!has(self.cache) || !has(self.cache.asr) || !has(self.cache.asr.enabled)"
                    " || !self.cache.asr.enabled || has(self.cache.asr.encryptionKeySecretRef)"
                    " || !has(self.redis) || !has(self.redis.mode) || self.redis.mode != 'external'",
                    "an STT cache on an external Redis needs cache.asr.encryptionKeySecretRef",
                    ".cache.asr.encryptionKeySecretRef",
                ),
            ]
        }
    )

    license: LicenseSpec
    """The license key (a Secret you create)."""
    api: ApiSpec
    """The API server."""
    license_proxy: LicenseProxySpec = Field(default_factory=LicenseProxySpec)
    """The license proxy."""
    redis: RedisSpec = Field(default_factory=RedisSpec)
    """Redis (embedded or external)."""
    asr: AsrSpec = Field(default_factory=AsrSpec)
    """Speech-to-text pools."""
    tts: TtsSpec = Field(default_factory=TtsSpec)
    """Text-to-speech pools."""
    model_cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec)
    """The volume downloaded models are kept on."""
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    """Metrics scraping."""
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    """Network isolation of the stack."""
    pod_disruption_budgets: PodDisruptionBudgetSpec = Field(default_factory=PodDisruptionBudgetSpec)
    """Protection against voluntary disruptions."""
    images: ImagesSpec = Field(default_factory=ImagesSpec)
    """Image registry, tag and pull settings."""
    security_context: SecurityContextSpec = Field(default_factory=SecurityContextSpec)
    """Pod security settings."""
    cache: CacheSpec = Field(default_factory=CacheSpec)
    """Result caching of repeated requests in Redis."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of every component."""

    @model_validator(mode="after")
    def _some_pool(self) -> SpeechDeploymentSpec:
        if not self.asr.pools and not self.tts.pools:
            raise ValueError("define at least one pool in asr.pools or tts.pools")
        return self

    @model_validator(mode="after")
    def _stt_cache_protected(self) -> SpeechDeploymentSpec:
        asr = self.cache.asr
        if asr.enabled and asr.encryption_key_secret_ref is None and self.redis.mode == "external":
            raise ValueError(
                "cache.asr.encryptionKeySecretRef: an STT cache on an external Redis needs an encryption key "
                "(transcripts are stored unencrypted only in the stack's own embedded Redis)"
            )
        return self

    def pools(self) -> Iterator[tuple[str, PoolSpec]]:
        """Every pool with its task ("asr" or "tts"), in spec order."""
        for asr_pool in self.asr.pools:
            yield "asr", asr_pool
        for tts_pool in self.tts.pools:
            yield "tts", tts_pool


# ---------------------------------------------------------------------------------------------------------
# Status (written by the operator; the CRD's status schema is generated from these models too).


class Condition(KubeModel):
    """A standard Kubernetes condition."""

    type: str = Field(max_length=316)
    """Ready (all good), Progressing (rolling out or scaling), Degraded (spec or runtime error), LicenseValid,
    ModelsReady (every model fetched), ASRReady, TTSReady."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str = Field(max_length=1024)
    """CamelCase machine-readable reason, e.g. SpecInvalid, PodsUnschedulable."""
    message: str = Field("", max_length=32768)
    """Human-readable detail an admin can act on."""
    last_transition_time: str
    """When the status last changed (RFC 3339)."""
    observed_generation: int | None = Field(None, ge=0)
    """The metadata.generation this condition was computed for."""


class PoolStatus(KubeModel):
    """Observed state of one pool."""

    name: str
    """Pool name."""
    task: Literal["asr", "tts"]
    """asr or tts."""
    model_name: str
    """Queue the pool serves."""
    replicas: int = 0
    """Pods that exist."""
    ready_replicas: int = 0
    """Pods that are ready."""
    desired_replicas: int = 0
    """Pods the operator or autoscaler wants."""
    queue_depth: int = 0
    """Jobs waiting in the pool's queue."""
    active_streams: int = 0
    """Live streaming sessions on the pool's queue."""
    in_flight: int | None = None
    """Jobs taken by a worker and not yet answered (autoscaled pools)."""
    state: Literal["ColdStarting"] | None = None
    """ColdStarting: work is queued and no worker of the model is ready yet (requests are held meanwhile)."""
    autoscaler_reason: str | None = None
    """The autoscaler's last decision for the pool, e.g. Steady, ScaleUp, WakeFromZero, MissingData."""
    last_scale_time: str | None = None
    """When the autoscaler last changed the pool's replicas (RFC 3339)."""
    last_scale_reason: str | None = None
    """Why it did, e.g. WakeFromZero, ScaleUp, ScaleDown, ScaleToZero, LicenseClamp."""
    last_cold_start_seconds: float | None = None
    """Seconds from the first queued job at zero replicas to the first ready worker, last time."""
    message: str | None = None
    """Why pods are not ready or cannot schedule, if so."""


class EndpointsStatus(KubeModel):
    """Where clients reach the stack."""

    api: str | None = None
    """In-cluster URL of the API server."""
    external: str | None = None
    """URL through the Ingress or LoadBalancer, when there is one."""


class SpeechDeploymentStatus(KubeModel):
    """Observed state of the speech stack (written by the operator)."""

    observed_generation: int | None = None
    """The metadata.generation last reconciled."""
    conditions: list[Condition] | None = Field(
        None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready, Progressing, Degraded, LicenseValid, ModelsReady, ASRReady, TTSReady."""
    asr_replicas: str | None = None
    """ASR pods ready/desired, e.g. 2/3 (a printer column)."""
    tts_replicas: str | None = None
    """TTS pods ready/desired, e.g. 1/1 (a printer column)."""
    queue_depth: int | None = None
    """Jobs waiting across all queues (a printer column)."""
    pools: list[PoolStatus] | None = None
    """Per-pool replicas, queue depth and scheduling problems."""
    endpoints: EndpointsStatus | None = None
    """Where clients reach the stack."""


# ---------------------------------------------------------------------------------------------------------
# Parsing.


def _loc_to_path(loc: tuple[int | str, ...], root: str) -> str:
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-", "model-", "function")) or part in {"int", "str"}:
            # Union members and validator names are not fields.
            continue
        else:
            path += f".{part}"
    return path


# Validators name a sub-field by starting their message with it ("gpu.count: ..."), since pydantic places
# model-validator errors on the model itself.
_SUBPATH_RE = re.compile(
    r"^((?:\[\d+\]\.)?[A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)*): (.+)$", re.DOTALL
)


def spec_error_from_validation(exc: ValidationError, root: str = "spec") -> SpecError:
    """The first error of a pydantic ValidationError as a SpecError naming the field path."""
    first = exc.errors(include_url=False)[0]
    path = _loc_to_path(tuple(first["loc"]), root)
    message = str(first["msg"]).removeprefix("Value error, ")
    sub = _SUBPATH_RE.match(message)
    if sub is not None:
        sep = "" if sub.group(1).startswith("[") else "."
        path, message = f"{path}{sep}{sub.group(1)}", sub.group(2)
    return SpecError(path, message)


def validate_name(name: str) -> None:
    """Refuse SpeechDeployment names that would make child names invalid (the CRD's CEL rule mirrored)."""
    if len(name) > MAX_NAME_LENGTH:
        raise SpecError(
            "metadata.name", f"must be at most {MAX_NAME_LENGTH} characters (children are named after it)"
        )
    if not re.match(DNS_LABEL_PATTERN, name):
        raise SpecError(
            "metadata.name", "must be a DNS label: lowercase letters, digits and '-', starting with a letter"
        )


def parse_spec(spec: dict[str, Any]) -> SpeechDeploymentSpec:
    """Parse and check a SpeechDeployment's spec; raise SpecError naming the first bad field."""
    try:
        parsed = SpeechDeploymentSpec.model_validate(spec)
    except ValidationError as exc:
        raise spec_error_from_validation(exc) from None
    _check_shared_queues(parsed)
    return parsed


def _check_shared_queues(spec: SpeechDeploymentSpec) -> None:
    """Rules across pools: a queue is served by one kind of engine and model, and belongs to one task."""
    first_pool: dict[str, tuple[str, int, PoolSpec]] = {}
    for task, pools in (("asr", spec.asr.pools), ("tts", spec.tts.pools)):
        for index, pool in enumerate(pools):
            path = f"spec.{task}.pools[{index}]"
            seen = first_pool.get(pool.queue_name)
            if seen is None:
                first_pool[pool.queue_name] = (task, index, pool)
                continue
            seen_task, seen_index, seen_pool = seen
            where = f"spec.{seen_task}.pools[{seen_index}] ({seen_pool.name})"
            if seen_task != task:
                raise SpecError(
                    f"{path}.modelName",
                    f"model name {pool.queue_name!r} is already an {seen_task} model in {where}",
                )
            if getattr(pool, "engine", None) != getattr(seen_pool, "engine", None):
                raise SpecError(
                    f"{path}.engine",
                    f"pools sharing model {pool.queue_name!r} must use one engine, see {where}",
                )
            if pool.model != seen_pool.model:
                raise SpecError(
                    f"{path}.model",
                    f"pools sharing model {pool.queue_name!r} must load the same model, see {where}",
                )
    names = {pool.queue_name for _, pool in spec.pools()}
    for task, pools in (("asr", spec.asr.pools), ("tts", spec.tts.pools)):
        for index, pool in enumerate(pools):
            for alias_index, alias in enumerate(pool.aliases or []):
                if alias in names and alias != pool.queue_name:
                    raise SpecError(
                        f"spec.{task}.pools[{index}].aliases[{alias_index}]",
                        f"{alias!r} is already a model name",
                    )

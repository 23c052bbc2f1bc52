"""A small layer over the Kubernetes API for the controller's cluster verbs.

Everything goes through the official `kubernetes` client: server-side apply
through the dynamic client (field manager `kubetrain`), typed clients for
pods, logs and events. API errors that a user can act on become UserError.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from trainer.controller.kinds import JOB_KINDS, JobKind
from trainer.errors import UserError


def plain_json(_client, data: dict) -> dict:
    """The dynamic client's response as the parsed JSON it is: its default wrapper (ResourceInstance,
    then .to_dict()) walks every field twice, ~1 s for 500 PyTorchJobs (benchmarks/control_plane.py)."""
    return data


FIELD_MANAGER = "kubetrain"
# What `kubetrain delete` removes: every kind the chart renders, selected by the experiment label.
EXPERIMENT_KINDS = [
    *(kind.api for kind in JOB_KINDS),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "Secret"),
    ("v1", "Pod"),  # the helm test pod; operator pods go with their PyTorchJob
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
]


def experiment_selector(name: str) -> str:
    return f"kubetrain.io/experiment={name},app.kubernetes.io/part-of=kubetrain"


def api_error_message(error) -> str:
    """The API server's own message (e.g. a CRD validation failure), not a dump of the response."""
    try:
        body = json.loads(error.body)
        return body.get("message") or str(error.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(error, "reason", error))


@dataclass
class Kube:
    """One connection: the API client, the namespace, and lazily built API groups."""

    api_client: object
    namespace: str

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None,
                namespace: str | None = None) -> "Kube":
        from kubernetes import config
        from kubernetes.config.config_exception import ConfigException

        try:
            api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        except (ConfigException, FileNotFoundError, TypeError) as e:
            where = kubeconfig or "KUBECONFIG / ~/.kube/config"
            raise UserError(f"cannot load a kubeconfig from {where}: {e}") from None
        if context:
            active = next((c for c in contexts if c["name"] == context), active)
        ns = namespace or (active or {}).get("context", {}).get("namespace") or "default"
        return cls(api_client, ns)

    @functools.cached_property
    def dynamic(self):
        from kubernetes.dynamic import DynamicClient

        return self._call(DynamicClient, self.api_client)

    @functools.cached_property
    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    def _call(self, fn, *args, **kwargs):
        """Call the API; connection problems and refusals become one clear line."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status in (401, 403):
                raise UserError(f"the API server refused: {api_error_message(e)}") from None
            raise
        except (HTTPError, OSError) as e:
            raise UserError(f"cannot reach the Kubernetes API server: {e}") from None

    def resource(self, api_version: str, kind: str):
        """The API resource for a kind, or None when the cluster does not serve it."""
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            return self._call(self.dynamic.resources.get, api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            return None

    # ------------------------------------------------------------ objects
    def apply(self, obj: dict, dry_run: bool = False) -> dict:
        """Server-side apply one object into our namespace; returns the object as stored."""
        from kubernetes.client.exceptions import ApiException

        api_version, kind = obj["apiVersion"], obj["kind"]
        resource = self.resource(api_version, kind)
        if resource is None:
            raise UserError(f"the cluster does not serve {kind} ({api_version}): install its CRD "
                            f"or disable it in the values")
        kwargs = {"dry_run": "All"} if dry_run else {}
        try:
            stored = self._call(
                self.dynamic.server_side_apply, resource, body=obj,
                namespace=self.namespace if resource.namespaced else None,
                field_manager=FIELD_MANAGER, force_conflicts=True, **kwargs,
            )
        except ApiException as e:
            raise UserError(f"{kind}/{obj['metadata']['name']} rejected by the API server: "
                            f"{api_error_message(e)}") from None
        return stored.to_dict()

    def get(self, api_version: str, kind: str, name: str) -> dict | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        resource = self.resource(api_version, kind)
        if resource is None:
            return None
        try:
            return self._call(resource.get, name=name, namespace=self.namespace, serializer=plain_json)
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, selector: str = "", all_namespaces: bool = False) -> dict:
        resource = self.resource(api_version, kind)
        if resource is None:
            return {"items": [], "metadata": {}}
        namespace = None if all_namespaces else self.namespace
        return self._call(resource.get, namespace=namespace, label_selector=selector, serializer=plain_json)

    def delete(self, api_version: str, kind: str, name: str) -> bool:
        from kubernetes.dynamic.exceptions import NotFoundError

        resource = self.resource(api_version, kind)
        if resource is None:
            return False
        try:
            self._call(resource.delete, name=name, namespace=self.namespace,
                       body={"propagationPolicy": "Background"})
            return True
        except NotFoundError:
            return False

    def watch(self, api_version: str, kind: str, name: str, resource_version: str, timeout: int):
        resource = self.resource(api_version, kind)
        return self.dynamic.watch(resource, namespace=self.namespace, field_selector=f"metadata.name={name}",
                                  resource_version=resource_version, timeout=timeout)

    # ------------------------------------------------------------ pods
    def pods(self, kind: JobKind, job_name: str) -> list:
        """The job's pods, master first, then by node index."""
        pods = self._call(self.core.list_namespaced_pod, self.namespace,
                          label_selector=kind.pod_selector(job_name)).items
        return sorted(pods, key=lambda p: (kind.node_index(p), str(p.metadata.creation_timestamp or "")))

    def pod_events(self, pod_name: str) -> list:
        events = self._call(self.core.list_namespaced_event, self.namespace,
                            field_selector=f"involvedObject.name={pod_name}").items
        return sorted(events, key=lambda e: str(e.last_timestamp or e.event_time or ""))

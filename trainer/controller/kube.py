"""A small client for the Kubernetes API, for the controller's cluster verbs.

JSON over HTTP/1.1 with the standard library (http.client, ssl), as kr8s and
client-go's REST layer do: objects stay the API's JSON, and discovery reads
only the group versions a verb touches. The official `kubernetes` package took
0.4-0.5 s to import and 0.12 s to load a kubeconfig, over the verbs' 0.5 s
start-up budget (benchmarks/cli_startup.py). Server-side apply (`submit
--dry-run`) uses field manager `kubetrain`; helm installs releases. Refusals a user can act on (401/403, a rejected object, an
unreachable server) become UserError; other API errors are ApiError.

`status --watch`, `submit --wait` and `logs --follow` run as long as a job, so every request
(streams included) goes through one path that keeps the client working:
- credentials that expire (an exec plugin's token, a rotated token file) are renewed before a
  request once stale, and once on a 401, after which that request is sent again;
- 429 (with its Retry-After), 502/503/504 and any 5xx with Retry-After, and a connection that
  drops, resets or is refused once the server has answered, are retried with exponential backoff
  and jitter for RETRY_SECONDS in all, then reported in one line naming the server and what it
  last said. Only a POST is not resent after a 5xx or a drop: it may have been processed (this
  client sends GET, DELETE and server-side apply, all idempotent). A server that never answered
  is reported at once: a wrong address is likelier than a blip.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import ssl
import tempfile
import threading
import time
from typing import Iterator
from urllib.parse import quote, urlencode, urlsplit

from trainer import __version__
from trainer.controller.kinds import JOB_KINDS, JobKind
from trainer.controller.kubeconfig import ClusterConfig, Credentials, load_cluster_config
from trainer.errors import UserError

FIELD_MANAGER = "kubetrain"
REQUEST_TIMEOUT_S = 60  # one request; watches and log streams set their own
RETRY_SECONDS = 60  # how long one request is retried while the server throttles, is unavailable or drops it
RETRY_STATUSES = (429, 502, 503, 504)  # and any 5xx that carries Retry-After
# A connection that the server (or a load balancer) closed, reset or refused: worth another try.
_DROPPED = (ConnectionError, TimeoutError, ssl.SSLEOFError, http.client.RemoteDisconnected,
            http.client.IncompleteRead, http.client.BadStatusLine)
# What `kubetrain delete` removes: every kind the chart renders, selected by the experiment label.
EXPERIMENT_KINDS = [
    *(kind.api for kind in JOB_KINDS),
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"),  # a TrainJob's own runtime (job.runtime empty)
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "Secret"),
    ("v1", "Pod"),  # the helm test pod; operator pods go with their PyTorchJob
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    # Last: the Role (rbac.create) may be what lets the user delete the rest.
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
]


def experiment_selector(name: str) -> str:
    return f"kubetrain.io/experiment={name},app.kubernetes.io/part-of=kubetrain"


class ApiError(Exception):
    """An API response with an error status; `message` is the server's own (e.g. a CRD validation)."""

    def __init__(self, status: int, message: str, reason: str = ""):
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status, self.message, self.reason = status, message, reason


class Forbidden(UserError):
    """403: the user may not read or write this; a check that is only a courtesy goes on without it."""


def _ssl_context(config: ClusterConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=config.ca_pem.decode() if config.ca_pem else None)
    if config.insecure:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    credentials = config.credentials
    if credentials.cert_pem and credentials.key_pem:
        # ssl loads a client certificate from files only: a private folder, removed at once.
        with tempfile.TemporaryDirectory(prefix="kubetrain-tls-") as folder:
            cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for path, data in ((cert, credentials.cert_pem), (key, credentials.key_pem)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    f.write(data)
            try:
                context.load_cert_chain(cert, key)
            except ssl.SSLError as e:
                raise UserError(f"kubeconfig client certificate or key is not usable: {e}") from None
    return context


class Kube:
    """One cluster and namespace: requests, discovery of the kinds used, and the verbs' operations."""

    def __init__(self, config: ClusterConfig):
        self.config, self.namespace = config, config.namespace
        url = urlsplit(config.server)
        self._https = url.scheme == "https"
        self._host, self._port, self._prefix = url.hostname, url.port, url.path.rstrip("/")
        self._context = _ssl_context(config) if self._https else None
        self._local = threading.local()  # one kept-alive connection per thread
        self._auth_lock, self._tls_generation = threading.Lock(), 0  # generation: bumped on a new client cert
        self._answered = False  # the server has answered once: from then on a refused connection is a blip
        self._served: dict[str, dict[str, tuple[str, bool]] | None] = {}  # group version -> kind -> resource

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None,
                namespace: str | None = None) -> "Kube":
        return cls(load_cluster_config(kubeconfig, context, namespace))

    # ------------------------------------------------------------ HTTP
    def _new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._https:
            return _TLSConnection(self._host, self._port, self.config.tls_server_name, timeout=timeout,
                                  context=self._context)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _credentials(self, renew: Credentials | None = None) -> Credentials:
        """The credentials to send, renewed first when stale, or when `renew` is the set a 401 refused
        (a set another thread already replaced is not renewed twice)."""
        with self._auth_lock:
            current = self.config.credentials
            if current.renew is not None and (current is renew or current.stale()):
                fresh = current.renew()
                self.config.credentials = fresh
                if (fresh.cert_pem, fresh.key_pem) != (current.cert_pem, current.key_pem) and self._https:
                    self._context, self._tls_generation = _ssl_context(self.config), self._tls_generation + 1
            return self.config.credentials

    def _headers(self, credentials: Credentials, content_type: str | None) -> dict:
        headers = {"Accept": "application/json", "User-Agent": f"kubetrain/{__version__}"}
        if credentials.token:
            headers["Authorization"] = f"Bearer {credentials.token}"
        elif credentials.basic:
            pair = ":".join(credentials.basic).encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _kept(self) -> http.client.HTTPConnection | None:
        kept = getattr(self._local, "connection", None)
        if kept is not None and getattr(self._local, "generation", 0) != self._tls_generation:
            kept.close()  # made with a client certificate that has since been renewed
            kept = self._local.connection = None
        return kept

    def _send(self, method: str, path: str, query: dict | None, body: dict | None, content_type: str | None,
              streaming: bool = False, timeout: float | None = REQUEST_TIMEOUT_S):
        """(response, connection, body) once the server gave an answer not worth retrying (see the
        module's docstring). A streaming request gets a connection of its own and its body unread
        (None); others reuse the thread's connection, and a body cut short is retried as a drop."""
        target = self._prefix + path + ("?" + urlencode(query) if query else "")
        payload = json.dumps(body).encode() if body is not None else None
        idempotent = method != "POST" or bool(query and query.get("dryRun"))
        deadline, tries, renewed = time.monotonic() + RETRY_SECONDS, 0, False
        while True:
            credentials = self._credentials()
            headers = self._headers(credentials, content_type if payload is not None else None)
            kept = None if streaming else self._kept()
            connection = kept or self._new_connection(timeout)
            try:
                connection.request(method, target, body=payload, headers=headers)
                response = connection.getresponse()
                data = None if streaming else response.read()
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                self._local.connection = None
                if kept is not None and isinstance(e, http.client.RemoteDisconnected if not idempotent
                                                   else (http.client.RemoteDisconnected, ConnectionError)):
                    continue  # the server closed a kept-alive connection: at once on a new one
                resendable = idempotent or isinstance(e, ConnectionRefusedError)  # refused: never sent
                if not (self._answered and resendable and isinstance(e, _DROPPED)):
                    raise UserError(f"cannot reach the Kubernetes API server at {self.config.server}: {e}") from None
                delay, last = None, f"cannot reach the Kubernetes API server at {self.config.server}: {e}"
            else:
                self._answered = True
                retry_after = response.getheader("Retry-After")
                status = response.status
                retry = status == 429 or idempotent and (status in RETRY_STATUSES or status >= 500 and retry_after)
                renew = status == 401 and not renewed and credentials.renew is not None
                if streaming and (retry or renew):
                    data = response.read()
                    connection.close()
                elif not streaming:
                    self._local.connection, self._local.generation = connection, self._tls_generation
                if renew:  # e.g. a token revoked or expired early: renew once, send again
                    renewed = True
                    self._credentials(renew=credentials)
                    continue
                if not retry:
                    return response, connection, data
                last = (f"the Kubernetes API server at {self.config.server} still answered "
                        f"{status} {_message(response.reason, data)}")
                delay = float(retry_after) if (retry_after or "").isdigit() else None
            # Exponential backoff with jitter (0.25 s doubling up to 8 s), or the delay the server asked for.
            delay = delay if delay is not None else min(8.0, 0.25 * 2 ** tries) * random.uniform(0.5, 1.0)
            tries += 1
            if time.monotonic() + delay > deadline:
                raise UserError(f"{last} after {tries} tries in {RETRY_SECONDS}s") from None
            time.sleep(delay)

    def request(self, method: str, path: str, query: dict | None = None, body: dict | None = None,
                content_type: str = "application/json") -> dict:
        response, _, data = self._send(method, path, query, body, content_type)
        _raise_for_status(response, data)
        return json.loads(data) if data else {}

    def stream(self, path: str, query: dict, timeout: float | None) -> http.client.HTTPResponse:
        """A long GET (watch, log follow) on its own connection; the caller reads and closes it."""
        response, connection, _ = self._send("GET", path, query, None, None, streaming=True, timeout=timeout)
        if response.status >= 400:
            data = response.read()
            connection.close()
            _raise_for_status(response, data)
        return response

    # ------------------------------------------------------------ discovery
    def resource(self, api_version: str, kind: str) -> tuple[str, bool] | None:
        """(plural, namespaced) for a kind, or None when the cluster does not serve it."""
        if api_version not in self._served:
            try:
                doc = self.request("GET", _group_path(api_version))
            except ApiError as e:
                if e.status != 404:
                    raise
                doc = None
            self._served[api_version] = None if doc is None else {
                r["kind"]: (r["name"], bool(r.get("namespaced"))) for r in doc.get("resources", [])
                if "/" not in r["name"]}
        served = self._served[api_version]
        return served.get(kind) if served else None

    def _path(self, api_version: str, kind: str, name: str = "", namespace: str | None = "") -> str | None:
        found = self.resource(api_version, kind)
        if found is None:
            return None
        plural, namespaced = found
        path = _group_path(api_version)
        if namespaced and namespace is not None:
            path += f"/namespaces/{quote(namespace or self.namespace, safe='')}"
        return path + f"/{plural}" + (f"/{quote(name, safe='')}" if name else "")

    # ------------------------------------------------------------ objects
    def apply(self, obj: dict, dry_run: bool = False) -> dict:
        """Server-side apply one object into our namespace; returns the object as stored."""
        api_version, kind, name = obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
        path = self._path(api_version, kind, name)
        if path is None:
            raise UserError(f"the cluster does not serve {kind} ({api_version}): install its CRD "
                            f"or disable it in the values")
        query = {"fieldManager": FIELD_MANAGER, "force": "true", **({"dryRun": "All"} if dry_run else {})}
        try:
            return self.request("PATCH", path, query, obj, content_type="application/apply-patch+yaml")
        except ApiError as e:
            raise UserError(f"{kind}/{name} rejected by the API server: {e.message}") from None

    def dry_run_create(self, obj: dict) -> tuple[int, str]:
        """POST obj with dryRun=All and strict field validation, into our namespace: (status, the server's
        message); 2xx means it would be created. Admission runs, nothing is stored."""
        path = self._path(obj["apiVersion"], obj["kind"])
        query = {"dryRun": "All", "fieldValidation": "Strict", "fieldManager": FIELD_MANAGER}
        response, _, data = self._send("POST", path, query, obj, "application/json")
        return response.status, "" if response.status < 400 else _message(response.reason, data)

    def get(self, api_version: str, kind: str, name: str) -> dict | None:
        path = self._path(api_version, kind, name)
        if path is None:
            return None
        try:
            return self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, selector: str = "", all_namespaces: bool = False,
             field_selector: str = "") -> dict:
        path = self._path(api_version, kind, namespace=None if all_namespaces else "")
        if path is None:
            return {"items": [], "metadata": {}}
        query = {k: v for k, v in (("labelSelector", selector), ("fieldSelector", field_selector)) if v}
        return self.request("GET", path, query)

    def delete(self, api_version: str, kind: str, name: str) -> bool:
        path = self._path(api_version, kind, name)
        if path is None:
            return False
        try:
            self.request("DELETE", path, {"propagationPolicy": "Background"})
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def watch(self, api_version: str, kind: str, name: str, resource_version: str, timeout: int) -> Iterator[dict]:
        """The watch events ({"type", "object"}) of one object from `resource_version`, for `timeout` s."""
        path = self._path(api_version, kind)
        query = {"watch": "true", "fieldSelector": f"metadata.name={name}", "resourceVersion": resource_version,
                 "timeoutSeconds": str(timeout)}
        response = self.stream(path, query, timeout=timeout + 30)
        try:
            for line in response:
                if not line.endswith(b"\n"):
                    break  # cut mid-event: the stream dropped
                if line.strip():
                    yield json.loads(line)
        except _DROPPED:
            pass  # a dropped watch just ends early: the caller watches again from the last resourceVersion
        finally:
            response.close()

    # ------------------------------------------------------------ pods
    def pods(self, kind: JobKind, job_name: str) -> list[dict]:
        """The job's pods, master first, then by node index."""
        pods = self.list("v1", "Pod", selector=kind.pod_selector(job_name))["items"]
        return sorted(pods, key=lambda p: (kind.node_index(p), str(p["metadata"].get("creationTimestamp") or "")))

    def pod(self, name: str) -> dict | None:
        return self.get("v1", "Pod", name)

    def pod_events(self, pod_name: str) -> list[dict]:
        events = self.list("v1", "Event", field_selector=f"involvedObject.name={pod_name}")["items"]
        return sorted(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))

    def pod_log(self, pod_name: str, container: str, follow: bool = False, previous: bool = False) -> Iterator[bytes]:
        """A container's log as it arrives (chunks end anywhere); with `follow`, until the container ends."""
        path = f"/api/v1/namespaces/{quote(self.namespace, safe='')}/pods/{quote(pod_name, safe='')}/log"
        query = {"container": container, **({"follow": "true"} if follow else {}),
                 **({"previous": "true"} if previous else {})}
        response = self.stream(path, query, timeout=None if follow else REQUEST_TIMEOUT_S)
        try:
            while chunk := response.read1(65536):
                yield chunk
        except _DROPPED:
            pass  # a dropped stream ends like a finished one; the caller looks at the pod again
        finally:
            response.close()


def _group_path(api_version: str) -> str:
    """Where a group version is served: the core group under /api, the others under /apis."""
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS that checks the certificate against kubeconfig's tls-server-name when it has one."""

    def __init__(self, host: str, port: int | None, server_name: str, **kwargs):
        super().__init__(host, port, **kwargs)
        self._server_name = server_name or host

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


def _message(default: str, data: bytes) -> str:
    """The message of an API Status body, else the body's text, else `default` (the HTTP reason)."""
    try:
        return str(json.loads(data).get("message") or default)
    except (ValueError, AttributeError):
        return data.decode("utf-8", errors="replace").strip()[:200] or default


def _raise_for_status(response: http.client.HTTPResponse, data: bytes) -> None:
    if response.status < 400:
        return
    message = _message(response.reason, data)
    try:
        reason = str(json.loads(data).get("reason") or "")
    except (ValueError, AttributeError):
        reason = ""
    if response.status in (401, 403):
        raise (Forbidden if response.status == 403 else UserError)(f"the API server refused: {message}")
    raise ApiError(response.status, message, reason)

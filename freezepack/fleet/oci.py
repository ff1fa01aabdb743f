"""OCI registry back end (CNCF Distribution, Harbor, ECR, GHCR, ...) through oras-py.

One registry repository holds one fleet repository:

* every model piece is a blob (``sha256:<hex>``); the registry de-duplicates them across releases, so pushing a
  fine-tuned release uploads only the changed tensors;
* each release is an OCI artifact: a manifest tagged ``<model>-r<release>`` whose config blob is the release
  layout (media type ``CONFIG_MEDIA_TYPE``) and whose layers are the pieces in file order (``PIECE_MEDIA_TYPE``,
  the header piece ``HEADER_MEDIA_TYPE``). It keeps the blobs referenced (registry garbage collection) and lets
  ``oras pull`` fetch a release by hand;
* each TUF metadata file is a one-layer artifact tagged with its file name (``timestamp.json``, ``3.targets.json``).

The registry is never trusted: TUF checks the metadata, and every blob is checked against its digest here, because
oras-py does not verify what it pulls.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

from ..errors import FleetError
from . import safejson
from .names import check_digest, check_meta_name
from .net import DEFAULT_LIMITS, NetLimits, guard_session, transfer
from .store import Store

ARTIFACT_TYPE = "application/vnd.freezepack.model.v1"
CONFIG_MEDIA_TYPE = "application/vnd.freezepack.model.config.v1+json"
PIECE_MEDIA_TYPE = "application/vnd.freezepack.model.piece.v1"
HEADER_MEDIA_TYPE = "application/vnd.freezepack.model.header.v1"
TUF_CONFIG_MEDIA_TYPE = "application/vnd.freezepack.tuf.config.v1+json"
TUF_MEDIA_TYPE = "application/vnd.freezepack.tuf.metadata.v1+json"
_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
_CHUNK = 1 << 16


class OciStore(Store):
    """``oci://registry[:port]/namespace/repo`` (https) or ``oci+http://...`` (plain HTTP, e.g. loopback)."""

    def __init__(self, url: str, limits: NetLimits = DEFAULT_LIMITS):
        try:
            import oras.provider
        except ImportError:
            raise FleetError("OCI repositories need the 'fleet' extra (pip install 'freezepack[fleet]')",
                             path=url) from None
        scheme, _, rest = url.partition("://")
        insecure = scheme == "oci+http"
        host, _, repo = rest.strip("/").partition("/")
        if not host or not repo:
            raise FleetError("expected oci://host[:port]/repository", path=url)
        self.location = url
        self.limits = limits
        self.host, self.repo = host, repo
        self.registry = oras.provider.Registry(hostname=host, insecure=insecure)
        guard_session(self.registry.session, limits)     # timeouts, minimum rate, byte caps (token requests too)
        self._prefix = "http" if insecure else "https"
        self._container = self.registry.get_container(f"{host}/{repo}")

    # -- low level -------------------------------------------------------------------------------------------
    def _request(self, method: str, url: str, *, cap: int | None = 1 << 20, **kw):
        """One registry request under the store's limits; ``cap`` bounds the bytes of every response it
        reads (a streamed body is capped again by its reader)."""
        # oras-py retries a failed connection 5 times over ~2 minutes; a device should hear at once that the
        # registry is down (it retries on its next update cycle), so call the undecorated request.
        do_request = getattr(type(self.registry).do_request, "__wrapped__", None)
        with transfer(self.limits, cap, where=self.location, errors=self._errors()):
            if do_request is None:
                return self.registry.do_request(url, method, **kw)
            return do_request(self.registry, url, method, **kw)

    def _stream(self, url: str, max_length: int, what: str):
        """Yield a GET body in chunks, at most ``max_length`` bytes; FleetError on 404 or another status."""
        with transfer(self.limits, max_length, where=self.location, errors=self._errors()):
            do_request = getattr(type(self.registry).do_request, "__wrapped__", None)
            r = (do_request(self.registry, url, "GET", stream=True) if do_request is not None
                 else self.registry.do_request(url, "GET", stream=True))
            try:
                if r.status_code == 404:
                    raise FleetError(f"registry has no {what}", path=self.location)
                if r.status_code != 200:
                    raise FleetError(f"registry answered HTTP {r.status_code} for {what}", path=self.location)
                n = 0
                for chunk in r.iter_content(_CHUNK):
                    n += len(chunk)
                    yield chunk
                    if n >= max_length:
                        return
            finally:
                r.close()

    def _manifest(self, tag: str):
        url = f"{self._prefix}://{self._container.manifest_url(tag)}"
        lim = safejson.MANIFEST_LIMITS
        r = self._request("GET", url, headers={"Accept": _MANIFEST_TYPE}, stream=True, cap=lim.max_bytes)
        try:
            if r.status_code == 404:
                return None
            if r.status_code != 200:
                raise FleetError(f"registry answered HTTP {r.status_code} for manifest {tag!r}",
                                 path=self.location)
            buf = bytearray()
            with transfer(self.limits, lim.max_bytes, where=self.location, errors=self._errors()):
                for chunk in r.iter_content(_CHUNK):
                    buf += chunk
                    if len(buf) > lim.max_bytes:
                        raise FleetError(f"manifest {tag!r} is larger than {lim.max_bytes} bytes",
                                         path=self.location)
        finally:
            r.close()
        m = safejson.loads(bytes(buf), lim, what=f"manifest {tag!r}", path=self.location)
        if not isinstance(m, dict):
            raise FleetError(f"manifest {tag!r} is not a JSON object", path=self.location)
        return m

    @staticmethod
    def _errors():
        import requests

        return (requests.exceptions.RequestException, ValueError, OSError)

    def _upload(self, data: bytes, media_type: str) -> dict:
        sha = hashlib.sha256(data).hexdigest()
        layer = {"mediaType": media_type, "digest": f"sha256:{sha}", "size": len(data)}
        fd, tmp = tempfile.mkstemp(prefix="fpk-oci-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            with transfer(self.limits, 1 << 20, where=self.location, errors=self._errors()):
                r = self.registry.upload_blob(tmp, self._container, layer)  # skips blobs the registry has
        finally:
            os.unlink(tmp)
        if r.status_code not in (200, 201, 202):
            raise FleetError(f"blob upload refused: HTTP {r.status_code} {r.text[:200]}", path=self.location)
        return layer

    def _put_manifest(self, tag: str, config: dict, layers: list, annotations: dict, artifact_type: str):
        manifest = {"schemaVersion": 2, "mediaType": _MANIFEST_TYPE, "artifactType": artifact_type,
                    "config": config, "layers": layers, "annotations": annotations}
        url = f"{self._prefix}://{self._container.manifest_url(tag)}"
        r = self._request("PUT", url, headers={"Content-Type": _MANIFEST_TYPE},
                          data=json.dumps(manifest).encode())
        if r.status_code not in (200, 201):
            raise FleetError(f"manifest {tag!r} refused: HTTP {r.status_code} {r.text[:300]}", path=self.location)

    # -- Store interface ---------------------------------------------------------------------------------------
    def get_metadata(self, name, max_length):
        manifest = self._manifest(check_meta_name(name))
        if manifest is None:
            return None
        layers = manifest.get("layers")
        layer = layers[0] if isinstance(layers, list) and len(layers) == 1 else None
        digest = layer.get("digest") if isinstance(layer, dict) else None
        size = layer.get("size") if isinstance(layer, dict) else None
        if (not isinstance(digest, str) or not digest.startswith("sha256:") or not isinstance(size, int)
                or isinstance(size, bool) or size < 0):
            raise FleetError(f"metadata artifact {name!r} is malformed (expected one layer with a sha256 digest "
                             f"and a size)", path=self.location)
        if size > max_length:
            raise FleetError(f"metadata {name!r} is larger than {max_length} bytes", path=self.location)
        return self.get_blob(check_digest(digest[len("sha256:"):]), size)

    def put_metadata(self, name, data):
        config = self._upload(b"{}", TUF_CONFIG_MEDIA_TYPE)
        layer = self._upload(data, TUF_MEDIA_TYPE)
        layer["annotations"] = {"org.opencontainers.image.title": name}
        self._put_manifest(check_meta_name(name), config, [layer], {}, TUF_MEDIA_TYPE)

    def has_blob(self, sha256):
        r = self._request("HEAD", f"{self._prefix}://{self._container.get_blob_url('sha256:' + check_digest(sha256))}")
        return r.status_code == 200

    def put_blob(self, data, *, media_type=PIECE_MEDIA_TYPE):
        return self._upload(data, media_type or PIECE_MEDIA_TYPE)["digest"].removeprefix("sha256:")

    def _blob_chunks(self, sha256, max_length):
        url = f"{self._prefix}://{self._container.get_blob_url('sha256:' + sha256)}"
        return self._stream(url, max_length, f"blob sha256:{sha256}")

    def publish_release(self, name, release, layout, config):
        cfg = self._upload(json.dumps(config, sort_keys=True).encode(), CONFIG_MEDIA_TYPE)
        layers = []
        for sha, length, label in layout:
            media = HEADER_MEDIA_TYPE if label == "__header__" else PIECE_MEDIA_TYPE
            layers.append({"mediaType": media, "digest": f"sha256:{sha}", "size": length,
                           "annotations": {"org.freezepack.tensor": label}})
        self._put_manifest(f"{name}-r{release}", cfg, layers,
                           {"org.opencontainers.image.title": f"{name}.fpk",
                            "org.freezepack.release": str(release)}, ARTIFACT_TYPE)

    def close(self):
        self.registry.session.close()


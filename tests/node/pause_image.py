"""Write the pod sandbox ("pause") image as an OCI image archive that `ctr images import` reads.

No registry is reachable here, so the image is made from the pause binary that
build-node-assets.sh compiles from k8s.io/kubernetes's build/pause/linux/pause.c:
one layer holding /pause, ENTRYPOINT ["/pause"], user 65535 as upstream's image has.

    python3 pause_image.py PAUSE_BINARY OUT.tar IMAGE_REF
"""

import gzip
import hashlib
import io
import json
import sys
import tarfile


def _blob(tar: tarfile.TarFile, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layer(binary: bytes) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as layer:
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime = len(binary), 0o755, 0
        layer.addfile(info, io.BytesIO(binary))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    return gzip.compress(raw.getvalue(), mtime=0), diff_id


def main(binary_path: str, out: str, ref: str) -> None:
    layer, diff_id = _layer(open(binary_path, "rb").read())
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }).encode()
    with tarfile.open(out, "w") as tar:
        layer_desc = _blob(tar, layer)
        config_desc = _blob(tar, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer_desc}],
        }).encode()
        manifest_desc = _blob(tar, manifest)
        index = json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_desc,
            "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref.split(":")[-1]},
        }]}).encode()
        for name, data in (("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main(*sys.argv[1:4])

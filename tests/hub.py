"""A local stand-in for the Hugging Face hub: the tests and the demo never reach the internet.

It answers HEAD and GET on /<repo>/resolve/<revision>/<file> as the hub does (ETag, X-Repo-Commit,
Content-Length; 404 with X-Error-Code EntryNotFound for a file the repository lacks) and counts the downloads
(GETs) per file. Point huggingface_hub at it with HF_ENDPOINT=<server.url>."""
from __future__ import annotations

import hashlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    def __init__(self, files: dict[str, bytes]):
        """`files`: "<repo>/<file>" (e.g. "timm/test_resnet.r160_in1k/model.safetensors") -> its bytes."""
        self.files, self.downloads = files, Counter()
        self.revisions: set[str] = set()  # the revisions asked for, as the URLs name them
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _find(self) -> tuple[str, bytes] | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if "resolve" not in parts:
                    return None
                at = parts.index("resolve")
                key = "/".join(parts[:at] + parts[at + 2:])  # repo / file, the revision dropped
                hub.revisions.add(parts[at + 1])
                return (key, hub.files[key]) if key in hub.files else None

            def _head(self, found: tuple[str, bytes] | None) -> None:
                if found is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Error-Message", "Entry not found")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", '"' + hashlib.sha256(found[1]).hexdigest() + '"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(found[1])))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()

            def do_HEAD(self) -> None:
                self._head(self._find())

            def do_GET(self) -> None:
                found = self._find()
                self._head(found)
                if found is not None:
                    hub.downloads[found[0]] += 1
                    self.wfile.write(found[1])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def timm_weights(name: str, path: Path) -> bytes:
    """A timm model's own state dict (random init, seeded) as safetensors bytes: what the hub would serve."""
    import timm
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.read_bytes()


PUBLISHED = "someone/digits-teacher"  # a model published on the hub as timm publishes one


def published(folder: Path) -> Path:
    """A model as a user publishes it (timm's save_for_hf: config.json and model.safetensors): test_resnet with a
    two-class head, seeded."""
    import timm
    import torch
    torch.manual_seed(1)
    timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=2), str(folder), safe_serialization=True)
    return folder

"""Pretrained weights as timm gets them: from the Hugging Face hub (or timm's URL) when they are not cached, once.

`pretrained: true` takes timm's weights for the model: from the hub cache where an earlier download left them
(HF_HOME / HF_HUB_CACHE, or torch's hub folder for weights timm fetches by URL), else downloaded there, as
`timm.create_model(name, pretrained=True)` would, through huggingface_hub (which honours HF_ENDPOINT, HF_HOME,
HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE) with its progress bar. The download happens on the driver, when the
models are checked, before any image is decoded. Ray workers never download: the driver hands them the file's
bytes (`shipped`, through Ray's object store) and they `provide` it, so a worker without the hub, or with a cache
of its own, loads the very file the driver checked.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from urllib.parse import urlparse

from kd.errors import UserError

log = logging.getLogger("kd")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes on the hub, preferred first
_PROVIDED: dict[str, str] = {}  # model name -> the file the driver handed this process (provide)


def pretrained_file(name: str, role: str = "", download: bool = True) -> str:
    """The local file holding timm's pretrained weights for `name`: handed over by the driver, cached, or (with
    `download`) downloaded into the cache first."""
    import timm

    if name in _PROVIDED and os.path.isfile(_PROVIDED[name]):
        return _PROVIDED[name]
    key = f"{role}.pretrained" if role else "pretrained"
    pcfg = timm.models.get_pretrained_cfg(name)
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url):
        raise UserError(f"{key}: timm has no pretrained weights for '{name}'; set it to false or to a weights file")
    found, looked = _cached(pcfg)
    if found:
        return found
    if not download:
        raise UserError(f"{key}: timm's weights for '{name}' are not on this machine (looked in {looked}) and "
                        "none were handed over by the driver (the command that runs here fetches them first: "
                        "kd.models.fetch_pretrained)")
    return _download(pcfg, name, key, looked)


def _cached(pcfg: object) -> tuple[str | None, str]:
    """The cached file, or None and where it looked."""
    import torch
    from huggingface_hub import constants, try_to_load_from_cache

    looked = []
    hub_id, hub_file, url = (getattr(pcfg, k, None) for k in ("hf_hub_id", "hf_hub_filename", "url"))
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        for filename in ([hub_file] if hub_file else HUB_FILES):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found, ""
        looked.append(f"the Hugging Face hub cache {constants.HF_HUB_CACHE} (repository {repo})")
    if url:
        path = _url_path(url, torch.hub.get_dir())
        if os.path.isfile(path):
            return path, ""
        looked.append(path)
    return None, " and ".join(looked)


def _url_path(url: str | tuple[str, str], hub_dir: str) -> str:
    # timm's url is a URL, or a (URL, file name) pair that names the cached file itself
    filename = url[1] if isinstance(url, tuple) else os.path.basename(urlparse(url).path)
    return os.path.join(hub_dir, "checkpoints", filename)


def _download(pcfg: object, name: str, key: str, looked: str) -> str:
    import torch
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    hub_id, hub_file, url = (getattr(pcfg, k, None) for k in ("hf_hub_id", "hf_hub_filename", "url"))
    ways_out = (f"fill the cache where there is network (python -c \"import timm; timm.create_model('{name}', "
                f"pretrained=True)\") and copy it here (HF_HOME), or set {key} to a local weights file")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{key} is true but timm's weights for '{name}' are not cached (looked in {looked}) and "
                        f"HF_HUB_OFFLINE is set: {ways_out}")
    try:
        if hub_id:
            repo, _, revision = hub_id.partition("@")
            files = [hub_file] if hub_file else list(HUB_FILES)
            for filename in files:
                log.info("downloading timm's weights for '%s' (%s, %s) from %s", name, repo, filename,
                         constants.ENDPOINT)
                try:
                    return hf_hub_download(repo, filename, revision=revision or None)
                except RemoteEntryNotFoundError:  # the repository lacks this file: timm's next choice
                    if filename == files[-1]:
                        raise
        assert url
        path = _url_path(url, torch.hub.get_dir())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        log.info("downloading timm's weights for '%s' from %s", name, url[0] if isinstance(url, tuple) else url)
        torch.hub.download_url_to_file(url[0] if isinstance(url, tuple) else url, path, progress=True)
        return path
    except Exception as e:  # whatever the HTTP stack raises (httpx, the hub's errors, OSError): one message
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        where = f"{constants.ENDPOINT} ({hub_id})" if hub_id else str(url)
        raise UserError(f"{key}: could not download timm's weights for '{name}' from {where}: {first}; "
                        f"{ways_out}") from None


def shipped(names: list[str]) -> dict[str, tuple[str, bytes]]:
    """What the driver hands the workers: each model's weights file, by name, as (file name, bytes)."""
    out = {}
    for name in dict.fromkeys(names):
        path = pretrained_file(name)
        with open(path, "rb") as f:
            out[name] = (os.path.basename(path), f.read())
    return out


def provide(files: dict[str, tuple[str, bytes]] | None) -> None:
    """Make the driver's weights files this process's own (written once per machine, by content)."""
    for name, (filename, data) in (files or {}).items():
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(tempfile.gettempdir(), f"kd-weights-{os.getuid()}", digest[:16], filename)
        if not os.path.isfile(path) or _digest(path) != digest:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        _PROVIDED[name] = path


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

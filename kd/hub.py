"""Pretrained weights as timm gets them: from the Hugging Face hub (or timm's URL) when they are not cached, once.

`pretrained: true` takes timm's weights for the model: from the hub cache where an earlier download left them
(HF_HOME / HF_HUB_CACHE, or torch's hub folder for weights timm fetches by URL), else downloaded there, as
`timm.create_model(name, pretrained=True)` would, through huggingface_hub (which honours HF_ENDPOINT, HF_HOME,
HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE) with its progress bar. The download happens on the driver, when the
models are checked, before any image is decoded. Ray workers never download: the driver hands them the file's
bytes (`shipped`, through Ray's object store) and they `provide` it, so a worker without the hub, or with a cache
of its own, loads the very file the driver checked.

A model may also be named as timm names a model outside its registry (`source_of`): `hf-hub:owner/repo` (a model
published on the hub, its config.json and weights; `@revision` pins a branch, tag or commit) or `local-dir:PATH` (a
folder holding them, such as a kd-search export). `source_folder` gives the local folder that holds both (the
folder itself, the hub's cache snapshot, downloaded there once), and the workers get both files; with `pretrained:
false` only its config.json is fetched, shipped and fingerprinted, as timm itself reads only that to build the
architecture. `provenance` says which weights a model started from: the hub repository and the commit they came
from, and their sha256.
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
CONFIG_FILE = "config.json"  # beside them: the architecture, its arguments and its pretrained config
SOURCES = ("hf-hub", "local-dir")
_PROVIDED: dict[str, str] = {}  # model name -> the file the driver handed this process last (provide)
Files = dict[str, list[tuple[str, bytes]]]  # model name -> its files (name, bytes), any weights last (shipped)


def source_of(name: str, key: str = "name") -> str | None:
    """'hf-hub' or 'local-dir' for a name in timm's source syntax (`hf-hub:owner/repo[@revision]`,
    `local-dir:PATH`), None for a name in timm's registry; a name that is neither (an unknown prefix, a path or
    repository without one) is refused, naming `key`."""
    from timm.models import parse_model_name

    try:
        source, _ = parse_model_name(name)
    except ValueError as e:
        raise UserError(f"{key}: {e}") from None
    return source


def source_folder(name: str, role: str = "", download: bool = True, weights: bool = True) -> str:
    """The local folder holding config.json and (with `weights`) the weights of a model named by its source: handed
    over by the driver, the `local-dir:` folder itself, or the hub cache's snapshot of the repository at its
    revision (with `download`, downloaded there first where not cached: the weights only with `weights`)."""
    key = f"{role}.name" if role else "name"
    if name in _PROVIDED and os.path.isfile(_PROVIDED[name]):
        return os.path.dirname(_PROVIDED[name])
    ident = name.partition(":")[2]
    if source_of(name, key) == "local-dir":
        folder = os.path.abspath(os.path.expanduser(ident))
        if not os.path.isfile(os.path.join(folder, CONFIG_FILE)) or (weights and not _weights_in(folder)):
            needs = f"{CONFIG_FILE} and {' or '.join(HUB_FILES)}" if weights else CONFIG_FILE
            raise UserError(f"{key}: {name} is not a timm model folder (it needs {needs}, as a kd-search export or "
                            "timm's save_for_hf writes them)")
        return folder
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, _, revision = ident.partition("@")
    config = try_to_load_from_cache(repo, CONFIG_FILE, revision=revision or None)
    if isinstance(config, str) and os.path.isfile(config) and (not weights or _weights_in(os.path.dirname(config))):
        return os.path.dirname(config)
    ways_out = "fetch it where there is network and copy the hub cache here (HF_HOME), or name a local-dir: folder"
    if not download:
        raise UserError(f"{key}: {name} is not on this machine (the hub cache {constants.HF_HUB_CACHE}) and was not "
                        "handed over by the driver (the command that runs here fetches it first)")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{key}: {name} is not in the hub cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is "
                        f"set: {ways_out}")
    try:
        log.info("downloading %s (%s, %s) from %s", name, repo, CONFIG_FILE, constants.ENDPOINT)
        folder = os.path.dirname(hf_hub_download(repo, CONFIG_FILE, revision=revision or None))
        if weights:  # the cache's snapshots/<commit>/: the weights of that very commit
            _first_file(repo, list(HUB_FILES), os.path.basename(folder), name)
        return folder
    except Exception as e:  # whatever the HTTP stack raises (httpx, the hub's errors, OSError): one message
        raise UserError(f"{key}: could not download {name} from {constants.ENDPOINT}: {_first_line(e)}; "
                        f"{ways_out}") from None


def _first_file(repo: str, files: list[str], revision: str | None, name: str) -> str:
    """The first of `files` the hub repository has at `revision`, downloaded into the hub cache (its path)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for filename in files:
        log.info("downloading %s (%s, %s) from %s", name, repo, filename, constants.ENDPOINT)
        try:
            return hf_hub_download(repo, filename, revision=revision)
        except RemoteEntryNotFoundError:  # the repository lacks this file: the next choice
            if filename == files[-1]:
                raise
    raise ValueError("no file to download")


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _weights_in(folder: str) -> str | None:
    return next((os.path.join(folder, f) for f in HUB_FILES if os.path.isfile(os.path.join(folder, f))), None)


def source_fingerprint(name: str, role: str = "", weights: bool = True) -> str:
    """What a model named by its source is, by content: the sha256 of its config.json and (with `weights`: where its
    weights are loaded) of its weights file. A cache keyed by it (a fine-tuned teacher, a student's measured cost) is
    not fooled by a folder exported again in place, a relative path from elsewhere, or a hub branch that has moved."""
    folder = source_folder(name, role, download=False, weights=weights)
    held = _digest(os.path.join(folder, CONFIG_FILE))
    if weights:
        held += f" {_digest(pretrained_file(name, role))}"
    return hashlib.sha256(held.encode()).hexdigest()


def source_config(name: str, role: str = "", download: bool = True) -> dict:
    """The config.json of a model named by its source (`source_folder`)."""
    import json
    with open(os.path.join(source_folder(name, role, download, weights=False), CONFIG_FILE)) as f:
        return json.load(f)


def pretrained_file(name: str, role: str = "", download: bool = True) -> str:
    """The local file holding the pretrained weights for `name` (timm's, or those of a model named by its source):
    handed over by the driver, cached, or (with `download`) downloaded into the cache first."""
    import timm

    if source_of(name, f"{role}.name" if role else "name"):  # its folder, as the driver handed it over or not
        folder = source_folder(name, role, download)
        found = _weights_in(folder)
        if found is None:
            raise UserError(f"{role or 'model'}: {name}: {folder} holds no {' or '.join(HUB_FILES)}")
        return found
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
    from huggingface_hub import constants

    hub_id, hub_file, url = (getattr(pcfg, k, None) for k in ("hf_hub_id", "hf_hub_filename", "url"))
    ways_out = (f"fill the cache where there is network (python -c \"import timm; timm.create_model('{name}', "
                f"pretrained=True)\") and copy it here (HF_HOME), or set {key} to a local weights file")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{key} is true but timm's weights for '{name}' are not cached (looked in {looked}) and "
                        f"HF_HUB_OFFLINE is set: {ways_out}")
    try:
        if hub_id:
            repo, _, revision = hub_id.partition("@")
            return _first_file(repo, [hub_file] if hub_file else list(HUB_FILES), revision or None,
                               f"timm's weights for '{name}'")
        assert url
        path = _url_path(url, torch.hub.get_dir())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        log.info("downloading timm's weights for '%s' from %s", name, url[0] if isinstance(url, tuple) else url)
        torch.hub.download_url_to_file(url[0] if isinstance(url, tuple) else url, path, progress=True)
        return path
    except Exception as e:  # whatever the HTTP stack raises (httpx, the hub's errors, OSError): one message
        where = f"{constants.ENDPOINT} ({hub_id})" if hub_id else str(url)
        raise UserError(f"{key}: could not download timm's weights for '{name}' from {where}: {_first_line(e)}; "
                        f"{ways_out}") from None


def shipped(models: dict[str, bool]) -> Files:
    """What the driver hands the workers, for each model name with whether its weights are loaded: the files, as
    (file name, bytes): a model named by its source its config.json, then its weights file where they are loaded;
    a timm name its weights file."""
    out = {}
    for name, weights in models.items():
        paths = [pretrained_file(name)] if weights else []
        if source_of(name):
            paths.insert(0, os.path.join(source_folder(name, weights=weights), CONFIG_FILE))
        if paths:  # a timm name whose weights are not loaded needs nothing
            out[name] = [(os.path.basename(p), _read(p)) for p in paths]
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def provide(files: Files | None) -> None:
    """Make the driver's files this process's own: a model's files in one folder (written once per machine, by
    content): a timm name's weights file the one `pretrained_file` gives, a named model's folder the one
    `source_folder` gives."""
    for name, parts in (files or {}).items():
        digest = hashlib.sha256(b"".join(hashlib.sha256(data).digest() for _, data in parts)).hexdigest()
        folder = os.path.join(tempfile.gettempdir(), f"kd-weights-{os.getuid()}", digest[:16])
        os.makedirs(folder, exist_ok=True)
        for filename, data in parts:
            path = os.path.join(folder, filename)
            if not os.path.isfile(path) or _digest(path) != hashlib.sha256(data).hexdigest():
                fd, tmp = tempfile.mkstemp(dir=folder)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
        _PROVIDED[name] = os.path.join(folder, parts[-1][0])


def provenance(name: str, pretrained: bool | str) -> dict[str, str] | None:
    """Which weights a model of this name started from, as its export records them: the hub repository, the
    revision asked for and the commit its files came from (a hub cache's snapshot folder is named by it), or the
    local file or folder; and the weights file's sha256. None for random initialisation."""
    if pretrained is False:
        return None
    path = pretrained if isinstance(pretrained, str) else pretrained_file(name, download=False)
    if not os.path.isfile(path):
        raise UserError(f"{path} is not on this machine")
    out = {"name": name, "file": os.path.basename(path), "sha256": _digest(path)}
    ident = name.partition(":")[2]
    if isinstance(pretrained, str):
        out["path"] = os.path.abspath(path)
    elif source_of(name) == "local-dir":
        out["folder"] = os.path.abspath(os.path.expanduser(ident))
    else:
        repo, revision = (ident.partition("@")[::2] if source_of(name) else _timm_repo(name))
        if repo:
            out["repo"], out["revision"] = repo, revision or "main"
        parts = os.path.normpath(path).split(os.sep)
        if len(parts) > 2 and parts[-3] == "snapshots":  # the hub cache: snapshots/<commit>/<file>
            out["commit"] = parts[-2]
    return out


def _timm_repo(name: str) -> tuple[str, str]:
    import timm
    pcfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pcfg, "hf_hub_id", None) or ""
    repo, _, revision = hub_id.partition("@")
    return repo, revision


def _digest(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(path)
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int, int], str] = {}  # a file's sha256 by path, size and time: a weights file read once


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""Downloads into each source's own cache, and the one line a failed one (offline) ends in: the file to fetch and
where to put it.

* Hugging Face (`salman:`, `timm:`): `huggingface_hub.hf_hub_download` into the Hugging Face cache (`cache_dir`, else
  $AUTOLORA_CACHE, else its default, $HF_HOME/hub), where a file is found again offline (HF_HUB_OFFLINE=1).
* torch hub (`torchvision:`, timm's url weights): `torch.hub.download_url_to_file` into
  `$TORCH_HOME/hub/checkpoints/<file name of the url>`, the cache `torch.hub.load_state_dict_from_url` uses; the
  hash prefix in the file name is checked on download.
"""
from __future__ import annotations

import os
import re
import sys
from urllib.parse import urlparse

from ...errors import UserError

_HASH = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's HASH_REGEX: resnet50-11ad3fa6.pth


def reason(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def hf_cache(cache_dir: str | None) -> str:
    """The Hugging Face cache a download goes to: `cache_dir`, else $AUTOLORA_CACHE, else huggingface_hub's."""
    given = cache_dir or os.environ.get("AUTOLORA_CACHE")
    if given:
        return given
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    return constants.HF_HUB_CACHE


def hf_file(repo: str, filename: str, *, arch: str, cache_dir: str | None = None, revision: str | None = None,
            fallback: str | None = None) -> str:
    """The local path of `filename` in Hugging Face repo `repo`, downloaded into the cache when it is not there.
    `fallback`: a second file name tried when the repo has no `filename` (timm: pytorch_model.bin)."""
    url = f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{filename}"
    cache = hf_cache(cache_dir)
    manual = (f"download {url} manually and pass --weights PATH --arch {arch}, or put it in the Hugging Face cache "
              f"{cache} (`hf download {repo} {filename}` where there is a connection)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(f"downloading from Hugging Face needs huggingface_hub: pip install 'autolora[hub]', or "
                        f"{manual}") from None
    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return hf_hub_download(repo_id=repo, filename=filename, revision=revision, cache_dir=cache)
    except EntryNotFoundError as e:
        if fallback and not isinstance(e, LocalEntryNotFoundError):  # the repo has no such file (not: offline)
            return hf_file(repo, fallback, arch=arch, cache_dir=cache_dir, revision=revision)
        err = e
    except Exception as e:  # offline, HTTP errors, disk full, ...: all end the same way for the user
        err = e
    raise UserError(f"download of '{filename}' from Hugging Face repo '{repo}' failed ({reason(err)}): "
                    f"{manual}") from err


def torch_hub_file(url: str) -> str:
    """The local path of `url` in torch hub's cache, downloaded there when it is not (checking the hash prefix of
    the file name, as torchvision's builders do)."""
    import torch.hub

    filename = os.path.basename(urlparse(url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.isfile(path):
        return path
    match = _HASH.search(filename)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, match.group(1) if match else None, progress=sys.stderr.isatty())
    except Exception as e:  # URLError offline, HTTPError, a hash mismatch, ...
        raise UserError(f"download of {url} failed ({reason(e)}): fetch it where there is a connection and put it at "
                        f"{path} (torch hub's cache, $TORCH_HOME/hub/checkpoints)") from e
    return path

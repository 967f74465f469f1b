"""Models by name: a Hugging Face Hub repo id or a short name, resolved to a local path in the Hub's cache.

    resolve_model("sd15")                                       -> the SD 1.5 diffusers folder
    resolve_model("stabilityai/stable-diffusion-2-1-base")      -> that repo's diffusers folder
    resolve_model("owner/repo/sub/model.safetensors")           -> one single file in a repo
    resolve_model("weights/my.safetensors")                     -> the local path, unchanged

Downloads go through huggingface_hub and follow its conventions: its cache (HF_HOME / HF_HUB_CACHE), the
endpoint HF_ENDPOINT, offline mode HF_HUB_OFFLINE=1, a token from HF_TOKEN or `hf auth login`, interrupted
downloads resumed, its progress bars. Of a diffusers repo only what `checkpoint.load` reads is fetched:
configs, tokenizer files and the `.safetensors` weights of unet, vae and text_encoder(_2) (the `fp16` variant
when the repo has one and fp16 is what will run); never pickles (.bin, .ckpt), safety checker or
duplicate single files. A second call finds everything in the cache and makes no download.
"""
import re
import sys
from pathlib import Path

from ..errors import UserError
from .safetensors_io import PICKLE_HINT

SHORT_NAMES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1",
               "sd21-base": "stabilityai/stable-diffusion-2-1-base", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
DEFAULT_MODEL = "sd15"  # what runs when weights/ holds no model and no --model is given
COMPONENTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
SDXL_COMPONENTS = {"text_encoder_2": "model"}  # and tokenizer_2/: what an SDXL repo adds
REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # the Hub's rule for owner and repo names (dots, dashes, underscores)
OFFLINE = "HF_HUB_OFFLINE=1 is set (unset it to download)"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# What `hf download` should fetch for a standard diffusers SD repo (said when it cannot be fetched here).
HF_DOWNLOAD_FILES = " ".join(f'--include "{p}"' for p in ("*.json", "*.txt", "unet/diffusion_pytorch_model.safetensors",
                                                          "vae/diffusion_pytorch_model.safetensors",
                                                          "text_encoder/model.safetensors",
                                                          "text_encoder_2/model.safetensors"))


def parse_spec(spec):
    """(repo_id, file or None) for a Hub spec, or None for a local path (existing or meant to be one).

    A spec is local when it exists, starts with `/ . ~`, holds a backslash, or its first part is an existing
    folder (so a typo in `weights/x` says "no such file" instead of asking the Hub for a repo "weights/x").
    """
    spec = str(spec)
    if spec in SHORT_NAMES:
        return SHORT_NAMES[spec], None
    parts = spec.split("/")
    if (Path(spec).exists() or spec[:1] in "/.~" or "\\" in spec or Path(parts[0]).is_dir()
            or not all(re.fullmatch(REPO_PART, p) for p in parts)):
        return None
    if len(parts) == 2 and not parts[1].lower().endswith((".safetensors", *PICKLE_SUFFIXES)):
        return spec, None
    if len(parts) >= 3 and parts[-1].lower().endswith(".safetensors"):
        return "/".join(parts[:2]), "/".join(parts[2:])
    if len(parts) >= 3 and parts[-1].lower().endswith(PICKLE_SUFFIXES):
        raise UserError(f"{spec}: {PICKLE_HINT}")
    return None


def spec_help():
    """One phrase listing the accepted forms, for --help texts and error messages."""
    names = ", ".join(f"{k} ({v})" for k, v in SHORT_NAMES.items())
    return (f"a .safetensors file, a diffusers folder, a Hugging Face Hub repo id owner/name, "
            f"owner/name/file.safetensors, or a short name: {names}")


def resolve_model(spec, revision=None, prefer_fp16=False, log=print):
    """(local path, source) for a model spec; Hub models are downloaded into the Hub cache once.

    source is {"repo_id", "revision" (the commit sha used), "file" (or None)} for a Hub model and
    {"path"} for a local one. Raises UserError (one line) for anything that cannot be resolved.
    """
    hub = parse_spec(spec)
    if hub is None:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"model not found: {spec} does not exist (a model is {spec_help()}; "
                            "see weights/README.md)")
        if revision:
            raise UserError(f"--revision is for Hub models; {spec} is a local path")
        return path, {"path": str(path.resolve())}
    repo_id, file = hub
    hf = _import_hub()
    if file is None:
        path = _fetch_repo(hf, repo_id, revision, prefer_fp16, log)
    else:
        path = _fetch_file(hf, repo_id, file, revision, log)
    sha = (path if file is None else _snapshot_of(path, file)).name
    return path, {"repo_id": repo_id, "revision": sha, "file": file}


# ---------------------------------------------------------------------------------------------------
# Choosing files

def choose_files(files, repo_id, prefer_fp16):
    """The files of a diffusers SD repo that `load()` reads, from the repo's file list.

    Raises UserError when the repo is not a Stable Diffusion 1.x/2.x/XL diffusers model.
    """
    files = set(files)
    if "model_index.json" not in files:
        singles = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        hint = (f"; for one of its single files use {repo_id}/{singles[0]}" if singles else "")
        raise UserError(f"{repo_id} is not a diffusers Stable Diffusion repo (no model_index.json){hint}")
    if any(f.startswith(("text_encoder_3/", "transformer/")) for f in files):
        raise UserError(f"{repo_id} is a diffusion-transformer model (SD3, Flux, ...: no UNet); only Stable Diffusion "
                        "1.x, 2.x and XL are supported")
    xl = any(f.startswith("text_encoder_2/") for f in files)
    chosen = ["model_index.json"]
    for sub, stem in (COMPONENTS | SDXL_COMPONENTS if xl else COMPONENTS).items():
        if f"{sub}/config.json" not in files:
            raise UserError(f"{repo_id} is not a Stable Diffusion 1.x/2.x/XL base model: it has no {sub}/config.json")
        plain, half = f"{sub}/{stem}.safetensors", f"{sub}/{stem}.fp16.safetensors"
        weights = [w for w in ((half, plain) if prefer_fp16 else (plain, half)) if w in files]
        if not weights:
            pickles = [f for f in files if f.startswith(sub + "/") and f.endswith(PICKLE_SUFFIXES)]
            raise UserError(f"{repo_id}: {sub}/ has no .safetensors weights"
                            + (f" ({pickles[0]}: {PICKLE_HINT})" if pickles else ""))
        chosen += [f"{sub}/config.json", weights[0]]
    chosen += sorted(f for f in files if f.startswith(("tokenizer/", "tokenizer_2/")) and f.endswith((".json", ".txt")))
    chosen += [f for f in ("scheduler/scheduler_config.json",) if f in files]
    return chosen


def _size(n):
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


# ---------------------------------------------------------------------------------------------------
# Downloading (huggingface_hub)

def _import_hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # submodules are not attributes until imported (lazy package)
        import huggingface_hub.errors
    except ImportError:
        raise UserError("models by Hub id need huggingface_hub: pip install huggingface_hub "
                        "(or give a local file or folder)") from None
    return huggingface_hub


def _transport_errors(hf):
    """Exceptions meaning "the Hub cannot be reached" (huggingface_hub 1.x uses httpx, 2.x httpx2)."""
    errors = [hf.errors.OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    return tuple(errors)


def _offline(hf):
    return hf.constants.HF_HUB_OFFLINE


def _where(hf, repo_id):
    return f"{hf.constants.ENDPOINT}/{repo_id}"


def _gated_without_token(hf, repo_id):
    return UserError(f"{repo_id} is a gated repo: accept its conditions at {_where(hf, repo_id)}, then log in "
                     "with `hf auth login` (or set HF_TOKEN)")


def _hub_error(hf, e, repo_id, revision):
    """The one-line UserError for a huggingface_hub HfHubHTTPError `e`."""
    err = hf.errors
    if isinstance(e, err.GatedRepoError):
        if hf.get_token() is None:
            return _gated_without_token(hf, repo_id)
        return UserError(f"your Hugging Face token has no access to the gated repo {repo_id}: accept its conditions "
                         f"at {_where(hf, repo_id)} with that account")
    if isinstance(e, err.RepositoryNotFoundError):
        return UserError(f"model not found: no repo {repo_id} on {hf.constants.ENDPOINT} (or it is private: log in "
                         "with `hf auth login` or set HF_TOKEN); a local path does not exist either")
    if isinstance(e, err.RevisionNotFoundError):
        return UserError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit sha)")
    status = getattr(getattr(e, "response", None), "status_code", "?")
    return UserError(f"the Hub answered HTTP {status} for {repo_id}: {str(e).strip().splitlines()[0]}")


def _listing(hf, repo_id, revision):
    """(commit sha, {file: size}, gated) of a repo revision; raises the Hub's errors as UserError."""
    try:
        info = hf.HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except hf.errors.HfHubHTTPError as e:
        raise _hub_error(hf, e, repo_id, revision) from None
    return info.sha, {s.rfilename: s.size or 0 for s in info.siblings or []}, info.gated


def _cannot_fetch(hf, repo_id, why, command, folder):
    return UserError(f"{repo_id} is not in the Hugging Face cache ({hf.constants.HF_HUB_CACHE}) and {why}: run "
                     f"`{command}` where there is internet and copy {folder} here (then --model {folder}), "
                     "or copy that machine's Hugging Face cache")


def _check_gated(hf, repo_id, gated):
    """Refuse before downloading: the Hub lists a gated repo's files to anyone but serves them only with a token."""
    if gated and hf.get_token() is None:
        raise _gated_without_token(hf, repo_id)


def _announce(hf, repo_id, sha, sizes, files, cached, log):
    """The one line said before a download: what, from where, how big (nothing when all is cached)."""
    todo = [f for f in files if not (cached / f).exists()]
    if todo:
        log(f"fetching {repo_id} (commit {sha[:10]}) from {hf.constants.ENDPOINT}: {len(todo)} files, "
            f"{_size(sum(sizes.get(f, 0) for f in todo))}, into the cache {hf.constants.HF_HUB_CACHE} "
            "(downloaded once; an interrupted download continues where it stopped)")


def _download(hf, call, repo_id, revision):
    """Run a huggingface_hub download, its failures as one-line UserErrors."""
    try:
        return Path(call())
    except hf.errors.HfHubHTTPError as e:
        raise _hub_error(hf, e, repo_id, revision) from None
    except _transport_errors(hf) as e:
        raise UserError(f"the download of {repo_id} from {hf.constants.ENDPOINT} failed ({type(e).__name__}: {e}); "
                        "run the same command again to continue where it stopped") from None


def _snapshot(hf, repo_id, sha):
    """Where huggingface_hub's cache keeps a repo's files at commit `sha`."""
    return Path(hf.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha


def _fetch_repo(hf, repo_id, revision, prefer_fp16, log):
    """A diffusers repo's snapshot folder holding what load() reads; the cache when the Hub is out of reach."""
    name = repo_id.split("/")[1]
    command = f"hf download {repo_id} {HF_DOWNLOAD_FILES} --local-dir weights/{name}"
    if _offline(hf):
        return _cached_repo(hf, repo_id, revision, prefer_fp16, OFFLINE, command, log)
    try:
        sha, sizes, gated = _listing(hf, repo_id, revision)
    except _transport_errors(hf) as e:
        why = f"{hf.constants.ENDPOINT} cannot be reached ({type(e).__name__})"
        return _cached_repo(hf, repo_id, revision, prefer_fp16, why, command, log)
    files = choose_files(sizes, repo_id, prefer_fp16)
    storage = _snapshot(hf, repo_id, sha)
    _announce(hf, repo_id, sha, sizes, files, storage, log)
    if all((storage / f).exists() for f in files):
        return storage
    _check_gated(hf, repo_id, gated)
    return _download(hf, lambda: hf.snapshot_download(repo_id, revision=revision, allow_patterns=files),
                     repo_id, revision)


def _cached_repo(hf, repo_id, revision, prefer_fp16, why, command, log):
    """The cached snapshot of a repo revision with every file load() needs, without the network."""
    try:
        folder = Path(hf.snapshot_download(repo_id, revision=revision, local_files_only=True,
                                           allow_patterns=["model_index.json"]))
    except (hf.errors.LocalEntryNotFoundError, OSError):
        raise _cannot_fetch(hf, repo_id, why, command, f"weights/{repo_id.split('/')[1]}") from None
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    try:
        choose_files(present, repo_id, prefer_fp16)
    except UserError:
        raise UserError(f"the cached {repo_id} ({folder}) is incomplete (an interrupted download?) and {why}: "
                        "run again with internet to complete it") from None
    if not _offline(hf):
        log(f"note: {why}; using {repo_id} from the cache")
    return folder


def _fetch_file(hf, repo_id, file, revision, log):
    """One file of a repo (and its `<name>.yaml` LDM config when the repo has one beside it)."""
    get = lambda f, local=False: hf.hf_hub_download(repo_id, f, revision=revision, local_files_only=local)
    why = OFFLINE if _offline(hf) else None
    if why is None:
        try:
            sha, sizes, gated = _listing(hf, repo_id, revision)
        except _transport_errors(hf) as e:
            why = f"{hf.constants.ENDPOINT} cannot be reached ({type(e).__name__})"
    if why is not None:
        try:
            return Path(get(file, local=True))
        except (hf.errors.LocalEntryNotFoundError, OSError):
            command = f"hf download {repo_id} {file} --local-dir weights/"
            raise _cannot_fetch(hf, f"{repo_id}/{file}", why, command, f"weights/{file}") from None
    if file not in sizes:
        others = sorted(f for f in sizes if f.endswith(".safetensors"))
        raise UserError(f"{repo_id} has no file {file}"
                        + (f" (its .safetensors files: {', '.join(others[:6])})" if others else ""))
    yaml = file[: -len(".safetensors")] + ".yaml"
    files = [file] + ([yaml] if yaml in sizes else [])
    storage = _snapshot(hf, repo_id, sha)
    _announce(hf, repo_id, sha, sizes, files, storage, log)
    if not all((storage / f).exists() for f in files):
        _check_gated(hf, repo_id, gated)
    return [_download(hf, lambda f=f: get(f), repo_id, revision) for f in files][0]


def _snapshot_of(path, file):
    """The snapshot folder (named by its commit sha) that holds `file` at `path`."""
    for _ in file.split("/"):
        path = path.parent
    return path

"""The Triton model repository: version folders, live versions, A/B weights, native config.

Layout (``triton_repo/`` in the repository; configs and labels are committed, version folders are
generated and git-ignored)::

    cifar10_resnet18/config.pbtxt labels.txt   python backend running ONNX Runtime
    cifar10_resnet18/<N>/model.onnx model.py version.json   N = the MLflow model version
    cifar10_resnet18/<N>/model_serving.onnx    model.onnx with uint8 preprocessing in the graph
    cifar10_ab/config.pbtxt labels.txt         the A/B router
    cifar10_ab/1/model.py                      copied from triton_models/ by install_router

Which versions are live and the A/B weights are server state, kept as JSON files in the launcher's
state folder (``settings.var_dir / "triton"``), so a restarted server comes back the same: the
launcher reloads both models from them. The committed ``config.pbtxt`` files are never rewritten;
live versions and absolute paths reach Triton as a config override on the repository API's load
call, which replaces the model's configuration atomically on a running server (a rewritten file
would also be picked up by anything else that happens to load the model).

Model control is locked: the launcher starts Triton with its restricted-API options, so the
repository API (load, unload, index) and the other control APIs (shared memory, trace, logging)
answer only requests that carry the header ``cifar-control-key`` with the key from
``CIFAR_TRITON_CONTROL_KEY`` or ``<state_dir>/control.key`` (created with mode 0600 on the first
start). Every load here sends it; see the serving README for the threat model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cifar_assets.data.imageset import CLASSES

MODEL_NAME = "cifar10_resnet18"
ROUTER_NAME = "cifar10_ab"
TEMPLATES_DIR = Path(__file__).resolve().parent / "triton_models"
CLASSIFIER_TEMPLATE = TEMPLATES_DIR / "classifier_model.py"
ROUTER_TEMPLATE = TEMPLATES_DIR / "ab_router_model.py"
VERSION_METADATA_FILE = "version.json"
# What the python backends run: model.onnx with the uint8 normalisation in front
# (cifar_assets.ml.onnx_export.add_uint8_input), written beside it by write_version.
SERVING_ONNX = "model_serving.onnx"
LIVE_VERSIONS_FILE = "live_versions.json"
AB_WEIGHTS_FILE = "ab_weights.json"
ROUTER_EXECUTION_FILE = "router_execution.json"
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
# How the router runs the chosen version: "inprocess" (its own ONNX Runtime session on the
# version's model.onnx) or "bls" (a BLS call to cifar10_resnet18); see ab_router_model.py.
ROUTER_EXECUTION_MODES = ("inprocess", "bls")
# When the router's capture records reach the disk (see ab_router_model.py).
CAPTURE_FSYNC_MODES = ("interval", "batch")
CONTROL_KEY_FILE = "control.key"
CONTROL_KEY_ENV = "CIFAR_TRITON_CONTROL_KEY"
# The header the restricted APIs expect. Triton's gRPC front end looks for the metadata key with
# its own prefix, so a gRPC client sends GRPC_CONTROL_HEADER.
CONTROL_HEADER = "cifar-control-key"
GRPC_CONTROL_HEADER = f"triton-grpc-protocol-{CONTROL_HEADER}"
# What the key guards: everything that changes the server rather than asks it. Loading a model
# runs its code; shared-memory registration maps regions by name; trace and logging write files.
# Health, metadata, model config, statistics and inference stay open.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
# Triton reads "<apis>:<header>=<value>": the key must not hold ':', '=', ',' or spaces.
CONTROL_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,256}")


class RepositoryError(ValueError):
    """A model repository, version or weight request that cannot be honoured as asked."""


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def default_state_dir() -> Path:
    """Where the server's state lives: log, pid file, live versions, A/B weights."""
    from cifar_assets.settings import get_settings

    return get_settings().var_dir / "triton"


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_version_number(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RepositoryError(
            f"Model version {version!r} is not a positive integer; Triton versions are the "
            "MLflow model version numbers (1, 2, ...)."
        )
    return version


def _check_onnx(onnx_path: Path) -> None:
    """Fail early, naming the file, if the ONNX graph does not have the interface model.py uses."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    outputs = [o.name for o in graph.output]
    if inputs != [ONNX_INPUT] or outputs != [ONNX_OUTPUT]:
        raise RepositoryError(
            f"{onnx_path}: the graph has inputs {inputs} and outputs {outputs}; the server needs "
            f"one input {ONNX_INPUT!r} (N, 3, 32, 32) float32 and one output {ONNX_OUTPUT!r} "
            "(N, 10). Export with cifar_assets.ml.onnx_export.export_onnx."
        )
    dims = graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims]
    if len(shape) != 4 or shape[1:] != [3, 32, 32] or not isinstance(shape[0], str):
        raise RepositoryError(
            f"{onnx_path}: input {ONNX_INPUT!r} has shape {shape}; it must be (batch, 3, 32, 32) "
            "with a dynamic batch dimension so Triton can batch requests. Re-export with "
            "dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}}."
        )


def list_versions(repo: Path, model: str = MODEL_NAME) -> list[int]:
    """The complete version folders of ``model`` (numeric folders holding model.onnx)."""
    folder = repo / model
    if not folder.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in folder.iterdir()
        if child.name.isdigit() and (child / "model.onnx").is_file()
    )


def write_version(
    repo: Path, onnx_path: Path, version: int, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``<repo>/cifar10_resnet18/<version>/`` (model.onnx, model_serving.onnx derived from
    it, model.py, version.json) atomically.

    Everything is written into a hidden temporary folder (Triton ignores non-numeric names) that
    is then renamed, so Triton can never load a half-written version. Writing the same ONNX file
    again is a no-op; a different file under an existing version number is refused, because a
    version number names one MLflow model version for good.
    """
    version = _check_version_number(version)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise RepositoryError(
            f"ONNX file {onnx_path} does not exist; export the model first "
            "(the onnx_model asset, or cifar_assets.ml.onnx_export.export_onnx)."
        )
    model_dir = repo / MODEL_NAME
    if not (model_dir / "config.pbtxt").is_file():
        raise RepositoryError(
            f"{model_dir / 'config.pbtxt'} is missing: {repo} is not a cifar_assets model "
            "repository. Point TRITON_MODEL_REPOSITORY at the project's triton_repo/ (or a copy)."
        )
    _check_onnx(onnx_path)
    onnx_sha = _sha256(onnx_path)
    target = model_dir / str(version)
    if target.exists():
        existing = target / VERSION_METADATA_FILE
        if existing.is_file() and json.loads(existing.read_text()).get("onnx_sha256") == onnx_sha:
            complete_version(target)
            return target
        raise RepositoryError(
            f"{target} already holds a different model; version {version} cannot be rewritten. "
            "Register a new MLflow model version, or delete the folder if it was a mistake."
        )
    record = {
        **dict(metadata or {}),
        "version": version,
        "onnx_sha256": onnx_sha,
        "source_onnx": str(onnx_path.resolve()),
        "written_at": _utc_now(),
    }
    try:
        record_text = json.dumps(record, indent=2, sort_keys=True)
    except TypeError as exc:
        raise RepositoryError(
            f"metadata for version {version} is not JSON-serialisable ({exc}); pass plain "
            "strings, numbers, lists and dicts (e.g. the MLflow run id as a string)."
        ) from exc
    tmp = model_dir / f".writing-{version}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        shutil.copyfile(onnx_path, tmp / "model.onnx")
        _write_serving_onnx(tmp)
        shutil.copyfile(CLASSIFIER_TEMPLATE, tmp / "model.py")
        (tmp / VERSION_METADATA_FILE).write_text(record_text + "\n")
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _write_serving_onnx(folder: Path) -> None:
    from cifar_assets.ml.onnx_export import add_uint8_input

    add_uint8_input(folder / "model.onnx", folder / SERVING_ONNX)


def complete_version(folder: Path) -> None:
    """Bring a version folder written by an earlier release up to date: derive its
    model_serving.onnx if it has none, then copy the current model.py (in that order, so the
    model.py that needs the file never sits beside a folder without it)."""
    if not (folder / SERVING_ONNX).is_file():
        _write_serving_onnx(folder)
    _copy_atomic(CLASSIFIER_TEMPLATE, folder / "model.py")


def complete_versions(repo: Path) -> list[int]:
    """complete_version for every version of ``repo`` that lacks model_serving.onnx (the
    launcher calls it before every start); returns the versions it completed."""
    completed = [
        version
        for version in list_versions(repo)
        if not (repo / MODEL_NAME / str(version) / SERVING_ONNX).is_file()
    ]
    for version in completed:
        complete_version(repo / MODEL_NAME / str(version))
    return completed


def read_version_metadata(repo: Path, version: int) -> dict[str, Any]:
    path = repo / MODEL_NAME / str(version) / VERSION_METADATA_FILE
    if not path.is_file():
        raise RepositoryError(
            f"{path} is missing: version {version} was not written by write_version."
        )
    value: dict[str, Any] = json.loads(path.read_text())
    return value


def install_router(repo: Path) -> Path:
    """Copy the router's model.py template into ``<repo>/cifar10_ab/1/`` (the launcher calls
    this before every start, so the served router always matches the installed package)."""
    router_dir = repo / ROUTER_NAME
    if not (router_dir / "config.pbtxt").is_file():
        raise RepositoryError(
            f"{router_dir / 'config.pbtxt'} is missing: {repo} is not a cifar_assets model "
            "repository. Point TRITON_MODEL_REPOSITORY at the project's triton_repo/ (or a copy)."
        )
    version_dir = router_dir / "1"
    version_dir.mkdir(exist_ok=True)
    _copy_atomic(ROUTER_TEMPLATE, version_dir / "model.py")
    return version_dir / "model.py"


def read_live_versions(state_dir: Path) -> list[int]:
    path = state_dir / LIVE_VERSIONS_FILE
    if not path.is_file():
        return []
    return [int(v) for v in json.loads(path.read_text())["versions"]]


def read_ab_weights(state_dir: Path) -> dict[int, float]:
    path = state_dir / AB_WEIGHTS_FILE
    if not path.is_file():
        return {}
    return {int(v): float(w) for v, w in json.loads(path.read_text())["weights"].items()}


def read_router_execution(state_dir: Path) -> str | None:
    """The router mode last loaded with an explicit ``execution``; None if never set."""
    path = state_dir / ROUTER_EXECUTION_FILE
    if not path.is_file():
        return None
    try:
        mode = json.loads(path.read_text())["execution"]
    except (ValueError, KeyError, TypeError) as error:
        raise RepositoryError(
            f"{path} is unreadable ({error}); delete it to go back to the committed router "
            "mode, or set one with load_router(..., execution='inprocess' or 'bls')."
        ) from error
    if mode not in ROUTER_EXECUTION_MODES:
        raise RepositoryError(
            f"{path} names router execution {mode!r}, not one of "
            f"{', '.join(ROUTER_EXECUTION_MODES)}; delete it or load the router with a valid "
            "execution."
        )
    return str(mode)


def _check_control_key(key: str, source: str) -> str:
    if not CONTROL_KEY_PATTERN.fullmatch(key):
        raise RepositoryError(
            f"The model-control key in {source} is not 16-256 characters of A-Z, a-z, 0-9, '_' "
            "and '-'; generate one with `python -c \"import secrets; "
            'print(secrets.token_urlsafe(32))"`.'
        )
    return key


def _key_from_environment() -> str | None:
    from cifar_assets.settings import get_settings

    key = get_settings().triton_control_key
    return None if key is None else _check_control_key(key, CONTROL_KEY_ENV)


def _read_key_file(path: Path) -> str:
    """The key in ``path``, refused if anyone but its owner may read it or it is a symlink."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RepositoryError(
            f"Cannot read the model-control key {path} ({exc}); it must be a regular file owned "
            f"by you with mode 0600, or set {CONTROL_KEY_ENV}."
        ) from exc
    with os.fdopen(descriptor, encoding="ascii", errors="replace") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode) or mode & 0o077:
            raise RepositoryError(
                f"The model-control key {path} has mode {stat.filemode(mode)}; others could read "
                f"it. Run `chmod 600 {path}` (or delete it: the next start writes a new one)."
            )
        return _check_control_key(handle.read().strip(), str(path))


def control_key(state_dir: Path | None = None) -> str:
    """The key that opens Triton's model-control APIs: ``CIFAR_TRITON_CONTROL_KEY`` if set, else
    the one in ``<state_dir>/control.key`` (written by the first start, mode 0600)."""
    key = _key_from_environment()
    if key is not None:
        return key
    path = (state_dir or default_state_dir()) / CONTROL_KEY_FILE
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        raise RepositoryError(
            f"No model-control key: {CONTROL_KEY_ENV} is unset and {path} does not exist. "
            "Start the server with `cifar-triton start` (it writes the file), or set "
            f"{CONTROL_KEY_ENV} to the key the server was started with."
        ) from None


def ensure_control_key(state_dir: Path) -> str:
    """The key the server is started with: ``control_key``, creating ``<state_dir>/control.key``
    (mode 0600 from its first byte, never following a symlink) when there is none yet."""
    key = _key_from_environment()
    if key is not None:
        return key
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / CONTROL_KEY_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return control_key(state_dir)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        key = secrets.token_urlsafe(32)
        handle.write(key + "\n")
    return key


def control_headers(state_dir: Path | None = None, protocol: str = "http") -> dict[str, str]:
    """The header that opens the restricted APIs, named for ``protocol`` ("http" or "grpc")."""
    name = GRPC_CONTROL_HEADER if protocol == "grpc" else CONTROL_HEADER
    return {name: control_key(state_dir)}


def restricted_api_args(key: str) -> list[str]:
    """tritonserver options that put RESTRICTED_APIS behind the header, on HTTP and gRPC."""
    apis = ",".join(RESTRICTED_APIS)
    return [
        f"--http-restricted-api={apis}:{CONTROL_HEADER}={key}",
        f"--grpc-restricted-protocol={apis}:{CONTROL_HEADER}={key}",
    ]


def _protocol(client: Any) -> str:
    return "grpc" if type(client).__module__.startswith("tritonclient.grpc") else "http"


def _config_override(repo: Path, model: str) -> Any:
    """The committed config.pbtxt of ``model`` as a ModelConfig message, ready to be changed."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = repo / model / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(
            f"{path} is missing: {repo} is not a cifar_assets model repository. Point "
            "TRITON_MODEL_REPOSITORY at the project's triton_repo/ (or a copy)."
        )
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _as_json(config: Any) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def _client(client_or_url: Any) -> Any:
    """A tritonclient client: the one given, or an HTTP client for the URL given. Calls to the
    restricted APIs pass ``control_headers`` themselves (``_load`` does)."""
    if not isinstance(client_or_url, str):
        return client_or_url
    import tritonclient.http as httpclient

    url = client_or_url.removeprefix("http://")
    return httpclient.InferenceServerClient(url, network_timeout=300.0)


def _load(client_or_url: Any, model: str, config: Any, state_dir: Path | None) -> None:
    from tritonclient.utils import InferenceServerException

    client = _client(client_or_url)
    headers = control_headers(state_dir, _protocol(client))
    try:
        client.load_model(model, config=_as_json(config), headers=headers)
    except InferenceServerException as exc:
        if "is restricted" in (exc.message() or ""):
            raise RepositoryError(
                f"Triton refused to load {model}: the model-control key was not accepted "
                f"({exc.message()}). The server was started with another key: use the "
                f"{CONTROL_KEY_ENV} or {CONTROL_KEY_FILE} it was started with, or restart it."
            ) from exc
        raise RepositoryError(
            f"Triton refused to load {model}: {exc.message()}. The server log (var/triton/"
            "tritonserver.log by default) has the model's own error."
        ) from exc


def set_live_versions(
    client_or_url: Any,
    versions: Sequence[int],
    *,
    repo: Path | None = None,
    state_dir: Path | None = None,
) -> list[int]:
    """Serve exactly ``versions`` of cifar10_resnet18, and remember them for the next start.

    Loads the model with a ``version_policy { specific { versions: [...] } }`` override. Triton
    keeps answering on the versions it already serves while the new set loads; requests that
    are in flight on a dropped version finish. A version that still has A/B weight cannot be
    dropped (the router would send it traffic): move the weights first.
    """
    from cifar_assets.settings import get_settings

    repo = repo or get_settings().triton_repo
    state_dir = state_dir or default_state_dir()
    chosen = sorted({_check_version_number(v) for v in versions})
    if not chosen:
        raise RepositoryError(
            "No versions given: at least one version must stay live. To stop serving, stop the "
            "server (cifar-triton stop)."
        )
    missing = [v for v in chosen if v not in list_versions(repo)]
    if missing:
        raise RepositoryError(
            f"Versions {missing} have no folder with model.onnx under {repo / MODEL_NAME}; "
            f"available: {list_versions(repo)}. Write them with write_version first."
        )
    weighted = [v for v, w in read_ab_weights(state_dir).items() if w > 0 and v not in chosen]
    if weighted:
        raise RepositoryError(
            f"Versions {weighted} still get A/B traffic ({state_dir / AB_WEIGHTS_FILE}); move "
            "their weight to the versions that stay live with set_ab_weights, then drop them."
        )
    config = _config_override(repo, MODEL_NAME)
    config.version_policy.specific.versions[:] = chosen
    _load(client_or_url, MODEL_NAME, config, state_dir)
    write_json_atomic(
        state_dir / LIVE_VERSIONS_FILE, {"versions": chosen, "updated_at": _utc_now()}
    )
    return chosen


def set_ab_weights(
    weights: Mapping[int, float], *, state_dir: Path | None = None
) -> dict[int, float]:
    """Set the router's traffic split, e.g. ``{3: 0.9, 4: 0.1}``; takes effect on the router's
    next batch, without a reload. Weights must be non-negative, sum to 1, and name live versions."""
    state_dir = state_dir or default_state_dir()
    if not weights:
        raise RepositoryError("No A/B weights given: name at least one version, e.g. {3: 1.0}.")
    cleaned = {_check_version_number(int(v)): float(w) for v, w in weights.items()}
    bad = {v: w for v, w in cleaned.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise RepositoryError(
            f"A/B weights {bad} are negative or not finite; use shares in [0, 1]."
        )
    total = sum(cleaned.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise RepositoryError(
            f"A/B weights {cleaned} sum to {total:g}, not 1; give each version its share of "
            "traffic, e.g. {3: 0.9, 4: 0.1}."
        )
    live = read_live_versions(state_dir)
    not_live = sorted(v for v, w in cleaned.items() if w > 0 and v not in live)
    if not_live:
        raise RepositoryError(
            f"Versions {not_live} are not live (live: {live}, from "
            f"{state_dir / LIVE_VERSIONS_FILE}); make them live with set_live_versions first."
        )
    write_json_atomic(
        state_dir / AB_WEIGHTS_FILE,
        {"weights": {str(v): w for v, w in sorted(cleaned.items())}, "updated_at": _utc_now()},
    )
    return cleaned


def load_router(
    client_or_url: Any,
    *,
    repo: Path,
    state_dir: Path,
    capture_dir: Path,
    capture_input_sample_rate: float = 0.1,
    execution: str | None = None,
    capture_fsync: str | None = None,
) -> None:
    """Load cifar10_ab with the absolute paths of its weights file and capture folder.

    ``execution`` is ``"inprocess"`` or ``"bls"`` (see ROUTER_EXECUTION_MODES). A mode given
    here is kept in ``state_dir`` once the router has loaded with it, so None (a restart) loads
    the mode last set, or the committed config's (``inprocess``) if none ever was. Loading again
    with another mode switches a running server's router over without touching the versions it
    serves.

    ``capture_fsync`` is when capture records reach the disk (CAPTURE_FSYNC_MODES): None or
    ``"interval"`` (every record is written before its response leaves, and synced at most a
    second later), ``"batch"`` (synced before each batch's responses leave). See the serving
    README for what each costs.
    """
    if capture_fsync is not None and capture_fsync not in CAPTURE_FSYNC_MODES:
        raise RepositoryError(
            f"capture_fsync={capture_fsync!r} is unknown; use one of "
            f"{', '.join(CAPTURE_FSYNC_MODES)}."
        )
    if not 0.0 <= capture_input_sample_rate <= 1.0:
        raise RepositoryError(
            f"capture_input_sample_rate={capture_input_sample_rate} is outside [0, 1]."
        )
    if execution is not None and execution not in ROUTER_EXECUTION_MODES:
        raise RepositoryError(
            f"Router execution {execution!r} is unknown; use one of "
            f"{', '.join(ROUTER_EXECUTION_MODES)} (inprocess: the router runs the version's "
            "model.onnx itself; bls: it forwards to cifar10_resnet18)."
        )
    chosen = execution if execution is not None else read_router_execution(state_dir)
    install_router(repo)
    config = _config_override(repo, ROUTER_NAME)
    parameters = {
        "target_model": MODEL_NAME,
        "ab_weights_file": str((state_dir / AB_WEIGHTS_FILE).resolve()),
        "capture_dir": str(capture_dir.resolve()),
        "capture_input_sample_rate": repr(float(capture_input_sample_rate)),
    }
    if chosen is not None:
        parameters["execution"] = chosen
    if capture_fsync is not None:
        parameters["capture_fsync"] = capture_fsync
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    capture_dir.mkdir(parents=True, exist_ok=True)
    _load(client_or_url, ROUTER_NAME, config, state_dir)
    if execution is not None:
        # Only after a successful load: a refused mode must not come back at the next restart.
        write_json_atomic(
            state_dir / ROUTER_EXECUTION_FILE, {"execution": execution, "updated_at": _utc_now()}
        )


def restore_models(
    client_or_url: Any,
    *,
    repo: Path,
    state_dir: Path,
    capture_dir: Path,
    capture_input_sample_rate: float = 0.1,
    execution: str | None = None,
) -> list[int]:
    """Load the persisted live versions (if any were ever set) and the router: what a fresh
    server needs to serve as before its restart. Returns the live versions."""
    live = read_live_versions(state_dir)
    if live:
        set_live_versions(client_or_url, live, repo=repo, state_dir=state_dir)
    load_router(
        client_or_url,
        repo=repo,
        state_dir=state_dir,
        capture_dir=capture_dir,
        capture_input_sample_rate=capture_input_sample_rate,
        execution=execution,
    )
    return live


def render_native_config(
    *,
    versions: Sequence[int] | None = None,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 100,
    instance_count: int = 1,
    kind: str = "KIND_CPU",
    intra_op_threads: int = 1,
) -> str:
    """config.pbtxt for Triton's own onnxruntime backend (the NGC tritonserver container).

    It serves ``model.onnx`` directly, so it takes the normalised float ``input`` only: clients
    of the production server normalise on their side (cifar_assets.ml.model.normalise_uint8).
    The defaults match the local server's (one instance, one intra-op thread); raise
    ``intra_op_threads`` or ``instance_count`` on a machine with more cores.
    """
    if kind not in ("KIND_CPU", "KIND_GPU"):
        raise RepositoryError(f"instance kind {kind!r} is not KIND_CPU or KIND_GPU.")
    if max_batch_size < 1 or instance_count < 1 or intra_op_threads < 0:
        raise RepositoryError(
            "max_batch_size and instance_count must be at least 1, intra_op_threads at least 0 "
            f"(got {max_batch_size}, {instance_count}, {intra_op_threads})."
        )
    policy = ""
    if versions:
        listed = ", ".join(str(_check_version_number(v)) for v in sorted(set(versions)))
        policy = f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}\n"
    return (
        f'name: "{MODEL_NAME}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"{policy}"
        "input [\n"
        f'  {{ name: "{ONNX_INPUT}" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }}\n'
        "]\n"
        "output [\n"
        f'  {{ name: "{ONNX_OUTPUT}" data_type: TYPE_FP32 dims: [ 10 ] '
        'label_filename: "labels.txt" }\n'
        "]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
        f"instance_group [ {{ count: {instance_count} kind: {kind} }} ]\n"
        "parameters {\n"
        '  key: "intra_op_thread_count"\n'
        f'  value: {{ string_value: "{intra_op_threads}" }}\n'
        "}\n"
        "parameters {\n"
        '  key: "inter_op_thread_count"\n'
        '  value: { string_value: "1" }\n'
        "}\n"
    )


def write_native_repository(
    repo: Path, out_dir: Path, versions: Sequence[int] | None = None, **config: Any
) -> Path:
    """Lay out ``out_dir/cifar10_resnet18/`` for the onnxruntime backend: config.pbtxt from
    render_native_config, labels.txt, and ``<N>/model.onnx`` for each version (default: all
    written versions). The folder is rebuilt from scratch and swapped in whole."""
    available = list_versions(repo)
    chosen = sorted(set(versions)) if versions else available
    missing = [v for v in chosen if v not in available]
    if not chosen or missing:
        raise RepositoryError(
            f"Versions {missing or 'none'} are not in {repo / MODEL_NAME} (available: "
            f"{available}); write them with write_version first."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MODEL_NAME}.{uuid.uuid4().hex}"
    model_dir = tmp / MODEL_NAME
    model_dir.mkdir(parents=True)
    try:
        (model_dir / "config.pbtxt").write_text(render_native_config(versions=chosen, **config))
        (model_dir / "labels.txt").write_text("\n".join(CLASSES) + "\n")
        for version in chosen:
            (model_dir / str(version)).mkdir()
            source = repo / MODEL_NAME / str(version) / "model.onnx"
            # Hard links cost no space when the two trees share a file system.
            try:
                os.link(source, model_dir / str(version) / "model.onnx")
            except OSError:
                shutil.copyfile(source, model_dir / str(version) / "model.onnx")
        final = out_dir / MODEL_NAME
        if final.exists():
            old = out_dir / f".{MODEL_NAME}.old.{uuid.uuid4().hex}"
            final.rename(old)
            shutil.rmtree(old)
        model_dir.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / MODEL_NAME

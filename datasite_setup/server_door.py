"""The server's door: what a data scientist's session may call on this datasite. Deny by default.

Why this exists, as tried as a data scientist against a live datasite: syft
0.9.5 opens 114 service methods to the DATA_SCIENTIST role (`UserServiceConfigRegistry`), and
some of them reach private data without any request or approval. `action.execute` resolves its
objects with `has_permission=True` (syft/service/action/action_service.py), so a numpy method of a
private asset (`.tofile(path)`) ran inside the server process and wrote the private image to a
file; the same route read `data_dir/secrets/`, `audit.log` and the site config and overwrote
`privacy_budget.json`. A request carrying a user-defined policy class (`sy.CustomOutputPolicy`)
runs that class body inside the server when approved. `blob_storage.write_to_disk` checks only
*read* permission before it writes, so anyone could overwrite a mock's blob.

The chokepoint: every data scientist's call arrives over HTTP at `POST /api/v2/api_call`, whose
only handler is `Server.handle_api_call` -> `Server.handle_api_call_with_unsigned_result`; that
method is the single place where a call's path is mapped to a service method, where non-blocking
calls are queued (`add_api_call_to_queue`, which skips syft's role check) and where calls are
forwarded to peers. `install` wraps it on the server object before the HTTP app is built, so each
call whose signer's role is below ADMIN is checked here first:

* blocking calls only, addressed to this server (no queue, no forwarding to a peer);
* the path must be in `ALLOWED`, the short list the project's workflow uses (measured by tracing
  log in -> list datasets -> mock -> thin request -> status -> run -> result, see
  tests/test_server_door.py), and the caller must be a registered user (not a guest);
* an entry with a `check` must also accept the call's arguments (bound to syft's own signature
  of the method; arguments that do not bind are refused): objects must be readable by the caller
  under syft's permission table, never the private side of an asset; uploads may not overwrite or
  link to other objects; code requests may carry only syft's built-in policies.

Admins (the hospital's own tools: `datasite-admin`, ingestion, the demo) keep full access.
A refused call gets one uniform message (`MESSAGE`: `REFUSAL` and a reference); the real reason -
who, which path, which object, why - is a `refused-call` line under that reference in
`data_dir/audit.log` (`audit_log.append`, like the site's
other audit entries).

Not covered by this module (outside `api_call`): `GET /api` describes endpoints (no data) to any
verify key, as in syft; `/login`, `/register` (sign-up is off), password reset, `/metadata`.
"""

from __future__ import annotations

import functools
import inspect
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from datasite_setup import audit_log
from datasite_setup.array_texts import print_arrays_by_shape

REFUSAL = (
    "refused by this datasite: data scientists may only list datasets and mocks, request approved "
    "work and run it"
)
MESSAGE = REFUSAL + "; the site's admin can see why (reference {reference})"


@dataclass(frozen=True)
class Entry:
    why: str
    check: Callable[["_Call"], str | None] | None = None  # a refusal reason, or None to allow


@dataclass
class _Call:
    server: Any
    credentials: Any
    path: str
    arguments: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Argument checks for the allowed entries that touch objects


def _uid(value: Any) -> Any:
    from syft.types.uid import LineageID, UID

    if isinstance(value, LineageID):
        return value.id
    if isinstance(value, UID):
        return value
    raise TypeError(f"expected a UID, got {type(value).__name__}")


def _readable(call: _Call, uid: Any, service: str, what: str) -> str | None:
    """None if the caller has syft's read permission on `uid` in `service`'s stash, else why not."""
    from syft.service.action.action_permissions import ActionObjectREAD

    uid = _uid(uid)
    stash = getattr(call.server.services, service).stash
    if stash.has_permissions([ActionObjectREAD(uid=uid, credentials=call.credentials)]):
        return None
    return f"{what} {uid} is not readable by this user"


def _blob_own(call: _Call, uid: Any) -> str | None:
    uid = _uid(uid)
    try:
        entry = call.server.services.blob_storage.stash.get_by_uid(call.server.verify_key, uid=uid).unwrap()
    except Exception:
        return f"blob {uid} does not exist"
    if entry.uploaded_by != call.credentials:
        return f"blob {uid} was not allocated by this user (syft checks only read permission before writing)"
    return None


def check_action_get(call: _Call) -> str | None:
    return _readable(call, call.arguments["uid"], "action", "action object")


def check_action_has_storage_permission(call: _Call) -> str | None:
    return _readable(call, call.arguments["uid"], "action", "action object")


def check_action_set(call: _Call) -> str | None:
    from syft.service.action.action_data_empty import ActionDataLink
    from syft.service.action.action_object import ActionObject

    obj = call.arguments["action_object"]
    if not isinstance(obj, ActionObject):  # a TwinObject would make her upload "private" data with a mock
        return f"action.set of a {type(obj).__name__}; only plain ActionObjects may be uploaded"
    uid = _uid(obj.id)
    if call.server.services.action.stash.exists(call.server.verify_key, uid):
        return f"action.set would overwrite the existing object {uid}"
    if isinstance(obj.syft_action_data_cache, ActionDataLink):
        return f"action.set of a link to another object ({obj.syft_action_data_cache.action_object_id})"
    if obj.syft_blob_storage_entry_id is not None:
        return _blob_own(call, obj.syft_blob_storage_entry_id)
    return None


def check_blob_allocate(call: _Call) -> str | None:
    from syft.types.blob_storage import CreateBlobStorageEntry

    entry = call.arguments["obj"]
    if type(entry) is not CreateBlobStorageEntry:
        return f"blob_storage.allocate with a {type(entry).__name__}"
    if entry.extensions:  # they become part of the file name under data_dir/blob
        return f"blob_storage.allocate with file name extensions {entry.extensions!r}"
    if call.server.services.blob_storage.stash.exists(call.server.verify_key, _uid(entry.id)):
        return f"blob_storage.allocate would reuse the existing blob id {entry.id}"
    return None


def check_blob_write(call: _Call) -> str | None:
    return _blob_own(call, call.arguments["uid"])


def check_blob_read(call: _Call) -> str | None:
    return _readable(call, call.arguments["uid"], "blob_storage", "blob")


def builtin_policies() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(input policy types, output policy types) a data scientist's request may carry."""
    from syft.service.policy.policy import ExactMatch, MixedInputPolicy, OutputPolicyExecuteCount, OutputPolicyExecuteOnce

    return (MixedInputPolicy, ExactMatch), (OutputPolicyExecuteCount, OutputPolicyExecuteOnce)


def policy_label(policy_type: Any) -> str:
    """A readable name for a policy type, built-in class or user-defined policy object."""
    if isinstance(policy_type, type):
        return policy_type.__name__
    for attr in ("class_name", "unique_name"):
        name = getattr(policy_type, attr, None)
        if isinstance(name, str) and name:
            return f"user-defined {name}"
    return f"user-defined {type(policy_type).__name__}"


def check_code_request(call: _Call) -> str | None:
    from syft.service.code.user_code import SubmitUserCode

    code = call.arguments["code"]
    if type(code) is not SubmitUserCode:
        return f"code request with a {type(code).__name__} (only a new SubmitUserCode)"
    inputs, outputs = builtin_policies()
    if not any(code.input_policy_type is t for t in inputs):
        return f"code request '{code.func_name}' with input policy {policy_label(code.input_policy_type)}"
    if not any(code.output_policy_type is t for t in outputs):
        return f"code request '{code.func_name}' with output policy {policy_label(code.output_policy_type)}"
    if code.worker_pool_name is not None:
        return f"code request '{code.func_name}' for worker pool {code.worker_pool_name!r}"
    return None


def check_resolve_object(call: _Call) -> str | None:
    from syft.service.code.status_service import UserCodeStatusService
    from syft.service.code.user_code_service import UserCodeService
    from syft.store.linked_obj import LinkedObject

    linked = call.arguments["linked_obj"]
    if not isinstance(linked, LinkedObject):
        return f"resolve_object of a {type(linked).__name__}"
    if linked.service_type not in (UserCodeService, UserCodeStatusService):
        return f"resolve_object through {getattr(linked.service_type, '__name__', linked.service_type)}"
    return None


def check_get_object(call: _Call) -> str | None:
    from syft.service.request.request import Request

    if call.arguments["object_type"] is not Request:
        return f"migration._get_object of {getattr(call.arguments['object_type'], '__name__', '?')}"
    return None


# ---------------------------------------------------------------------------------------------
# The allow-list. Every path a data scientist's session may call; everything else is refused.

ALLOWED: dict[str, Entry] = {
    "metadata.get_metadata": Entry(
        "before uploading parameters the client reads the server's metadata (its blob-size threshold); "
        "the same as the public GET /metadata"
    ),
    "user.get_current_user": Entry("log in: the client fetches her own account (syft reads it with her key)"),
    "dataset.get_all": Entry("list datasets and their assets (descriptions, no data; syft filters by permission)"),
    "action.get_mock": Entry(
        "an asset's mock (`asset.mock`); syft returns only the mock side of twin objects, and data "
        "scientists cannot create twins (action.set below), so every twin is an asset the admin uploaded"
    ),
    "code.request_code_execution": Entry(
        "submit a code request (thin site-task requests, custom code where the site allows it); only "
        "syft's built-in input policies (MixedInputPolicy, ExactMatch) and output policies "
        "(OutputPolicyExecuteCount, OutputPolicyExecuteOnce): a user-defined policy class would run "
        "its body inside the server when approved",
        check_code_request,
    ),
    "request.get_all": Entry("her requests and their statuses (syft filters by permission)"),
    "code.get_all": Entry("her submitted code (syft filters by permission)"),
    "notifications.resolve_object": Entry(
        "a request resolves its code and its status (`request.code`, `request.status`); only through "
        "UserCodeService and UserCodeStatusService, whose stashes check her read permission",
        check_resolve_object,
    ),
    "migration._get_object": Entry(
        "`Request.refresh()` (called by `request.status`) re-reads the request; only Request objects, "
        "read with her key",
        check_get_object,
    ),
    "action.set": Entry(
        "upload the parameters of a run (`params=dict` becomes an ActionObject); only a new plain "
        "ActionObject: no TwinObject, no overwrite of an existing id, no link to another object, "
        "blob data only from a blob she allocated",
        check_action_set,
    ),
    "blob_storage.allocate": Entry(
        "parameters of >= 1 MB (model weights) are uploaded to blob storage first; a fresh blob id, "
        "no file name extensions",
        check_blob_allocate,
    ),
    "blob_storage.write_to_disk": Entry(
        "the upload itself (on-disk blob storage); only into a blob she allocated (syft itself checks "
        "read permission only, which would let her overwrite a mock)",
        check_blob_write,
    ),
    "code.call": Entry(
        "run an approved request (`client.code.<name>(...)`): syft checks approval and input policy, the "
        "site enforces execution budgets (execution_limits) and runs it isolated with output contracts "
        "(site_execution); blocking calls only"
    ),
    "action.get": Entry(
        "fetch the result of a run (`result.get()`); only objects she may read under syft's permission "
        "table (her results and uploads), never an asset's private data",
        check_action_get,
    ),
    "action.has_storage_permission": Entry(
        "`result.get()` asks whether this server stores the result; only for objects she may read",
        check_action_has_storage_permission,
    ),
    "blob_storage.read": Entry(
        "a result of >= 1 MB (model weights) is read from blob storage; only blobs she may read "
        "(her results, her uploads, mocks)",
        check_blob_read,
    ),
}


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    why: str = ""
    object: str | None = None


_signatures: dict[str, inspect.Signature | None] = {}


def _signature(path: str) -> inspect.Signature | None:
    if path not in _signatures:
        from syft.service.service import ServiceConfigRegistry

        config = ServiceConfigRegistry.get_registered_configs().get(path)
        _signatures[path] = None if config is None else config.signature
    return _signatures[path]


def _object_named(arguments: dict[str, Any]) -> str | None:
    for key in ("uid", "obj_id", "action_object", "linked_obj", "code", "obj", "action"):
        if key in arguments:
            value = arguments[key]
            for attr in ("object_uid", "id", "remote_self"):
                inner = getattr(value, attr, None)
                if inner is not None:
                    return f"{type(value).__name__} {inner}"
            return str(value)[:200]
    return None


def decide(server: Any, credentials: Any, role: Any, message: Any) -> Decision:
    """The door's verdict on one call by a non-admin (`message` is syft's SyftAPICall)."""
    from syft.service.user.user_roles import ServiceRole

    path = message.path
    if role.value < ServiceRole.DATA_SCIENTIST.value:
        return Decision(False, f"a {role.name} session may call nothing")
    if message.server_uid != server.id:
        return Decision(False, f"call addressed to another server ({message.server_uid}): no forwarding")
    if not message.blocking:
        return Decision(False, "non-blocking call (syft queues those without its role check)")
    entry = ALLOWED.get(path)
    if entry is None:
        return Decision(False, "not on the allow-list")
    if entry.check is None:
        return Decision(True)
    signature = _signature(path)
    kwargs = {k: v for k, v in message.kwargs.items() if k != "communication_protocol"}
    try:
        bound = signature.bind(*message.args, **kwargs)  # type: ignore[union-attr]
    except TypeError as exc:
        return Decision(False, f"arguments do not match {path}{signature}: {exc}")
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    call = _Call(server=server, credentials=credentials, path=path, arguments=arguments)
    try:
        why = entry.check(call)
    except Exception as exc:  # a check that cannot decide refuses
        why = f"argument check failed ({type(exc).__name__}: {exc})"
    if why is None:
        return Decision(True)
    return Decision(False, why, _object_named(arguments))


def _email(server: Any, credentials: Any) -> str:
    try:
        return server.services.user.stash.get_by_verify_key(server.verify_key, credentials).unwrap().email
    except Exception:
        return f"unregistered key {str(credentials)[:16]}"


_this_call = threading.local()  # (credentials, role) of the call this thread is handling


def _api_call_text(api_call: Any) -> str:
    return f"SyftAPICall(path={api_call.path}, {len(api_call.args)} args, kwargs {sorted(api_call.kwargs)})"


def install(server: Any, data_dir: Path) -> None:
    """Put the door in front of `server`'s API-call handler (call before the HTTP app is built).

    The role the door looks up is also handed to syft's handler, which asks for it twice per call
    (server.py: `get_role_for_credentials`, one user-table query of ~2-6 ms each); within one
    call, on its thread and for the same key, the answer is the door's. So the door costs no
    extra query on the way in. syft's own handler and role lookup stay reachable as the
    replacements' `__wrapped__`, so the door's cost can be measured against them."""
    from syft.client.api import SignedSyftAPICall, SyftAPICall
    from syft.service.response import SyftError
    from syft.service.user.user_roles import ServiceRole

    original = server.handle_api_call_with_unsigned_result
    if getattr(original, "_medfed_door", False):
        return
    # syft formats every call into its log line (`logger.info(f"API Call: {api_call}")`) whatever
    # the log level: the text of its arguments, which can be private data. The call's text names
    # its path and argument names only.
    SyftAPICall.__repr__ = _api_call_text
    # syft also builds and stores a text of every object it validates: in this process an
    # array's text is its shape and type (no value, no formatting cost).
    print_arrays_by_shape()
    lookup_role = server.get_role_for_credentials

    @functools.wraps(lookup_role)
    def get_role_for_credentials(credentials: Any) -> Any:
        known = getattr(_this_call, "role", None)
        if known is not None and known[0] == credentials:
            return known[1]
        return lookup_role(credentials=credentials)

    def handled(api_call: Any, role: Any, job_id: Any, check_call_location: bool) -> Any:
        before = getattr(_this_call, "role", None)
        _this_call.role = (api_call.credentials, role)
        try:
            return original(api_call, job_id=job_id, check_call_location=check_call_location)
        finally:
            _this_call.role = before

    @functools.wraps(original)
    def handle_api_call_with_unsigned_result(api_call: Any, job_id: Any = None, check_call_location: bool = True) -> Any:
        if not isinstance(api_call, SignedSyftAPICall):
            return refuse({"requested_by": "unsigned", "why": f"unsigned {type(api_call).__name__}"})
        credentials = api_call.credentials
        role = lookup_role(credentials=credentials)
        if role.value >= ServiceRole.ADMIN.value:
            return handled(api_call, role, job_id, check_call_location)
        message = api_call.message
        decision = decide(server, credentials, role, message)
        if decision.allowed:
            return handled(api_call, role, job_id, check_call_location)
        if not api_call.is_valid:  # a forged signature: syft's own handler refuses it, nothing to audit
            return original(api_call, job_id=job_id, check_call_location=check_call_location)
        event = {
            "requested_by": _email(server, credentials),
            "role": role.name,
            "service": message.path,
            "why": decision.why,
        }
        if decision.object:
            event["object"] = decision.object
        return refuse(event)

    def refuse(event: dict[str, Any]) -> Any:
        reference = secrets.token_hex(4)
        audit_log.append(data_dir, {"action": "refused-call", **event, "reference": reference})
        return SyftError(message=MESSAGE.format(reference=reference))

    handle_api_call_with_unsigned_result._medfed_door = True  # type: ignore[attr-defined]
    server.get_role_for_credentials = get_role_for_credentials
    server.handle_api_call_with_unsigned_result = handle_api_call_with_unsigned_result

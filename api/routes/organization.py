"""OpenAI's admin operations for projects, their API keys and their model permissions
(`/v1/organization/projects/...`), over `store.api_keys` and `store.model_permissions`.

Every one needs an owner key (`localq keys create --role owner`). Keys themselves are made only by
`localq keys create`, which shows the secret once: OpenAI has no operation that creates a project
key either. The projects of keys listed in `LOCALQ_API_KEYS` are not stored, so they are not
listed here.
"""

from __future__ import annotations

from api.auth import require_owner
from api.errors import APIError
from api.pages import page, page_limit
from api.queue import queue_runtime
from schemas.openai_errors import invalid
from store.api_keys import ApiKey, KeyStore, Project
from store.model_permissions import delete_permissions, permissions, set_permissions

MAX_LIST_LIMIT = 100
MAX_NAME = 200


def _keys() -> KeyStore:
    require_owner()
    return KeyStore(queue_runtime().redis)


def _project(store: KeyStore, project_id: str) -> Project:
    found = store.project_by_id(project_id)
    if found is None:
        raise APIError(404, f"No project found with id '{project_id}'.", param="project_id", code="not_found")
    return found


def project_object(project: Project) -> dict:
    return {"id": project.id, "object": "organization.project", "name": project.name,
            "created_at": project.created_at, "archived_at": project.archived_at,
            "status": "archived" if project.archived_at is not None else "active"}


def key_object(key: ApiKey) -> dict:
    """A key as OpenAI shows a project key: owned by a service account named after the key."""
    return {"object": "organization.project.api_key", "id": key.id, "name": key.name,
            "redacted_value": key.redacted_value, "created_at": key.created_at, "last_used_at": None,
            "owner_project_access": "inactive" if key.archived else "active",
            "owner": {"type": "service_account",
                      "service_account": {"id": key.id, "name": key.name or key.id, "created_at": key.created_at,
                                          "role": key.role}}}


def _paged(items: list[dict], query: dict) -> dict:
    limit = page_limit(query, 20, MAX_LIST_LIMIT)
    after = query.get("after")
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return page(items[:limit], len(items) > limit)


def _name(body: dict | None) -> str | None:
    name = (body or {}).get("name")
    if name is None:
        return None
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise invalid("name", f"A project's name must be 1 to {MAX_NAME} characters.")
    return name


def list_projects(call):
    store = _keys()
    projects = [project for project in store.projects()
                if call.query.get("include_archived") or project.archived_at is None]
    return _paged([project_object(project) for project in projects], call.query)


def create_project(call):
    store = _keys()
    name = _name(call.body)
    if store.project(name) is not None:
        raise invalid("name", f"A project named '{name}' exists already.", "duplicate_name")
    return project_object(store.project(name, create=True))


def retrieve_project(call):
    return project_object(_project(_keys(), call.path["project_id"]))


def modify_project(call):
    store = _keys()
    project = _project(store, call.path["project_id"])
    name = _name(call.body)
    if name is None:
        return project_object(project)
    try:
        return project_object(store.rename(project.id, name))
    except ValueError:
        raise invalid("name", f"A project named '{name}' exists already.", "duplicate_name") from None


def archive_project(call):
    store = _keys()
    return project_object(store.archive(_project(store, call.path["project_id"]).id))


def _project_key(store: KeyStore, project: Project, key_id: str) -> ApiKey:
    key = store.key(key_id)
    if key is None or key.project_id != project.id:
        raise APIError(404, f"No API key found with id '{key_id}'.", param="api_key_id", code="not_found")
    return key


def list_project_api_keys(call):
    store = _keys()
    project = _project(store, call.path["project_id"])
    return _paged([key_object(key) for key in store.keys(project.id)], call.query)


def retrieve_project_api_key(call):
    store = _keys()
    return key_object(_project_key(store, _project(store, call.path["project_id"]), call.path["api_key_id"]))


def delete_project_api_key(call):
    store = _keys()
    key = _project_key(store, _project(store, call.path["project_id"]), call.path["api_key_id"])
    store.revoke(key.id)
    return {"object": "organization.project.api_key.deleted", "id": key.id, "deleted": True}


def retrieve_model_permissions(call):
    store = _keys()
    return permissions(store.client, _project(store, call.path["project_id"]).id).as_object()


def update_model_permissions(call):
    store = _keys()
    project = _project(store, call.path["project_id"])
    try:
        return set_permissions(store.client, project.id, call.body["mode"], call.body["model_ids"]).as_object()
    except ValueError as err:
        raise invalid("model_ids", str(err)) from None


def delete_model_permissions(call):
    store = _keys()
    delete_permissions(store.client, _project(store, call.path["project_id"]).id)
    return {"object": "project.model_permissions.deleted", "deleted": True}


HANDLERS = {
    "list-projects": list_projects,
    "create-project": create_project,
    "retrieve-project": retrieve_project,
    "modify-project": modify_project,
    "archive-project": archive_project,
    "list-project-api-keys": list_project_api_keys,
    "retrieve-project-api-key": retrieve_project_api_key,
    "delete-project-api-key": delete_project_api_key,
    "retrieve-project-model-permissions": retrieve_model_permissions,
    "update-project-model-permissions": update_model_permissions,
    "delete-project-model-permissions": delete_model_permissions,
}

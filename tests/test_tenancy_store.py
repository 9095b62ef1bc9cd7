"""The data layer's side of tenants: files, batches and jobs scoped by project, model permissions,
projects renamed and archived (against a real Redis)."""

from __future__ import annotations

import pytest

from store.api_keys import ArchivedProject, KeyStore
from store.batches import BatchStore
from store.filestore import FileNotFound, FileStore
from store.jobs import JobStore
from store.model_permissions import ALLOW, DENY, ModelPermissions, delete_permissions, permissions, set_permissions


def test_files_are_scoped_by_project(redis_db, tmp_path):
    files = FileStore(redis_db, tmp_path)
    mine = files.create(purpose="batch", filename="a.jsonl", source=b"{}\n", project="proj_a")
    theirs = files.create(purpose="user_data", filename="b.txt", source=b"b", project="proj_b")
    assert files.get(mine["id"], "proj_a") == mine and "project" not in mine
    assert files.get(mine["id"], "proj_b") is None
    assert files.get(mine["id"]) == mine, "housekeeping (project None) sees every file"
    assert [f["id"] for f in files.list(project="proj_a")[0]] == [mine["id"]]
    assert [f["id"] for f in files.list(project="proj_a", purpose="user_data")[0]] == []
    assert {f["id"] for f in files.list()[0]} == {mine["id"], theirs["id"]}, "no keys: the whole server"
    with pytest.raises(FileNotFound):
        files.list(project="proj_b", after=mine["id"])
    with pytest.raises(FileNotFound):
        files.open(mine["id"], "proj_b")
    assert not files.delete(mine["id"], "proj_b") and files.get(mine["id"]) is not None
    assert files.delete(mine["id"], "proj_a")
    assert files.list(project="proj_a") == ([], False)
    assert redis_db.zcard("localq:files:project:proj_a") == 0
    assert redis_db.zcard("localq:files:project:proj_a:purpose:batch") == 0


def test_batches_are_scoped_by_project(redis_db):
    batches = BatchStore(redis_db)
    made = {project: batches.create(input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h",
                                    metadata=None, window_seconds=60, project=project)
            for project in ("proj_a", "proj_b")}
    assert batches.get(made["proj_a"]["id"], "proj_b") is None
    assert batches.get(made["proj_a"]["id"], "proj_a") == made["proj_a"] and "project" not in made["proj_a"]
    assert [b["id"] for b in batches.list(project="proj_b")[0]] == [made["proj_b"]["id"]]
    assert len(batches.list()[0]) == 2
    assert batches.list(project="proj_b", after=made["proj_a"]["id"]) == ([], False)


def test_jobs_know_their_project(redis_db):
    jobs = JobStore(redis_db, ttl=60)
    jobs.create("job_1", kind="chat", model="m", queue="cpu", priority="interactive", deadline=0, attached=True,
                project="proj_a")
    assert jobs.get("job_1", "proj_b") is None and jobs.get("job_1", "proj_a")["project"] == "proj_a"
    assert jobs.projects(["job_1", "job_none"]) == ["proj_a", None]


def test_model_permissions(redis_db):
    assert permissions(redis_db, "proj_a").allows(["anything"])
    set_permissions(redis_db, "proj_a", ALLOW, ["small", "small"])
    assert permissions(redis_db, "proj_a") == ModelPermissions(ALLOW, ("small",))
    assert permissions(redis_db, "proj_a").allows(["big-name", "small"]), "an alias in the list covers the model"
    assert not permissions(redis_db, "proj_a").allows(["big"])
    set_permissions(redis_db, "proj_a", DENY, ["big"])
    assert not permissions(redis_db, "proj_a").allows(["other", "big"]) and permissions(redis_db, "proj_a").allows(["x"])
    assert permissions(redis_db, "").allows(["big"]), "a server without keys uses every model"
    with pytest.raises(ValueError):
        set_permissions(redis_db, "proj_a", "maybe", [])
    assert delete_permissions(redis_db, "proj_a") and not delete_permissions(redis_db, "proj_a")


def test_projects_renamed_and_archived(redis_db):
    keys = KeyStore(redis_db)
    secret, key = keys.create("alpha")
    keys.create("beta")
    project = keys.project("alpha")
    with pytest.raises(ValueError):
        keys.rename(project.id, "beta")
    assert keys.rename(project.id, "gamma").name == "gamma" and keys.project("alpha") is None
    archived = keys.archive(project.id)
    assert archived.archived_at is not None and keys.lookup(secret) is None, "an archived project's keys are refused"
    assert keys.key(key.id).archived
    with pytest.raises(ArchivedProject):
        keys.create("gamma")

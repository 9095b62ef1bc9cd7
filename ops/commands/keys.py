"""`localq keys create|list|revoke`: projects' API keys in Redis (store/api_keys.py).

`create` prints the secret once: only its digest is kept."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.settings import Settings
from ops.common import read_redis
from store.api_keys import ArchivedProject, MEMBER, ROLES, KeyStore


def add_parser(commands) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys (each belongs to a project)")
    actions = keys.add_subparsers(required=True, metavar="ACTION")
    create = actions.add_parser("create", help="a new key in a project (created when new); prints the secret once")
    create.add_argument("--project", required=True, help="the project's name")
    create.add_argument("--role", choices=ROLES, default=MEMBER,
                        help="owner (of the whole server) or member (of its project; default)")
    create.add_argument("--name", default="", help="a label for the key")
    create.set_defaults(command=_create)
    listing = actions.add_parser("list", help="the keys (redacted), with their projects and roles")
    listing.add_argument("--project", help="only this project's keys")
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    listing.set_defaults(command=_list)
    revoke = actions.add_parser("revoke", help="revoke a key by its id (key_...)")
    revoke.add_argument("key_id")
    revoke.set_defaults(command=_revoke)


def _create(args: argparse.Namespace, settings: Settings) -> int:
    try:
        secret, key = read_redis(settings.queue.redis_url, "API keys",
                                 lambda client: KeyStore(client).create(args.project, role=args.role, name=args.name))
    except ArchivedProject as err:
        Console(stderr=True).print(f"localq keys: {escape(str(err))}; no key was made", highlight=False)
        return 1
    Console(stderr=True).print(f"key {key.id} ({key.role}) in project {escape(args.project)} ({key.project_id}); "
                               "the secret is shown only now:", highlight=False)
    print(secret)
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    def read(client):
        store = KeyStore(client)
        projects = {project.id: project for project in store.projects()}
        wanted = store.project(args.project) if args.project else None
        if args.project and wanted is None:
            return projects, []
        return projects, store.keys(wanted.id if wanted else None)

    projects, keys = read_redis(settings.queue.redis_url, "API keys", read)
    if args.json:
        print(json.dumps([{**asdict(key), "project": projects[key.project_id].name if key.project_id in projects
                           else None} for key in keys], indent=2))
        return 0
    if not keys:
        Console(stderr=True).print("no API keys", highlight=False)
        return 0
    table = Table("id", "project", "role", "name", "key", "created (UTC)", title="API keys")
    for key in keys:
        project = projects.get(key.project_id)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key.created_at))
        shown = project.name if project else key.project_id
        shown += " (archived: refused)" if key.archived else ""
        table.add_row(*map(escape, (key.id, shown, key.role, key.name, key.redacted_value, created)))
    Console().print(table)
    return 0


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    if not read_redis(settings.queue.redis_url, "API keys", lambda client: KeyStore(client).revoke(args.key_id)):
        Console(stderr=True).print(f"no key {escape(args.key_id)}", highlight=False)
        return 1
    Console(stderr=True).print(f"revoked {escape(args.key_id)}", highlight=False)
    return 0
